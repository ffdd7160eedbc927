#!/bin/bash
# Self Forcing's init at block size 3 on the timed CPU run's teachers (docs/results.md, "The CPU-only recipe, end to
# end"): the recipe's causal-ode and dmd settings with stage.block_size=3, then ShapesBench of the init (seed 0) and
# of its DMD student (seeds 0, 1000, 2000). Run from anywhere; needs runs/recipe_v5 and the project's .venv.
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" && . .venv/bin/activate && export HF_HUB_OFFLINE=1
set -e
R=runs/recipe_v5
date -Is
causal-forcing train causal-ode --config causal_forcing/configs/shapes/causal_ode.yaml data.path=$R/ode/bidirectional stage.mode=self-forcing train.init=$R/runs/bidirectional/final_ema stage.block_size=3 train.out_dir=$R/runs/self_forcing_ode_chunkwise train.progress=false
date -Is
causal-forcing train dmd --config causal_forcing/configs/shapes/dmd.yaml data.path=$R/latents train.init=$R/runs/self_forcing_ode_chunkwise/final_ema stage.real_score=$R/runs/bidirectional/final_ema stage.block_size=3 train.out_dir=$R/runs/dmd_self_forcing_ode_chunkwise train.progress=false
date -Is
ev() { causal-forcing eval model --weights "$1" --kind causal --block-size 3 --seed "$2" --manifest $R/data/eval/manifest.jsonl --vae $R/vae --out "$3" 2>&1 | tail -1; }
for s in 0 1000 2000; do ev $R/runs/dmd_self_forcing_ode_chunkwise/final_ema $s $R/eval_extra/dmd_sf_cw_seed$s; done
ev $R/runs/self_forcing_ode_chunkwise/final_ema 0 $R/eval_extra/sf_cw_init_seed0
date -Is
