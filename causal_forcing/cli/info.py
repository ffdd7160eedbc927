"""`causal-forcing info`: what a checkpoint file or model folder is, read as lazily as possible.

Recognised: released Causal Forcing / Self Forcing ``.pt`` training checkpoints (``generator`` /
``generator_ema``), plain ``.pt``/``.pth`` state dicts, single and sharded safetensors in the Wan or diffusers
layout, diffusers ``WanTransformer3DModel`` (and pipeline) folders, official Wan2.1 folders, this project's model
folders (``config.json`` + ``model.safetensors``) and pipeline folders (plus ``pipeline.json`` and ``vae/``), and
bundled model names. Safetensors are described from their headers only; ``.pt`` files are memory-mapped, so
tensor data is not read.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ..checkpoints import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    OUR_WEIGHTS_NAME,
    convert_layout,
    detect_layout,
    read_model_config,
    read_torch_file,
    strip_wrapper_prefixes,
)
from ..config import PRESETS, ModelConfig
from ..errors import CheckpointError, InputError
from ..pipelines.loading import BUNDLED, PIPELINE_FILE, bundled_folder, read_pipeline_spec

Shapes = dict[str, tuple[int, ...]]

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# Fields that tensor shapes determine; num_heads (qk-norm spans all heads) and text_len leave no trace.
_INFERABLE = ("patch_size", "in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "num_layers", "qk_norm",
              "cross_attn_norm", "abs_pos_freqs", "abs_time_frames")
_WAN_BASE_FILES = ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth")


# ---------------------------------------------------------------------------------------------------------------
# Reading shapes without data
# ---------------------------------------------------------------------------------------------------------------
def safetensors_header(path: Path) -> tuple[Shapes, set[str]]:
    """Tensor shapes and dtype names of a safetensors file, from its header."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes, dtypes = {}, set()
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = tuple(tensor.get_shape())
                dtypes.add(_SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype()))
    except Exception as e:  # SafetensorError for bad headers / truncation, OSError for I/O
        raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors): {str(e).splitlines()[0]}") \
            from None
    return shapes, dtypes


def sharded_header(index: Path) -> tuple[Shapes, set[str], int]:
    """Shapes and dtypes of a sharded checkpoint (every shard's header), and the number of shards."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map'): {e}") from None
    shapes: Shapes = {}
    dtypes: set[str] = set()
    for name in shard_names:
        s, d = safetensors_header(index.parent / name)
        shapes.update(s)
        dtypes |= d
    return shapes, dtypes, len(shard_names)


def _tensor_shapes(state: Mapping[str, Any], source: str) -> tuple[Shapes, set[str]]:
    shapes, dtypes = {}, set()
    for key, value in state.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        shapes[key] = tuple(value.shape)
        dtypes.add(str(value.dtype).removeprefix("torch."))
    return shapes, dtypes


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------
def wan_shapes(shapes: Shapes, source: str) -> tuple[Shapes, str]:
    """Shapes renamed to the Wan layout (wrapper prefixes removed) and the layout the file uses."""
    stripped = strip_wrapper_prefixes(shapes)  # type: ignore[arg-type]
    try:
        layout = detect_layout(stripped)
        return convert_layout(stripped, "wan"), layout  # type: ignore[arg-type, return-value]
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def infer_architecture(shapes: Shapes) -> dict[str, Any]:
    """The ModelConfig fields that a Wan-layout state dict's shapes determine."""
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]
        layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
        return {
            "patch_size": tuple(patch),
            "in_dim": in_dim,
            "out_dim": shapes["head.head.weight"][0] // math.prod(patch),
            "dim": dim,
            "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
            "freq_dim": shapes["time_embedding.0.weight"][1],
            "text_dim": shapes["text_embedding.0.weight"][1],
            "num_layers": max(layers) + 1,
            "qk_norm": "blocks.0.self_attn.norm_q.weight" in shapes,
            "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
            "abs_pos_freqs": shapes["pos_embedding.weight"][1] // 4 if "pos_embedding.weight" in shapes else 0,
            "abs_time_frames": shapes["frame_embedding.weight"][0] if "frame_embedding.weight" in shapes else 0,
        }
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a complete Wan DiT state dict (missing {e})") from None


def matching_presets(fields: Mapping[str, Any]) -> list[str]:
    """Model presets whose config agrees with every given field."""
    return [name for name, preset in PRESETS.items()
            if all(getattr(preset, k) == (tuple(v) if isinstance(v, list) else v) for k, v in fields.items())]


