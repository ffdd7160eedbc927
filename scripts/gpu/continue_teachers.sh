#!/usr/bin/env bash
# Continue earlier ShapesWorld teachers on one lent GPU (no network there) with the CUDA-graph trainer: data →
# encode (the recipe's own steps, deterministic, so the same clips as the run that trained them) → each teacher
# resumed from its weights with a fresh warm-up and cosine learning rate. Each finished run is packed into
# OUT_DIR/RUN.tar (final_ema/, metrics, settings, summary) as soon as it exists, so whatever finished comes back
# even if a later step or the time limit cuts the command short. Needs .device/minilm.pt and .device/whl as
# scripts/gpu/teachers.sh does, and INIT_DIR holding one model folder per teacher (bidirectional/, ar_framewise/,
# ar_chunkwise/; fp16 weights travel fine: they are read into fp32 models).
#
#   scripts/gpu/continue_teachers.sh WORK_DIR OUT_DIR INIT_DIR [BUDGET_SECONDS]
#
# Runs, most important first, each given a share of the time left after the data (SECONDS_FW, SECONDS_CW,
# SECONDS_BI; SECONDS_ABS for an extra frame-wise run with the position and frame-index embeddings and the first 5
# latent frames weighted 4x, docs/results.md "the direction sign"; 0 skips a run). Then, when SECONDS_CD_FW /
# SECONDS_CD_CW are set (default 0: none), the causal CD init (Causal Forcing++) of each block size from the teacher
# just continued, with the regular trainer and configs/shapes_gpu/causal_cd.yaml (batch 32) bounded to that many
# seconds of steps. NUM_CLIPS (default 6000, the recipe's) makes a small dry run possible on a CPU.
set -uo pipefail
W=$1; O=$2; I=$3; BUDGET=${4:-530}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
source scripts/gpu/setup_data.sh   # packages, MiniLM, data → encode into $W
echo "STEP data+encode $(( $(date +%s) - T0 )) s, $(left) s left"
G="python3 -m causal_forcing.training.graphed --data $W/latents"
# pack NAME FILE...: OUT_DIR/NAME.tar with the run's final_ema/, metrics.jsonl and FILEs
pack() { local name=$1; shift
         tar -C "$W/runs" -cf "$O/$name.tar" "$name/final_ema" "$name/metrics.jsonl" "${@/#/$name/}"
         echo "STEP $name packed, $(left) s left"; }
# capped SECONDS KEEP: SECONDS, or less so that KEEP seconds of the budget are left after it
capped() { local cap=$(( $(left) - $2 )); echo $(( $1 < cap ? $1 : cap )); }
# run NAME SECONDS INIT ARGS...: at most SECONDS, and never past the budget (15 s kept for packing)
run() {
  local name=$1 secs; secs=$(capped "$2" 15); local init=$3; shift 3
  if [ "$secs" -lt 20 ]; then echo "SKIP $name ($secs s)"; return 0; fi
  $G --out "$W/runs/$name" --init "$init" --seconds "$secs" --batch 32 --warmup 100 --ema-start 0 \
     --save-every 0 "$@" && pack "$name" settings.json summary.json
}
run ar_framewise "${SECONDS_FW:-160}" "$I/ar_framewise" --block-size 1 --lr 2e-4 --min-lr 2e-5
run ar_chunkwise "${SECONDS_CW:-80}" "$I/ar_chunkwise" --block-size 3 --lr 2e-4 --min-lr 2e-5
run bidirectional "${SECONDS_BI:-60}" "$I/bidirectional" --lr 2e-4 --min-lr 2e-5
run ar_framewise_abs "${SECONDS_ABS:-9999}" "$I/ar_framewise" --block-size 1 --lr 2e-4 --min-lr 2e-5 \
    --abs-pos-freqs 4 --abs-time-frames 8 --early-frames 5 --early-weight 4
# cd_run NAME SECONDS BLOCK TEACHER: causal CD from the continued TEACHER (30 s kept for start-up and packing)
cd_run() {
  local name=$1 secs; secs=$(capped "$2" 30); local block=$3 teacher=$4
  if [ "$secs" -lt 20 ] || [ ! -d "$W/runs/$teacher/final_ema" ]; then echo "SKIP $name ($secs s)"; return 0; fi
  python3 -m causal_forcing train causal-cd --config causal_forcing/configs/shapes_gpu/causal_cd.yaml \
      "data.path=$W/latents" "train.init=$W/runs/$teacher/final_ema" "stage.block_size=$block" \
      "train.out_dir=$W/runs/$name" "train.time_limit=$secs" train.progress=false && pack "$name" config.yaml
}
cd_run causal_cd_framewise "${SECONDS_CD_FW:-0}" 1 ar_framewise
cd_run causal_cd_chunkwise "${SECONDS_CD_CW:-0}" 3 ar_chunkwise
echo "ALL DONE $(( $(date +%s) - T0 )) s"
