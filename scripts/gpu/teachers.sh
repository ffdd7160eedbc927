#!/usr/bin/env bash
# The ShapesWorld teachers on one lent GPU (no network there) with the CUDA-graph trainer
# (`python -m causal_forcing.training.graphed`): data → encode (the recipe's own steps) → bidirectional teacher on
# 9-frame clips → continued on whole clips → frame-wise AR teacher (teacher forcing) → ShapesBench of the teachers
# on the 200 evaluation prompts (on the GPU) → chunk-wise AR teacher with what time is left. Each finished run is
# packed into OUT_DIR/RUN.tar (final/, final_ema/, metrics) as soon as it exists, so whatever finished comes back
# even if a later step fails. Needs .device/minilm.pt from
# `python scripts/gpu/minilm_transport.py pack .device/minilm.pt TRAIN_MANIFEST EVAL_MANIFEST` (MiniLM is not
# installed there) and diffusers' wheel in .device/whl. The later stages (causal CD / ODE inits, DMD) continue on the CPU with `recipe shapes`.
#
#   scripts/gpu/teachers.sh WORK_DIR OUT_DIR [BUDGET_SECONDS [INIT_MODEL_FOLDER]]
#
# INIT_MODEL_FOLDER (e.g. artifacts/shapes_recipe_gpu/runs/bidirectional/final_ema) continues an earlier teacher
# instead of training the short-clip part from scratch. TEACHER_EXTRA (environment) is passed to every teacher run,
# e.g. TEACHER_EXTRA="--abs-pos-freqs 4 --early-frames 5 --early-weight 4" (docs/results.md, "the direction sign").
set -uo pipefail
W=$1; O=$2; BUDGET=${3:-500}; INIT=${4:-}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
source scripts/gpu/setup_data.sh   # packages, MiniLM, data → encode into $W
echo "STEP data+encode $(( $(date +%s) - T0 )) s, $(left) s left"
G="python3 -m causal_forcing.training.graphed --data $W/latents ${TEACHER_EXTRA:-}"
pack() { tar -C "$W/runs" -cf "$O/$1.tar" "$1/final" "$1/final_ema" "$1/metrics.jsonl" "$1/settings.json" "$1/summary.json"; }
EV="python3 -m causal_forcing eval model --manifest $W/data/eval/manifest.jsonl --vae $W/vae --device cuda --batch-size 50"

S1=$(( $(left) - 210 )); [ "$S1" -lt 60 ] && S1=60
$G --out "$W/runs/bidirectional_short" --frames 9 --batch 64 --lr 1e-3 --min-lr 1e-4 --warmup 200 \
   --ema-start 2000 --seconds "$S1" ${INIT:+--init "$INIT"} || exit 1
pack bidirectional_short
$G --out "$W/runs/bidirectional" --init "$W/runs/bidirectional_short/final_ema" --batch 32 --lr 5e-4 --min-lr 5e-5 \
   --warmup 100 --ema-start 0 --seconds 60 || exit 1
pack bidirectional
echo "STEP teacher done, $(left) s left"
$G --out "$W/runs/ar_framewise" --init "$W/runs/bidirectional/final_ema" --block-size 1 --batch 32 --lr 3e-4 \
   --min-lr 3e-5 --warmup 100 --ema-start 500 --seconds 45 && pack ar_framewise
timeout 70 $EV --weights "$W/runs/bidirectional/final_ema" --kind bidirectional > "$O/eval_bidirectional.txt" 2>&1
echo "STEP eval teacher rc=$?, $(left) s left"
timeout 60 $EV --weights "$W/runs/ar_framewise/final_ema" --kind autoregressive > "$O/eval_ar_framewise.txt" 2>&1
echo "STEP eval AR rc=$?, $(left) s left"
S4=$(( $(left) - 15 ))
if [ "$S4" -ge 30 ]; then
  $G --out "$W/runs/ar_chunkwise" --init "$W/runs/bidirectional/final_ema" --block-size 3 --batch 32 --lr 3e-4 \
     --min-lr 3e-5 --warmup 100 --ema-start 500 --seconds "$S4" && pack ar_chunkwise
fi
echo "ALL DONE $(( $(date +%s) - T0 )) s"
