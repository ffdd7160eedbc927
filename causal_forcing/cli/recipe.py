"""`causal-forcing recipe shapes --out DIR`: the whole ShapesWorld pipeline, resumable step by step."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="run a full training recipe (resumable)")
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE")
    recipes.required = True
    s = recipes.add_parser("shapes", help="ShapesWorld: data, VAE, teachers, inits, DMD, evaluation")
    s.add_argument("--out", required=True, help="work folder (created; steps whose output exists are skipped)")
    s.add_argument("--only", nargs="*", default=None, metavar="STEP",
                   help="run only these steps (in the plan's order, whatever order they are given in)")
    s.add_argument("--until", default=None, metavar="STEP", help="stop after this step")
    s.add_argument("--num-clips", type=int, default=6000)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seeds", type=int, default=3,
                   help="sampling seeds of the 4-step DMD students; other models are evaluated once")
    s.add_argument("--train-seeds", type=int, default=1,
                   help="DMD runs (training seeds) of the two key-comparison students, causal vs Self Forcing init; "
                        "1 keeps the ~6 h CPU budget (the comparison is then over --seeds sampling seeds), 3 adds "
                        "four DMD runs (~1 h with --jobs 2)")
    s.add_argument("--jobs", type=int, default=1,
                   help="steps run side by side, each in its own process with cores/jobs threads (default 1)")
    s.add_argument("--quick", action="store_true",
                   help="tiny step counts and 4 evaluation prompts: checks the wiring in minutes, "
                        "trains nothing useful")
    s.add_argument("--configs", default=None, metavar="DIR",
                   help="folder of stage configs (default: the package's configs/shapes, sized for 2 CPU cores; "
                        "configs/shapes_gpu sizes the stages for one GPU)")
    s.add_argument("--graphed-teachers", action="store_true",
                   help="train the teachers (bidirectional, AR) with the CUDA-graph trainer, for one GPU "
                        "(python -m causal_forcing.training.graphed; use with --configs configs/shapes_gpu)")
    s.add_argument("--list", action="store_true", help="list the steps and whether they are done")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..recipes.shapes import ShapesRecipe
    if min(args.num_clips, args.workers, args.seeds, args.train_seeds, args.jobs) < 1:
        raise InputError("--num-clips, --workers, --seeds, --train-seeds and --jobs must be >= 1")
    recipe = ShapesRecipe(args.out, num_clips=args.num_clips, workers=args.workers, seeds=args.seeds,
                          train_seeds=args.train_seeds, quick=args.quick,
                          configs=args.configs, graphed_teachers=args.graphed_teachers)
    if args.list:
        for step in recipe.steps:
            print(f"{'done' if step.output.exists() else '    '}  {step.name:<34} {step.output}")
        return 0
    recipe.run(args.only, args.until, log=lambda m: print(m, flush=True), jobs=args.jobs)
    return 0
