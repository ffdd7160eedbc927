"""torchrun with 2 CPU processes (gloo): data parallel and FSDP2 training, replicas in sync, exact resume."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from causal_forcing.data.latents import write_dataset

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist") / "data"
    g = torch.Generator().manual_seed(0)
    write_dataset(folder, ((torch.randn(2, 16, 8, 8, generator=g), {"id": str(i)}, torch.randn(8, 32, generator=g))
                           for i in range(8)))
    return folder


def _torchrun(out, data, mode, steps, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "ar-diffusion", "resume" if resume else "fresh", f"data.path={data}", f"train.out_dir={out}",
           f"train.max_steps={steps}", f"train.distributed={mode}", "train.progress=false", "train.save_every=1",
           "optim.lr=1e-3", "ema.decay=0.9"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


def _digests(out):
    return [Path(out, f"digest-rank{r}.txt").read_text() for r in (0, 1)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_training_and_exact_resume(tmp_path, data, mode):
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(full, data, mode, 3)
    d_full = _digests(full)
    assert d_full[0] == d_full[1]  # both ranks hold the same full weights (replicas / gathered shards)
    _torchrun(part, data, mode, 1)
    _torchrun(part, data, mode, 3, resume=True)
    assert _digests(part) == d_full
    assert (full / "final" / "model.safetensors").exists()
