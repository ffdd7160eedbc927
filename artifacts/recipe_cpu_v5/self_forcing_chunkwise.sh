#!/bin/bash
cd /work/main && . .venv/bin/activate && export HF_HUB_OFFLINE=1
set -e
R=runs/recipe_v5
date -Is
causal-forcing train causal-ode --config causal_forcing/configs/shapes/causal_ode.yaml data.path=$R/ode/bidirectional stage.mode=self-forcing train.init=$R/runs/bidirectional/final_ema stage.block_size=3 train.out_dir=$R/runs/self_forcing_ode_chunkwise train.progress=false
date -Is
causal-forcing train dmd --config causal_forcing/configs/shapes/dmd.yaml data.path=$R/latents train.init=$R/runs/self_forcing_ode_chunkwise/final_ema stage.real_score=$R/runs/bidirectional/final_ema stage.block_size=3 train.out_dir=$R/runs/dmd_self_forcing_ode_chunkwise train.progress=false
date -Is
for s in 0 1000 2000; do causal-forcing eval model --weights $R/runs/dmd_self_forcing_ode_chunkwise/final_ema --kind causal --block-size 3 --seed $s --manifest $R/data/eval/manifest.jsonl --vae $R/vae --out $R/eval_extra/dmd_sf_cw_seed$s 2>&1 | tail -1; done
date -Is
