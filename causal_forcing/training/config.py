"""Typed training configuration: dataclasses loaded from YAML with strict validation and CLI overrides.

A config file has the shared sections ``model``, ``data``, ``optim``, ``train`` and ``ema``, plus a section
``stage`` whose fields belong to the stage being run (each stage module defines its own dataclass). Unknown
keys, wrong types and bad values are a ``ConfigError`` with a one-line message naming the key, raised before
any work starts. Overrides use dotted paths: ``optim.lr=1e-5 train.max_steps=100 stage.block_size=3``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

import yaml

from ..config import ModelConfig, model_preset
from ..errors import ConfigError


# ---------------------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """The network being trained: a preset name, optionally with field overrides (``dim``, ``num_layers`` ...)."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)

    def build_config(self) -> ModelConfig:
        base = model_preset(self.preset).to_dict()
        unknown = set(self.overrides) - set(base)
        if unknown:
            raise ConfigError(f"model.overrides: unknown key {sorted(unknown)[0]!r}")
        return ModelConfig.from_dict({**base, **self.overrides})


@dataclass
class DataSection:
    path: str = ""                 # dataset folder (latents / ODE pairs / prompts, depending on the stage)
    batch_size: int = 1
    shuffle: bool = True
    text_encoder: str = "dataset"  # "dataset": embeddings stored with the data; else a text encoder kind
    text_encoder_path: str = ""    # umt5: the Wan2.1 base folder (models_t5_*.pth + google/umt5-xxl/)
    text_len: int = 0              # 0 = the model's text_len
    negative_prompt: str = ""      # for CFG stages; "" = empty prompt
    max_frames: int = 0            # > 0: train on the first max_frames latent frames of every sample


@dataclass
class OptimSection:
    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0
    warmup_steps: int = 0
    # After warm-up the rate is constant, or decays from decay_start (0 = the end of warm-up) to
    # lr * min_lr_ratio at train.max_steps, along a cosine or a straight line.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    decay_start: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainSection:
    out_dir: str = "runs/experiment"
    init: str = ""                 # weights to start from (a previous stage's output); "" = random init
    init_ema: bool = False         # take the EMA weights of ``init`` when it has them
    max_steps: int = 1000
    time_limit: float = 0.0        # > 0: also stop after this many seconds of steps in this process (then save
                                   # and export as at max_steps); counted from each start, so --resume goes on
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast dtype; master weights stay fp32
    grad_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 0          # 0 = never (ShapesWorld runs: sample videos + ShapesBench scores)
    sample_manifest: str = ""      # evaluation manifest (`data shapes --eval-set`) for the periodic samples
    sample_vae: str = ""           # VAE folder to decode them
    sample_count: int = 8          # prompts per sampling round
    device: str = "auto"
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    progress: bool = True


@dataclass
class EMASection:
    decay: float = 0.0             # 0 = no EMA
    start_step: int = 0


# ---------------------------------------------------------------------------------------------------------
# Generic strict dataclass loading
# ---------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            loc = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key {loc!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON friendly) form of a config dataclass."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def read_yaml_with_includes(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read YAML; a top-level ``include: other.yaml`` (relative to this file) is loaded first and overridden."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config include cycle at {path}")
    data = read_yaml(path)
    inc = data.pop("include", None)
    if inc is None:
        return data
    if not isinstance(inc, str):
        raise ConfigError(f"{path}: include must be a file name")
    return _deep_merge(read_yaml_with_includes(path.parent / inc, _seen + (path,)), data)


def make_config_class(stage_cls: type) -> type:
    """The full config dataclass of a stage: the shared sections plus ``stage: stage_cls``."""

    @dataclass
    class TrainConfig:
        model: ModelSection = field(default_factory=ModelSection)
        data: DataSection = field(default_factory=DataSection)
        optim: OptimSection = field(default_factory=OptimSection)
        train: TrainSection = field(default_factory=TrainSection)
        ema: EMASection = field(default_factory=EMASection)
        stage: stage_cls = field(default_factory=stage_cls)  # type: ignore[valid-type]

    TrainConfig.__annotations__["stage"] = stage_cls
    TrainConfig.__name__ = f"TrainConfig[{stage_cls.__name__}]"
    return TrainConfig


def load_config(stage_cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: Mapping[str, Any] | None = None) -> Any:
    """Load a stage's full config from YAML (optional) + overrides, validated."""
    data: dict = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml_with_includes(path))
    data = apply_overrides(data, list(overrides or []))
    cls = make_config_class(stage_cls)
    cfg = from_dict(cls, data)
    _validate_common(cfg)
    return cfg


def _deep_merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _validate_common(cfg: Any) -> None:
    checks = [
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.max_frames >= 0, "data.max_frames must be >= 0 (0 = all frames)"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.optim.schedule in ("constant", "cosine", "linear"),
         f"optim.schedule must be constant, cosine or linear, got {cfg.optim.schedule!r}"),
        (cfg.optim.decay_start >= 0, "optim.decay_start must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.train.save_every >= 1, "train.save_every must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (0.0 <= cfg.ema.decay < 1.0, "ema.decay must be in [0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    cfg.model.build_config()  # validates the preset and overrides
    if hasattr(cfg.stage, "validate"):
        cfg.stage.validate()


def replace(obj: Any, **kw: Any) -> Any:
    return dataclasses.replace(obj, **kw)