def _architecture(shapes: Shapes, config: ModelConfig | None, *, text_len_known: bool = True) -> dict[str, Any]:
    inferred = infer_architecture(shapes)
    if config is None:
        return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in inferred.items()},
                "config_source": "tensor shapes (num_heads and text_len are not stored)",
                "preset": ", ".join(matching_presets(inferred)) or None}
    d = config.to_dict()
    mismatched = [k for k in _INFERABLE if inferred[k] != getattr(config, k)]
    if mismatched:
        raise CheckpointError(f"config.json disagrees with the weights on {mismatched[0]} "
                              f"(config {getattr(config, mismatched[0])}, weights {inferred[mismatched[0]]})")
    compared = {k: v for k, v in d.items() if text_len_known or k != "text_len"}
    return {"config": d, "config_source": CONFIG_NAME if text_len_known else f"{CONFIG_NAME} (diffusers: no text_len)",
            "preset": ", ".join(matching_presets(compared)) or None}


# ---------------------------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------------------------
def _weights_info(shapes: Shapes, dtypes: set[str], source: str, config: ModelConfig | None = None,
                  *, text_len_known: bool = True) -> dict[str, Any]:
    wan, layout = wan_shapes(shapes, source)
    return {"key_layout": layout, "parameters": sum(math.prod(s) for s in wan.values()),
            "dtype": ", ".join(sorted(dtypes)), **_architecture(wan, config, text_len_known=text_len_known)}


def describe_torch_file(path: Path) -> dict[str, Any]:
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    sets = [k for k in ("generator", "generator_ema", "model") if k in checkpoint]
    if not sets:
        shapes, dtypes = _tensor_shapes(checkpoint, str(path))
        return {"format": "plain state dict (.pt)", "ema": False, **_weights_info(shapes, dtypes, str(path))}
    main = "generator_ema" if "generator_ema" in sets else sets[0]
    entry = checkpoint[main]
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{path}[{main!r}]: expected a state dict, found {type(entry).__name__}")
    shapes, dtypes = _tensor_shapes(entry, f"{path}[{main!r}]")
    return {"format": "released training checkpoint (.pt)", "entries": list(checkpoint), "weight_sets": sets,
            "ema": "generator_ema" in sets, "described_set": main,
            **_weights_info(shapes, dtypes, f"{path}[{main!r}]")}


def describe_safetensors(path: Path) -> dict[str, Any]:
    if path.name.endswith(".index.json"):
        shapes, dtypes, shards = sharded_header(path)
        info = _weights_info(shapes, dtypes, str(path))
        return {"format": f"sharded safetensors ({shards} shards, {info['key_layout']} layout)", "ema": False, **info}
    shapes, dtypes = safetensors_header(path)
    info = _weights_info(shapes, dtypes, str(path))
    return {"format": f"safetensors ({info['key_layout']} layout)", "ema": False, **info}


