# Sourced by the scripts in scripts/gpu/: make the CLI importable on a bare lent GPU machine (no network there),
# then run the recipe's data → eval-data → vae → encode steps into work folder $W (deterministic, so the same clips
# as any other run with the same NUM_CLIPS). Needs .device/minilm.pt from `python scripts/gpu/minilm_transport.py
# pack .device/minilm.pt TRAIN_MANIFEST EVAL_MANIFEST` (MiniLM is not installed there) and diffusers' wheel in
# .device/whl. Sets PYTHONPATH; exits the calling script on failure.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .device/whl ]; then   # diffusers (imported by the CLI) is not installed there either
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cf_site .device/whl/*.whl || exit 1
fi
python3 scripts/gpu/minilm_transport.py unpack .device/minilm.pt /tmp/cf_site || exit 1
export PYTHONPATH=/tmp/cf_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
R="python3 -m causal_forcing recipe shapes --out $W --num-clips ${NUM_CLIPS:-6000} --workers $(nproc)"
$R --until data || exit 1
python3 scripts/gpu/minilm_transport.py check /tmp/cf_site "$W/data/train/manifest.jsonl" || exit 1
$R --until encode || exit 1
