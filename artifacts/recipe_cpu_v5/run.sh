#!/bin/bash
# End-to-end CPU recipe with wall-clock accounting (start/end lines; a heartbeat every 30 s marks where an
# invocation stopped if the session ended under it).
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" && . .venv/bin/activate   # the repository root, from artifacts/ or runs/
export HF_HUB_OFFLINE=1
echo "start $(date -Is)" >> runs/recipe_v5_wall.log
( while sleep 30; do date -Is > runs/recipe_v5_heartbeat; done ) & HB=$!
causal-forcing recipe shapes --out runs/recipe_v5 --jobs 2
echo "end $(date -Is) rc=$?" >> runs/recipe_v5_wall.log
kill $HB
