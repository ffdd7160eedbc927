"""Typed model configuration and named presets.

`ModelConfig` mirrors the fields of the official Wan2.1 `config.json` (same names), so an official config
loads with `ModelConfig.from_dict`. Everything derived (head_dim, tokens per frame, RoPE split) is computed,
never hard-coded: token counts come from the latent shape and the patch size.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Wan DiT (bidirectional and causal share it)."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Not part of Wan: > 0 adds a learned absolute 2-D position embedding of the token grid (canvas-relative
    # sin/cos features with this many frequencies per axis, projected by a zero-initialised linear layer), so the
    # network can place content by absolute position from pure noise, which RoPE alone (relative) makes hard.
    # 0 (default) is exactly Wan's architecture and key layout.
    abs_pos_freqs: int = 0
    # Not part of Wan: > 0 adds a learned embedding of each latent frame's index, clamped to abs_time_frames - 1 (so
    # streams of any length work: later frames share the last entry), zero-initialised and added to the frame's
    # time embedding (its AdaLN modulation), so the network can tell the first frames of a clip from later ones,
    # which RoPE (relative offsets only) does not tell it.
    abs_time_frames: int = 0

    # The options above that Wan does not have, each with the module it adds to WanDiT (same name in every layout).
    ADDED: ClassVar[dict[str, str]] = {"abs_pos_freqs": "pos_embedding", "abs_time_frames": "frame_embedding"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "window_size", tuple(int(w) for w in self.window_size))
        if self.model_type != "t2v":
            raise ConfigError(f"model_type {self.model_type!r} is not supported (only 't2v')")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        for name in ("in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "text_len",
                     "num_heads", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        for name in self.ADDED:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {v!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim {self.freq_dim} must be even")
        if self.window_size != (-1, -1):
            raise ConfigError("window_size other than (-1, -1) is not supported; use the KV cache's local window")

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def beyond_wan(self) -> tuple[str, ...]:
        """The options set here that Wan's architecture (and every official key layout) does not have."""
        return tuple(name for name in self.ADDED if getattr(self, name))

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head rotated by (frame, row, column): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        _, ph, pw = self.patch_size
        if latent_h % ph or latent_w % pw:
            raise ConfigError(f"latent size {latent_h}x{latent_w} is not divisible by patch {ph}x{pw}")
        return (latent_h // ph) * (latent_w // pw)

    # ---- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> "ModelConfig":
        """Build from a dict; keys starting with '_' (diffusers metadata) are ignored, unknown keys fail."""
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k.startswith("_") or k in ignore:
                continue
            if k not in names:
                raise ConfigError(f"unknown model config key {k!r} (known: {', '.join(sorted(names))})")
            kwargs[k] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["window_size"] = list(self.window_size)
        return d

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    "wan2.1-t2v-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # The small models trained on ShapesWorld (64x64 pixels -> 8x8 latents -> 16 tokens per frame), with
    # MiniLM per-token text embeddings (384-d, 32 tokens).
    "shapes": ModelConfig(dim=128, ffn_dim=512, text_dim=384, text_len=32, num_heads=4, num_layers=6),
    # The configuration of the reference parity tensors (shared/reference/parity/config.json).
    "tiny": ModelConfig(dim=64, ffn_dim=128, freq_dim=256, text_dim=32, text_len=8, num_heads=2, num_layers=2),
}


def model_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})") from None
