"""`causal-forcing eval shapes`: score videos with the ShapesBench judge.
`causal-forcing eval model`: generate the clips of a ShapesBench manifest with a DiT checkpoint (a few-step
causal student, or a many-step AR / bidirectional teacher with CFG) and score them in memory."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..data.shapes_io import MANIFEST_NAME, atomic_open
from ..eval import shapesbench

_COLUMNS = (("n", "n"), ("color", "color"), ("shape", "shape"), ("size", "size"), ("motion", "motion"),
            ("semantic", "semantic"), ("cleanliness", "clean"), ("consistency", "consist"),
            ("smoothness", "smooth"), ("quality", "quality"), ("total", "total"), ("all_correct", "all_ok"),
            ("speed_ratio", "speed"), ("motion_axis", "axis"))
_SPLITS = (("in_distribution", "in-distribution"), ("held_out", "held-out"), ("all", "all"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its `shapes` sub-command."""
    ev = subparsers.add_parser("eval", help="score generated videos", description="Score generated videos.")
    benches = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benches.required = True
    p = benches.add_parser(
        "shapes", help=f"ShapesBench ({shapesbench.JUDGE_VERSION})",
        description=f"Score .mp4/.npz/.npy videos with ShapesBench ({shapesbench.JUDGE_VERSION}). Prints a "
                    "table and, last, one JSON line with in-distribution and held-out totals.")
    p.add_argument("--videos", required=True, metavar="DIR", help="directory with the videos")
    p.add_argument("--manifest", default=None, metavar="FILE",
                   help=f"JSONL with 'file' and 'caption' per line (default DIR/{MANIFEST_NAME}); a video "
                        "matches an entry by name, or by stem with any of .mp4/.npz/.npy")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report (per clip) here")
    p.set_defaults(func=run_shapes)

    m = benches.add_parser(
        "model", help="generate a ShapesBench prompt set with a DiT checkpoint and score it",
        description="Generate one clip per manifest prompt with a DiT (a folder with config.json and weights, "
                    "e.g. a run's final_ema/) and score it with ShapesBench; prints the table and a final JSON "
                    "line. Few-step causal students use the streaming sampler; teachers the many-step CFG samplers.")
    m.add_argument("--weights", required=True, metavar="DIR", help="DiT model folder (config.json + weights)")
    m.add_argument("--kind", required=True, choices=("causal", "autoregressive", "bidirectional"),
                   help="causal = few-step student; autoregressive / bidirectional = many-step teachers")
    m.add_argument("--manifest", required=True, metavar="FILE", help="ShapesBench manifest (JSONL with 'caption')")
    m.add_argument("--vae", default="shapes", metavar="DIR",
                   help="VAE: 'shapes' (the bundled ShapesWorld VAE, default) or a VAE folder")
    m.add_argument("--block-size", type=int, default=1, help="latent frames per block (causal kinds; default 1)")
    m.add_argument("--steps", type=int, default=4, choices=(1, 2, 4),
                   help="few-step list of a causal student (the released 1/2/4-step lists; default 4)")
    m.add_argument("--teacher-steps", type=int, default=20, help="sampling steps of a teacher (default 20)")
    m.add_argument("--guidance", type=float, default=4.0, help="CFG scale of a teacher (default 4)")
    m.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    m.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    m.add_argument("--batch-size", type=int, default=25, help="prompts generated together (default 25)")
    m.add_argument("--out", default=None, metavar="DIR", help="write scores.json and the first clips as MP4 here")
    m.add_argument("--save-videos", type=int, default=8, metavar="N", help="clips written to --out (default 8)")
    m.add_argument("--device", default="cpu", help="where to generate: cpu (default), cuda, cuda:N")
    m.add_argument("--first-frame", default=None, metavar="DIR",
                   help="causal kind: a model folder that makes latent frame 0 (--teacher-steps, --guidance); "
                        "default: the first-frame model named by the pipeline.json in --weights, if any")
    m.add_argument("--first-frame-frames", type=int, default=None, metavar="N",
                   help="causal kind: latent frames the first-frame model makes before the student takes over "
                        "(default: pipeline.json's, else 1)")
    m.add_argument("--first-frame-refine", type=int, default=None, metavar="N",
                   help="causal kind: the student re-draws the first-frame model's frames through its last N steps "
                        "(default: pipeline.json's, else 0)")
    m.add_argument("--first-frame-text", choices=("minilm", "minilm-clauses"), default=None, metavar="KIND",
                   help="causal kind: the first-frame model's own text encoder, minilm or minilm-clauses "
                        "(default: pipeline.json's, else the student's embeddings)")
    m.add_argument("--first-frame-prefix", default=None, metavar="DIR",
                   help="causal kind: a model folder that makes latent frames 1..N-1 after the first-frame model's "
                        "frame 0 (N from --first-frame-frames)")
    m.add_argument("--first-frame-prefix-text", choices=("minilm", "minilm-clauses"), default=None, metavar="KIND",
                   help="causal kind: the prefix model's own text encoder (default: the student's embeddings)")
    m.add_argument("--first-frame-guidance", type=float, default=None, metavar="G",
                   help="causal kind: the first-frame model's CFG scale (default: pipeline.json's, else --guidance)")
    m.add_argument("--first-frame-prefix-guidance", type=float, default=None, metavar="G",
                   help="causal kind: the prefix model's CFG scale (default: pipeline.json's, else the first-frame "
                        "model's)")
    m.add_argument("--first-frame-candidates", type=int, default=None, metavar="N",
                   help="causal kind: frame-0 candidates per prompt, the matcher keeps the best (default: "
                        "pipeline.json's, else 1; > 1 needs a matcher)")
    m.add_argument("--first-frame-matcher", default=None, metavar="DIR",
                   help="causal kind: the text-frame matcher folder that chooses among the candidates "
                        "(default: pipeline.json's)")
    m.add_argument("--first-frame-compose", choices=("objects", "none"), default=None,
                   help="causal kind: 'objects' assembles frame 0 of a multi-clause prompt object by object (the "
                        "whole caption's sample places them, each clause's own sample draws them; needs "
                        "--first-frame-text), 'none' keeps it as sampled (default: pipeline.json's)")
    m.add_argument("--first-frame-layout", default=None, metavar="DIR",
                   help="causal kind: a layout model folder that places the assembled objects ('none': the "
                        "whole prompt's sample places them; default: pipeline.json's)")
    m.add_argument("--first-frame-layout-sharpness", type=float, default=None, metavar="S",
                   help="causal kind: the layout model's sharpness (1: its learned distribution; default: "
                        "pipeline.json's)")
    m.add_argument("--first-frame-compose-candidates", type=int, default=None, metavar="N",
                   help="causal kind: samples of each clause for --first-frame-compose objects (the first with an "
                        "object is drawn; default: pipeline.json's)")
    m.add_argument("--first-frame-compose-layouts", type=int, default=None, metavar="N",
                   help="causal kind: samples of the whole prompt tried in turn as the layout for "
                        "--first-frame-compose objects (default: pipeline.json's)")
    m.add_argument("--first-frame-compose-prefix", choices=("on", "off"), default=None,
                   help="causal kind: 'on' also continues an assembled frame 0 object by object (each object alone "
                        "with its own clause, the clips painted together) for the rest of the prefix (default: "
                        "pipeline.json's)")
    m.add_argument("--no-first-frame", action="store_true",
                   help="causal kind: the student makes frame 0 too, even if --weights names a first-frame model")
    m.set_defaults(func=run_model)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def format_table(report: dict) -> str:
    """Totals of a ShapesBench report as a fixed-width text table."""
    widths = [max(len(title), 6) for _, title in _COLUMNS]
    lines = ["split".ljust(16) + " ".join(t.rjust(w) for (_, t), w in zip(_COLUMNS, widths))]
    for key, name in _SPLITS:
        totals = report[key]
        lines.append(name.ljust(16) + " ".join(_cell(totals[k]).rjust(w) for (k, _), w in zip(_COLUMNS, widths)))
    return "\n".join(lines)


