"""`causal-forcing train STAGE --config FILE.yaml [key=value ...] [--resume]`."""
from __future__ import annotations

import argparse

from ..training import STAGES


def register(sub: argparse._SubParsersAction) -> None:
    stages = "\n".join(f"  {name:<14} {desc}" for name, (_, desc) in STAGES.items())
    p = sub.add_parser("train", help="run a training stage",
                       description=f"Run one training stage.\n\nstages:\n{stages}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES), metavar="STAGE", help="one of: " + ", ".join(STAGES))
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-5")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import load_stage_config, run_stage
    if args.check:
        load_stage_config(args.stage, args.config, args.overrides)
        print("config ok")
        return 0
    out = run_stage(args.stage, args.config, args.overrides, resume=args.resume)
    print(f"done: {out}")
    return 0
