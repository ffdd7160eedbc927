"""Reading, converting, loading and writing Wan DiT weights.

Every loader returns a state dict in the *original Wan layout* (the parameter names of `WanDiT`, e.g.
`blocks.0.self_attn.q.weight`). Supported inputs:

- released Causal Forcing / Self Forcing `.pt` files: a dict with `generator` and/or `generator_ema` (sometimes
  `model`), keys prefixed `model.` or `model._fsdp_wrapped_module.`;
- plain `.pt` / `.pth` state dicts (always read with `weights_only=True`, never arbitrary pickles);
- single or sharded (`*.safetensors.index.json` with a `weight_map`) safetensors, in the Wan or diffusers layout;
- folders: a diffusers `WanTransformer3DModel` folder (or a diffusers pipeline folder with `transformer/`),
  an official Wan folder, or this project's format (`config.json` with our `ModelConfig` + `model.safetensors`).

The Wan <-> diffusers key map is the data table `WAN_DIFFUSERS_RENAMES`. Every write is atomic: a temporary file in
the destination directory is written, flushed, fsynced and then renamed over the destination.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError

Layout = Literal["wan", "diffusers"]
StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------------
# Key map between the original Wan layout and diffusers' WanTransformer3DModel (T2V models).
# Each row maps a module (or bare parameter) path; `{i}` stands for a block index. A state dict key matches a row
# when it equals the path, optionally followed by `.weight` or `.bias`.
# ---------------------------------------------------------------------------------------------------------------
WAN_DIFFUSERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
    ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
    # Wan's affine pre-cross-attention norm is `norm3`; diffusers calls it `norm2` (its other norms have no weights).
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
    ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    # Not in Wan nor diffusers: this project's optional absolute position and frame-index embeddings
    # (ModelConfig.abs_pos_freqs, abs_time_frames), kept under the same names so such models save and load here;
    # exports to other programs refuse them.
    *((name, name) for name in ModelConfig.ADDED.values()),
)

# Path segments inserted by training wrappers (FSDP, activation checkpointing, torch.compile); removed anywhere.
WRAPPER_SEGMENTS: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes of whole-model containers (WanDiffusionWrapper's `model.`, ComfyUI's `model.diffusion_model.`).
CONTAINER_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "model.")

RELEASED_PREFIX = "model."
OUR_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
DIFFUSERS_QK_NORM = "rms_norm_across_heads"
DIFFUSERS_ROPE_MAX_SEQ_LEN = 1024
DEFAULT_TEXT_LEN = 512


def _one_line(text: object, limit: int = 240) -> str:
    """First line of `text`, shortened to `limit` characters (error messages must stay on one line)."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Layout detection and conversion
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]  # groups: `i` (block index, if any) and `leaf` (".weight", ".bias" or nothing)
    template: str  # str.format template over the same groups


def _compile_rule(src: str, dst: str) -> _Rule:
    """Turn a table row into a regex over full keys and a replacement template."""
    regex = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return _Rule(re.compile(rf"^{regex}(?P<leaf>\.weight|\.bias)?$"), dst + "{leaf}")


LAYOUTS: tuple[Layout, ...] = ("wan", "diffusers")
_RULES: dict[Layout, tuple[_Rule, ...]] = {
    "wan": tuple(_compile_rule(w, d) for w, d in WAN_DIFFUSERS_RENAMES),
    "diffusers": tuple(_compile_rule(d, w) for w, d in WAN_DIFFUSERS_RENAMES),
}


def rename_key(key: str, source: Layout) -> str | None:
    """The name of `key` (in layout `source`) in the other layout, or None if no rule matches."""
    for rule in _RULES[source]:
        m = rule.pattern.match(key)
        if m:
            return rule.template.format(**m.groupdict(default=""))
    return None


def detect_layout(state_dict: Mapping[str, Any]) -> Layout:
    """Return "wan" or "diffusers": the layout whose key table covers every key of `state_dict`.

    A dict whose keys fit both (only `patch_embedding.*` and the added embeddings are shared) is reported as "wan".
    """
    if not state_dict:
        raise CheckpointError("the state dict is empty")
    unmatched = {layout: [k for k in state_dict if rename_key(k, layout) is None] for layout in LAYOUTS}
    for layout in LAYOUTS:
        if not unmatched[layout]:
            return layout
    closest = min(LAYOUTS, key=lambda layout: len(unmatched[layout]))
    bad = unmatched[closest]
    raise CheckpointError(
        f"not a Wan T2V DiT state dict: key {bad[0]!r} fits neither the Wan nor the diffusers layout "
        f"({len(bad)} of {len(state_dict)} keys do not fit the closest layout, {closest!r})"
    )