def _print_report(report: dict, **extra: object) -> None:
    """The table, the per-clip errors and, last, one JSON line with the headline numbers (+ ``extra``)."""
    print(format_table(report))
    for err in report["errors"]:
        print(f"error: {err['file']}: {err['error']}")
    print(json.dumps({"judge": report["judge"], "world": report["world"], **extra,
                      "in_distribution": report["in_distribution"], "held_out": report["held_out"],
                      "n_errors": report["n_errors"]}))


def run_shapes(args: argparse.Namespace) -> int:
    """Score the videos, print the table, errors and the final JSON line; optionally write the full report."""
    report = shapesbench.score_videos(args.videos, args.manifest)
    if report["unmatched_files"]:
        print(f"note: {len(report['unmatched_files'])} video file(s) not in the manifest were ignored")
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    _print_report(report)
    return 0


def _first_frame(args: argparse.Namespace, device: Any, vae: Any = None) -> Any:
    """The first-frame sampler for ``eval model``: --first-frame, else the one --weights' pipeline.json names,
    with the --first-frame-* overrides."""
    from pathlib import Path

    from ..errors import ConfigError, InputError
    from ..eval.models import load_model_folder
    from ..pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from ..pipelines.loading import PIPELINE_FILE, read_pipeline_spec

    prefix_path = None if args.first_frame_prefix is None else str(Path(args.first_frame_prefix).resolve())
    matcher_path = None if args.first_frame_matcher is None else str(Path(args.first_frame_matcher).resolve())
    overrides = {"candidates": args.first_frame_candidates, "matcher_path": matcher_path,
                 "frames": args.first_frame_frames, "text_encoder": args.first_frame_text,
                 "refine_steps": args.first_frame_refine, "prefix_path": prefix_path,  # not relative to --weights
                 "prefix_text_encoder": args.first_frame_prefix_text, "guidance": args.first_frame_guidance,
                 "prefix_guidance": args.first_frame_prefix_guidance,
                 "compose_candidates": args.first_frame_compose_candidates,
                 "compose_layouts": args.first_frame_compose_layouts,
                 "layout_sharpness": args.first_frame_layout_sharpness,
                 "compose_prefix": None if args.first_frame_compose_prefix is None
                 else args.first_frame_compose_prefix == "on"}
    compose, layout = args.first_frame_compose, args.first_frame_layout
    if args.no_first_frame:
        if compose is not None or layout is not None:
            raise InputError("--first-frame-compose excludes --no-first-frame")
        if args.first_frame is not None or any(v is not None for v in overrides.values()):
            raise InputError("--first-frame and its --first-frame-* options exclude --no-first-frame")
        return None
    if args.first_frame_frames is not None and args.first_frame_frames < 1:
        raise InputError(f"--first-frame-frames must be positive, got {args.first_frame_frames}")
    if args.first_frame is not None:
        root, spec = Path("."), FirstFrameSpec(args.first_frame, args.teacher_steps, args.guidance)
    elif (Path(args.weights) / PIPELINE_FILE).is_file():
        root, spec = Path(args.weights), read_pipeline_spec(args.weights).first_frame  # type: ignore[assignment]
        if spec is None:
            return None
    else:
        return None
    if compose is not None:
        overrides["compose"] = None if compose == "none" else compose
        if compose == "none" and overrides["compose_prefix"] is None:
            overrides["compose_prefix"] = False          # nothing assembled, nothing to continue by object
        if compose == "none" and layout is None:
            layout = "none"                              # nothing assembled, nothing to place
    if layout is not None:
        overrides["layout_path"] = None if layout == "none" else str(Path(layout).resolve())
    try:
        spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items()
                                            if v is not None or (k == "compose" and compose is not None)
                                            or (k == "layout_path" and layout is not None)})
    except ConfigError as e:
        raise InputError(str(e)) from None
    if args.kind != "causal":
        if args.first_frame is not None:
            raise InputError("--first-frame applies to --kind causal only")
        return None

    def load(rel: str, kind: str | None) -> tuple[Any, Any]:
        folder = root / rel
        if not folder.is_dir():
            raise InputError(f"first-frame model folder not found: {folder}")
        model = load_model_folder(folder).to(device)
        if kind is None:
            return model, None
        from ..models.text import build_text_encoder
        return model, build_text_encoder(kind, text_len=model.config.text_len)

    model, text = load(spec.path, spec.text_encoder)
    prefix, prefix_text = (None, None) if spec.prefix_path is None else load(spec.prefix_path,
                                                                              spec.prefix_text_encoder)
    matcher = None
    if spec.matcher_path is not None:
        from ..models.matcher import load_matcher
        matcher = load_matcher(root / spec.matcher_path)
    layout_model = None
    if spec.layout_path is not None:
        from ..models.layout import load_layout_model
        layout_model = load_layout_model(root / spec.layout_path)
    try:
        return FirstFrameSampler(model, spec, text, prefix_model=prefix, prefix_text_encoder=prefix_text,
                                 matcher=matcher, vae=vae if spec.compose is not None else None,
                                 layout_model=layout_model)
    except ConfigError as e:
        raise InputError(str(e)) from None


