"""Run by tests/test_distributed.py under torchrun: one training stage, then every rank records a digest of
its full weights so the test can check that replicas agree."""
import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from causal_forcing.training import load_stage_config, stage_module
from causal_forcing.training.trainer import Trainer


def main() -> None:
    stage, resume, overrides = sys.argv[1], sys.argv[2] == "resume", sys.argv[3:]
    torch.set_num_threads(1)
    cfg = load_stage_config(stage, None, overrides)
    trainer = Trainer(cfg, stage_module(stage).Stage(), resume=resume)
    trainer.run()
    weights = trainer.full_weights("generator")
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    Path(cfg.train.out_dir, f"digest-rank{trainer.dist.rank}.txt").write_text(digest)
    dist.barrier()  # no rank tears the group down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
