"""`causal-forcing export SRC --to released|folder|diffusers --out PATH [--ema]`: convert weights.

SRC is anything `load_dit_weights` reads (a training checkpoint folder `runs/x/checkpoints/step-N`, a stage's
`final/` folder, a released `.pt`, Wan or diffusers safetensors).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert model weights between layouts",
                       description=__doc__)
    p.add_argument("src", help="weights to read")
    p.add_argument("--to", required=True, choices=["released", "folder", "diffusers"],
                   help="released: .pt with generator/generator_ema; folder: this project's format; "
                        "diffusers: WanTransformer3DModel folder")
    p.add_argument("--out", required=True, help="output file (.pt) or folder")
    p.add_argument("--ema", action="store_true", help="read the EMA weights of SRC")
    p.add_argument("--net", default="generator", help="network of a training checkpoint (default generator)")
    p.set_defaults(func=run)


def read_training_checkpoint(folder: Path, net: str, ema: bool):
    """Weights and config of one network from a trainer checkpoint folder (rank-0.pt)."""
    import torch

    from ..config import ModelConfig
    from ..errors import CheckpointError
    from ..training.config import from_dict  # noqa: F401  (config dict is plain data)
    state = torch.load(folder / "rank-0.pt", map_location="cpu", weights_only=True)
    nets = state.get("nets", {})
    if net not in nets:
        raise CheckpointError(f"{folder} has no network {net!r} (has: {', '.join(nets)})")
    entry = nets[net]
    weights = entry["ema"] if ema else entry["model"]
    if weights is None:
        raise CheckpointError(f"{folder}: network {net!r} has no EMA weights yet")
    cfg = state.get("config", {}).get("model", {})
    from ..config import model_preset
    base = model_preset(cfg.get("preset", "tiny")).to_dict()
    config = ModelConfig.from_dict({**base, **cfg.get("overrides", {})})
    return {k: v.float() for k, v in weights.items()}, config


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import load_dit_weights, save_diffusers_folder, save_model_folder, save_released_pt
    from ..errors import InputError
    src = Path(args.src)
    if (src / "rank-0.pt").exists():
        state, config = read_training_checkpoint(src, args.net, args.ema)
    else:
        state, config = load_dit_weights(src, ema=args.ema)
    if args.to == "released":
        if not args.out.endswith(".pt"):
            raise InputError("--to released writes a .pt file; give --out NAME.pt")
        key = "generator_ema" if args.ema else "generator"
        out = save_released_pt(args.out, **{key: state})
    else:
        if config is None:
            raise InputError(f"{src} carries no model config; export it to a folder from a source that has one")
        out = (save_model_folder(state, config, args.out) if args.to == "folder"
               else save_diffusers_folder(state, config, args.out))
    print(f"wrote {out}")
    return 0