def _student_text_encoder(weights: str, text_len: int, device: Any) -> Any:
    """The text encoder of the model under evaluation: the one --weights' pipeline.json names, else MiniLM (what
    every ShapesWorld model here reads)."""
    from pathlib import Path

    from ..errors import InputError
    from ..models.text import build_text_encoder
    from ..pipelines.loading import PIPELINE_FILE, read_pipeline_spec

    kind, path = "minilm", None
    if (Path(weights) / PIPELINE_FILE).is_file():
        spec = read_pipeline_spec(weights).text_encoder
        kind, path = spec.kind, None if spec.path is None else str(Path(weights) / spec.path)
    if kind == "umt5":
        raise InputError(f"{weights}: eval model runs ShapesWorld models, whose text encoder is MiniLM; its "
                         "pipeline.json names umt5")
    return build_text_encoder(kind, text_len=text_len, device=str(device),
                              **({} if path is None else {"model_path": path}))


def run_model(args: argparse.Namespace) -> int:
    """Generate and judge the manifest's prompts with one checkpoint; print the table and a final JSON line."""
    from ..errors import InputError
    from ..eval.models import EvalSettings, evaluate, load_model_folder
    from ..models.small_vae import load_vae
    from ..pipelines.loading import RELEASED_STEPS

    for name, value, low in (("--block-size", args.block_size, 1), ("--teacher-steps", args.teacher_steps, 1),
                             ("--batch-size", args.batch_size, 1),
                             ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    import torch
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"--device: not a device: {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    model = load_model_folder(args.weights).to(device)
    vae = load_vae(args.vae, device=device)
    first_frame = _first_frame(args, device, vae)
    text = _student_text_encoder(args.weights, model.config.text_len, device)
    every, first = RELEASED_STEPS[args.steps]
    settings = EvalSettings(kind=args.kind, block_size=args.block_size, steps=every, first_block_steps=first,
                            teacher_steps=args.teacher_steps, guidance=args.guidance, seed=args.seed,
                            batch_size=args.batch_size, save_videos=args.save_videos, first_frame=first_frame)
    report = evaluate(model, vae, text, args.manifest, settings, out_dir=args.out, limit=args.limit, progress=True)
    _print_report(report, kind=args.kind, seconds=round(report["seconds"], 1))
    return 0