def convert_layout(state_dict: Mapping[str, torch.Tensor], to: Layout) -> StateDict:
    """Rename the keys of `state_dict` into layout `to` (auto-detecting the source); tensors are not copied."""
    if to not in LAYOUTS:
        raise ConfigError(f"unknown layout {to!r} (known: {', '.join(LAYOUTS)})")
    source = detect_layout(state_dict)
    if source == to:
        return dict(state_dict)
    out: StateDict = {}
    for key, value in state_dict.items():
        new_key = rename_key(key, source)
        if new_key is None:  # unreachable: detect_layout checked every key
            raise CheckpointError(f"key {key!r} has no {to} name")
        out[new_key] = value
    return out


def wan_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a Wan-layout state dict to diffusers' `WanTransformer3DModel` layout."""
    if detect_layout(state_dict) != "wan":
        raise CheckpointError("wan_to_diffusers: the state dict is not in the Wan layout")
    return convert_layout(state_dict, "diffusers")


def diffusers_to_wan(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a diffusers `WanTransformer3DModel` state dict to the Wan layout."""
    if detect_layout(state_dict) != "diffusers":
        raise CheckpointError("diffusers_to_wan: the state dict is not in the diffusers layout")
    return convert_layout(state_dict, "wan")


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig <-> diffusers config
# ---------------------------------------------------------------------------------------------------------------
_DIFFUSERS_CONFIG_KEYS = frozenset({
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
    "rope_max_seq_len", "pos_embed_seq_len",
})


def model_config_to_diffusers(config: ModelConfig) -> dict[str, Any]:
    """The `WanTransformer3DModel` constructor arguments (= its config.json, without metadata) for `config`."""
    if config.beyond_wan:
        name = config.beyond_wan[0]
        raise CheckpointError(f"diffusers' WanTransformer3DModel has no counterpart of {name} (this model has "
                              f"{name}={getattr(config, name)}); it cannot be exported to diffusers")
    return {
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": DIFFUSERS_QK_NORM if config.qk_norm else None,
        "eps": config.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": DIFFUSERS_ROPE_MAX_SEQ_LEN,
        "pos_embed_seq_len": None,
    }


def model_config_from_diffusers(d: Mapping[str, Any], *, text_len: int = DEFAULT_TEXT_LEN) -> ModelConfig:
    """Build our `ModelConfig` from a diffusers `WanTransformer3DModel` config (T2V only).

    diffusers has no `text_len`; pass it (Wan's default is 512). Keys starting with '_' are metadata.
    """
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown WanTransformer3DModel config key {unknown[0]!r}")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(key) is not None:
            raise ConfigError(f"diffusers config sets {key}={d[key]!r}: only T2V models are supported")
    qk_norm = d.get("qk_norm", DIFFUSERS_QK_NORM)
    if qk_norm not in (DIFFUSERS_QK_NORM, None):
        raise ConfigError(f"diffusers qk_norm {qk_norm!r} is not supported (Wan uses {DIFFUSERS_QK_NORM!r} or none)")
    try:
        heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        return ModelConfig(
            patch_size=tuple(d.get("patch_size", (1, 2, 2))),
            in_dim=int(d.get("in_channels", 16)),
            out_dim=int(d.get("out_channels") or d.get("in_channels", 16)),
            dim=heads * head_dim,
            ffn_dim=int(d["ffn_dim"]),
            freq_dim=int(d.get("freq_dim", 256)),
            text_dim=int(d.get("text_dim", 4096)),
            text_len=text_len,
            num_heads=heads,
            num_layers=int(d["num_layers"]),
            qk_norm=qk_norm is not None,
            cross_attn_norm=bool(d.get("cross_attn_norm", True)),
            eps=float(d.get("eps", 1e-6)),
        )
    except KeyError as e:
        raise ConfigError(f"diffusers config lacks the required key {e.args[0]!r}") from None


def _is_diffusers_config(d: Mapping[str, Any]) -> bool:
    return d.get("_class_name") == DIFFUSERS_CLASS_NAME or "num_attention_heads" in d


def read_model_config(path: str | Path) -> ModelConfig:
    """Read a config.json that is either ours / official Wan (`dim`, `num_heads`, ...) or diffusers'."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    try:
        return model_config_from_diffusers(d) if _is_diffusers_config(d) else ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------
def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"weight file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a regular file: {path}")


def _check_tensors(state_dict: Mapping[Any, Any], source: Path | str) -> StateDict:
    """Verify that `state_dict` maps strings to tensors; return it as a plain dict."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state_dict)


def read_torch_file(path: str | Path) -> Any:
    """`torch.load` a .pt/.pth file on the CPU with `weights_only=True` (zip files are memory-mapped)."""
    path = Path(path)
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / ... for bad files
        raise CheckpointError(f"cannot read {path} (corrupt, truncated or not a weights-only checkpoint): "
                              f"{_one_line(e)}") from None


def read_safetensors(path: str | Path) -> StateDict:
    """Read one .safetensors file onto the CPU."""
    path = Path(path)
    _require_file(path)
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError for bad headers / truncation, OSError for I/O
        raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors): {_one_line(e)}") from None


def read_sharded_safetensors(index_path: str | Path) -> StateDict:
    """Read a sharded checkpoint from its `*.safetensors.index.json` (`weight_map`: key -> shard file name)."""
    index_path = Path(index_path)
    _require_file(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index (needs 'weight_map'): "
                              f"{_one_line(e)}") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object of shard file names")
    state_dict: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        tensors = read_safetensors(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = sorted(expected - tensors.keys())
        extra = sorted(tensors.keys() - expected)
        if missing or extra:
            first = f"missing {missing[0]!r}" if missing else f"unlisted {extra[0]!r}"
            raise CheckpointError(f"{shard_path} does not match {index_path.name}: {first} "
                                  f"({len(missing)} missing, {len(extra)} unlisted)")
        state_dict.update(tensors)
    return state_dict


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove wrapper segments (`_fsdp_wrapped_module.` ...) anywhere, then a container prefix all keys share."""
    out: StateDict = {}
    for key, value in state_dict.items():
        for segment in WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        if key in out:
            raise CheckpointError(f"key {key!r} appears twice once wrapper prefixes are removed")
        out[key] = value
    for prefix in CONTAINER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            return {k[len(prefix):]: v for k, v in out.items()}
    return out


_GENERATOR_KEYS = ("generator", "generator_ema", "model")


def select_generator(checkpoint: Mapping[str, Any], *, ema: bool = False, source: str = "checkpoint") -> StateDict:
    """Pick the generator weights of a released checkpoint and strip its wrapper prefixes.

    `ema=True` selects `generator_ema`; `ema=False` selects `generator`, else `model`. A plain state dict (no such
    entries, only tensors) is returned as is when `ema=False`.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a dict, found {type(checkpoint).__name__}")
    present = [k for k in _GENERATOR_KEYS if k in checkpoint]
    if not present:
        if ema:
            raise CheckpointError(f"{source} is a plain state dict without 'generator_ema'; load it with ema=False")
        return strip_wrapper_prefixes(_check_tensors(checkpoint, source))
    wanted = ("generator_ema",) if ema else ("generator", "model")
    for key in wanted:
        if key in checkpoint:
            return strip_wrapper_prefixes(_check_tensors(checkpoint[key], f"{source}[{key!r}]"))
    raise CheckpointError(f"{source} has no {' or '.join(repr(k) for k in wanted)} "
                          f"(present: {', '.join(repr(k) for k in checkpoint)}); "
                          f"{'use ema=False' if ema else 'use ema=True'}")


def _find_weights_in_folder(folder: Path) -> Path:
    """The weight file (or shard index) of a model folder."""
    for name in (OUR_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME + ".index.json",
                 OUR_WEIGHTS_NAME + ".index.json"):
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{folder} holds several candidate weight files ({found[0].name}, "
                                  f"{found[1].name}, ...); pass one file explicitly")
    raise CheckpointError(f"no weights (*.safetensors or *.safetensors.index.json) in folder {folder}")


def read_model_folder(folder: str | Path) -> tuple[StateDict, ModelConfig | None]:
    """Read a diffusers, official Wan or own-format model folder; the config is None if there is no config.json."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a diffusers pipeline folder
    config = read_model_config(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    return _read_weight_file(_find_weights_in_folder(folder), ema=False), config


def _read_weight_file(path: Path, *, ema: bool) -> StateDict:
    """Read one weight file of any supported kind, without layout conversion."""
    name = path.name.lower()
    if name.endswith(".index.json"):
        return strip_wrapper_prefixes(read_sharded_safetensors(path))
    if name.endswith(".safetensors"):
        if ema:
            raise CheckpointError(f"{path}: safetensors files hold a single set of weights; use ema=False")
        return strip_wrapper_prefixes(read_safetensors(path))
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return select_generator(read_torch_file(path), ema=ema, source=str(path))
    raise CheckpointError(f"unrecognised weight file type: {path} "
                          f"(expected .pt, .pth, .safetensors, .safetensors.index.json or a folder)")


def load_dit_weights(path: str | Path, *, ema: bool = False) -> tuple[StateDict, ModelConfig | None]:
    """Load DiT weights from any supported file or folder and return `(state dict in Wan layout, config or None)`.

    The format is auto-detected: released `.pt` (`ema` picks `generator_ema` vs `generator`), plain `.pt`/`.pth`,
    single or sharded safetensors in either layout, a diffusers / official Wan / own model folder.
    """
    path = Path(path)
    if path.is_dir():
        if ema:
            raise CheckpointError(f"{path}: model folders hold a single set of weights; use ema=False")
        state_dict, config = read_model_folder(path)
    elif path.exists():
        state_dict, config = _read_weight_file(path, ema=ema), None
    else:
        raise CheckpointError(f"weight file not found: {path}")
    try:
        return convert_layout(state_dict, "wan"), config
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Strict loading into a module
# ---------------------------------------------------------------------------------------------------------------
def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """Load `state_dict` into `model` strictly, casting every tensor to the dtype of the entry it replaces.

    Any missing, unexpected or mis-shaped key raises `CheckpointError` naming the first offender and the counts.
    `assign=True` replaces the module's tensors instead of copying into them (needed for meta-device models);
    the model then lives on the device of `state_dict`.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    misshaped = [k for k in target if k in state_dict and tuple(state_dict[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or misshaped:
        if missing:
            first = f"first missing key {missing[0]!r}"
        elif unexpected:
            first = f"first unexpected key {unexpected[0]!r}"
        else:
            k = misshaped[0]
            first = (f"first mis-shaped key {k!r}: checkpoint {tuple(state_dict[k].shape)} "
                     f"vs model {tuple(target[k].shape)}")
        raise CheckpointError(f"state dict does not fit {type(model).__name__}: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys; {first}")
    cast = {k: state_dict[k].to(dtype=target[k].dtype) for k in target}
    model.load_state_dict(cast, strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------------------------------------
def _fsync_directory(directory: Path) -> None:
    """Persist a rename in `directory` (POSIX only; Windows cannot open directories)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _writable(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached, contiguous CPU tensors (what safetensors and torch.save should store)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def _shard(state_dict: StateDict, max_shard_bytes: int) -> list[StateDict]:
    """Split in key order into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[StateDict] = [{}]
    size = 0
    for key, value in state_dict.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path, *, layout: Layout = "wan",
                     max_shard_bytes: int | None = None) -> Path:
    """Write `state_dict` (either layout) as safetensors in `layout`; return the file to load it back from.

    If the tensors exceed `max_shard_bytes`, write `<stem>-00001-of-0000N.safetensors` shards plus
    `<path>.index.json` (diffusers / transformers format) and return the index path.
    """
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise CheckpointError(f"safetensors output must end in .safetensors: {path}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tensors = _writable(convert_layout(state_dict, layout))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index_path = path.with_name(path.name + ".index.json")
    if max_shard_bytes is None or total <= max_shard_bytes:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        index_path.unlink(missing_ok=True)  # a stale index from an earlier sharded save would shadow this file
        return path
    shards = _shard(tensors, max_shard_bytes)
    stem = path.name[: -len(".safetensors")]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(path.parent / shard_name) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
        weight_map.update({k: shard_name for k in shard})
    _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, index_path)
    path.unlink(missing_ok=True)  # a stale unsharded file from an earlier save would shadow the index
    return index_path


def save_model_folder(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], config: ModelConfig,
                      folder: str | Path) -> Path:
    """Write our folder format: `config.json` (the `ModelConfig`) and `model.safetensors` (Wan layout)."""
    folder = Path(folder)
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
                  else model_or_state_dict)
    save_safetensors(state_dict, folder / OUR_WEIGHTS_NAME, layout="wan")
    _write_json(config.to_dict(), folder / CONFIG_NAME)
    return folder


def save_diffusers_folder(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, folder: str | Path, *,
                          max_shard_bytes: int | None = None) -> Path:
    """Write a folder that `WanTransformer3DModel.from_pretrained` loads: its config.json + diffusers-layout weights.

    diffusers has no `text_len`, so it is not stored (reading the folder back gives the default, 512).
    """
    folder = Path(folder)
    save_safetensors(state_dict, folder / DIFFUSERS_WEIGHTS_NAME, layout="diffusers", max_shard_bytes=max_shard_bytes)
    _write_json({"_class_name": DIFFUSERS_CLASS_NAME, **model_config_to_diffusers(config)}, folder / CONFIG_NAME)
    return folder


def save_released_pt(path: str | Path, *, generator: Mapping[str, torch.Tensor] | None = None,
                     generator_ema: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a `.pt` in the released Causal Forcing layout (`generator` / `generator_ema`, keys `model.<wan name>`)."""
    if generator is None and generator_ema is None:
        raise CheckpointError("save_released_pt needs generator and/or generator_ema")
    for sd in (generator, generator_ema):
        added = sorted({k.split(".")[0] for k in sd or ()} & set(ModelConfig.ADDED.values()))
        if added:
            raise CheckpointError(f"the released Causal Forcing layout has no {added[0]} (an embedding this project "
                                  "adds to Wan); this model cannot be exported to it")
    checkpoint: dict[str, StateDict] = {}
    for name, sd in (("generator", generator), ("generator_ema", generator_ema)):
        if sd is not None:
            checkpoint[name] = {RELEASED_PREFIX + k: v for k, v in _writable(convert_layout(sd, "wan")).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path