def _weights_in_folder(folder: Path) -> Path:
    for name in (OUR_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME + ".index.json",
                 OUR_WEIGHTS_NAME + ".index.json"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise CheckpointError(f"{folder}: {'no' if not found else 'several'} candidate weight files "
                              "(*.safetensors or *.safetensors.index.json)")
    return found[0]


def describe_folder(folder: Path) -> dict[str, Any]:
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        info = describe_folder(folder / "transformer")
        return {**info, "format": f"diffusers pipeline folder ({info['format']} in transformer/)"}
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} is not a model folder (no {CONFIG_NAME})")
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None  # read_model_config names the problem
    if isinstance(raw, dict) and raw.get("_class_name") == "AutoencoderKLWan":
        raise CheckpointError(f"{folder} is a Wan VAE folder (AutoencoderKLWan), not a DiT")
    config = read_model_config(folder / CONFIG_NAME)
    diffusers = raw.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in raw
    weights = _weights_in_folder(folder)
    if weights.name.endswith(".index.json"):
        shapes, dtypes, shards = sharded_header(weights)
        sharding = f", {shards} shards"
    else:
        (shapes, dtypes), sharding = safetensors_header(weights), ""
    info = _weights_info(shapes, dtypes, str(weights), config, text_len_known=not diffusers)
    if (folder / PIPELINE_FILE).is_file():
        spec = read_pipeline_spec(folder)
        kind = "pipeline folder (this project's format)"
        first = spec.first_block_steps
        info["pipeline"] = {"block_size": spec.block_size, "steps": list(spec.steps),
                            "first_block_steps": None if first is None else list(first),
                            "latent_hw": list(spec.latent_hw), "num_frames": spec.num_frames, "fps": spec.fps,
                            "text_encoder": f"{spec.text_encoder.kind} (text_len {spec.text_encoder.text_len})",
                            "vae": f"{spec.vae.kind} ({spec.vae.path})"}
        if spec.first_frame is not None:
            ff = spec.first_frame
            info["pipeline"]["first_frame"] = (f"{ff.path} ({ff.steps} {ff.solver} steps, guidance {ff.guidance:g}, "
                                               f"shift {ff.shift:g}, {ff.frames} frame{'s' if ff.frames > 1 else ''}"
                                               + (f", text {ff.text_encoder}" if ff.text_encoder else "")
                                               + (f", frames 1+ by {ff.prefix_path}" if ff.prefix_path else "")
                                               + (f" (text {ff.prefix_text_encoder})" if ff.prefix_text_encoder else "")
                                               + (f" (guidance {ff.prefix_guidance:g})" if ff.prefix_guidance else "")
                                               + (f", refined {ff.refine_steps} steps" if ff.refine_steps else "")
                                               + (f", best of {ff.candidates} by {ff.matcher_path}"
                                                  if ff.candidates > 1 else "")
                                               + (f", frame 0 assembled by {ff.compose} ({ff.compose_candidates} "
                                                  f"sample{'s' if ff.compose_candidates > 1 else ''} per clause, "
                                                  f"{ff.compose_layouts} layout"
                                                  f"{'s' if ff.compose_layouts > 1 else ''}"
                                                  f"{', prefix too' if ff.compose_prefix else ''})"
                                                  if ff.compose else "")
                                               + (f", objects placed by {ff.layout_path} (sharpness "
                                                  f"{ff.layout_sharpness:g})" if ff.layout_path else "")
                                               + ")")
    elif diffusers:
        kind = "diffusers WanTransformer3DModel folder"
    elif any((folder / name).is_file() for name in _WAN_BASE_FILES):
        kind = "official Wan2.1 folder (DiT, VAE, T5)"
    elif weights.name.startswith(OUR_WEIGHTS_NAME):
        kind = "model folder (this project's format)"
    else:
        kind = "Wan model folder"
    return {"format": f"{kind}{sharding}, weights {weights.name}", "ema": False, **info}


def describe(target: str) -> dict[str, Any]:
    """Everything ``info`` prints about a file, a folder or a bundled model name."""
    path = Path(target)
    info: dict[str, Any] = {"path": str(path)}
    if not path.exists():
        if target in BUNDLED:
            path = bundled_folder(target)
            info = {"path": str(path), "bundled": target}
        else:
            available = ", ".join(sorted(BUNDLED)) or "none in this build"
            raise InputError(f"no such file or folder: {target} (bundled models: {available})")
    name = path.name.lower()
    if path.is_dir():
        info.update(describe_folder(path))
    elif name.endswith((".safetensors", ".safetensors.index.json")):
        info.update(describe_safetensors(path))
    elif name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        info.update(describe_torch_file(path))
    else:
        raise CheckpointError(f"unrecognised file type: {path} (expected .pt, .pth, .safetensors, "
                              ".safetensors.index.json or a folder)")
    return info


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` command."""
    p = subparsers.add_parser(
        "info", help="describe a checkpoint or model folder",
        description="Say what a checkpoint file or model folder is: format, key layout, parameter count, EMA "
                    "weights, dtype, architecture and the matching model preset. Reads headers only where it can.")
    p.add_argument("path", metavar="PATH", help="a .pt/.pth/.safetensors file, a shard index, a folder or a "
                                                "bundled model name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def format_info(info: Mapping[str, Any]) -> str:
    """Aligned ``key  value`` lines."""
    config = info["config"]
    arch = (f"dim {config['dim']}, {config['num_layers']} layers, ffn {config['ffn_dim']}, "
            f"text_dim {config['text_dim']}, freq_dim {config['freq_dim']}, "
            f"patch {'x'.join(map(str, config['patch_size']))}")
    if "num_heads" in config:
        arch += f", {config['num_heads']} heads, text_len {config['text_len']}"
    rows = [("path", info["path"]), ("format", info["format"])]
    if "bundled" in info:
        rows.append(("bundled as", info["bundled"]))
    if "entries" in info:
        rows.append(("entries", ", ".join(map(str, info["entries"]))))
    rows += [("key layout", info["key_layout"]),
             ("EMA weights", "yes (generator_ema)" if info["ema"] else "no"),
             ("parameters", f"{info['parameters']:,}" + (f" (in {info['described_set']})" if "described_set" in info
                                                          else "")),
             ("dtype", info["dtype"]),
             ("architecture", f"{arch} (from {info['config_source']})"),
             ("preset", info["preset"] or "none")]
    for key, value in info.get("pipeline", {}).items():
        rows.append((key.replace("_", " "), str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
