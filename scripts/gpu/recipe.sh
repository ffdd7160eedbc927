#!/usr/bin/env bash
# The frame-wise ShapesWorld recipe on one lent GPU (no network there): data → encode → teacher → AR teacher →
# causal ODE data → causal ODE init → DMD, with the stage sizes of configs/shapes_gpu (wall-clock bounded, about
# 9 minutes on an H100). Each finished run's final_ema + metrics is packed into OUT_DIR/RUN.tar as soon as it
# exists, so whatever finished comes back even if a later step fails. Needs .device/minilm.pt from
# `python scripts/gpu/minilm_transport.py pack .device/minilm.pt MANIFEST...` (MiniLM is not installed there).
#
#   scripts/gpu/recipe.sh WORK_DIR OUT_DIR [CONFIG_DIR] [NUM_CLIPS]
set -uo pipefail
W=$1; O=$2; CFG=${3:-causal_forcing/configs/shapes_gpu}; N=${4:-6000}
export PYTHONUNBUFFERED=1
if [ -d .device/whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cf_site .device/whl/*.whl || exit 1; fi
python3 scripts/gpu/minilm_transport.py unpack .device/minilm.pt /tmp/cf_site || exit 1
export PYTHONPATH=/tmp/cf_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
R="python3 -m causal_forcing recipe shapes --out $W --configs $CFG --num-clips $N --workers $(nproc)"
t0=$(date +%s)
$R --until data && python3 scripts/gpu/minilm_transport.py check /tmp/cf_site "$W/data/train/manifest.jsonl" || exit 1
$R --until encode || exit 1
echo "STEP data+encode $(( $(date +%s) - t0 )) s"
for pair in bidirectional-short:bidirectional_short bidirectional:bidirectional ar-framewise:ar_framewise \
            ode-causal-framewise: causal_ode_framewise:causal_ode_framewise \
            dmd_causal_ode_framewise:dmd_causal_ode_framewise; do
  step=${pair%%:*}; run=${pair#*:}; t0=$(date +%s)
  $R --only "$step" || { echo "FAILED $step"; exit 1; }
  echo "STEP $step $(( $(date +%s) - t0 )) s"
  [ -n "$run" ] && tar -C "$W/runs" -cf "$O/$run.tar" "$run/final_ema" "$run/metrics.jsonl" "$run/config.yaml"
done
echo "ALL DONE"
