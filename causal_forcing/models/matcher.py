"""A small text–frame matcher: does a latent frame show what a caption says?

It reads one VAE latent frame ``[C, H, W]`` and the text encoder's token embeddings of a caption ``[L, D]`` (the
same embeddings the DiTs read) and returns a logit: high when the frame matches the caption. Frame patches and
text tokens go through one small transformer together, so it can tell *which* object has which attributes (a
pooled-embedding similarity such as CLIP's cannot bind "big" to the triangle rather than the circle).

Its use is best-of-N sampling of frame 0 (``pipelines.first_frame``): draw N candidate frames for a prompt and keep
the one the matcher scores highest, as DALL·E reranked its samples with CLIP. It is trained on real frames only
(``training.matcher``): positive pairs are a frame and its caption, negatives the same frame with a caption
changed in one attribute, with two objects' attributes swapped, or with an object added or removed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "frame-text-matcher"


@dataclass(frozen=True)
class MatcherConfig:
    in_dim: int = 16          # latent channels
    latent_hw: tuple[int, int] = (8, 8)
    patch: int = 2            # square latent patches
    text_dim: int = 384
    text_len: int = 32
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 3
    ffn_dim: int = 256

    def __post_init__(self) -> None:
        h, w = self.latent_hw
        if h % self.patch or w % self.patch:
            raise ConfigError(f"matcher: latent_hw {self.latent_hw} is not a multiple of patch {self.patch}")
        if self.dim % self.num_heads:
            raise ConfigError(f"matcher: dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        for name in ("in_dim", "patch", "text_dim", "text_len", "dim", "num_heads", "num_layers", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"matcher: {name} must be positive, got {getattr(self, name)}")

    @property
    def num_patches(self) -> int:
        return (self.latent_hw[0] // self.patch) * (self.latent_hw[1] // self.patch)

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> MatcherConfig:
        d = dict(d)
        if d.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError("not a frame-text matcher config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"matcher config: unknown keys {unknown}")
        if "latent_hw" in d:
            d["latent_hw"] = tuple(d["latent_hw"])
        return cls(**d)


class FrameTextMatcher(nn.Module):
    """``forward(latent [B, C, H, W], text [B, L, D]) -> logits [B]`` (float32)."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = c = config
        self.patch_in = nn.Linear(c.in_dim * c.patch * c.patch, c.dim)
        self.text_norm = nn.LayerNorm(c.text_dim)
        self.text_in = nn.Linear(c.text_dim, c.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + c.num_patches + c.text_len, c.dim) * 0.02)
        self.kind = nn.Parameter(torch.randn(3, c.dim) * 0.02)     # cls / frame / text token types
        layer = nn.TransformerEncoderLayer(c.dim, c.num_heads, c.ffn_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 1)

    def forward(self, latent: Tensor, text: Tensor) -> Tensor:
        c = self.config
        if latent.dim() != 4 or latent.shape[1] != c.in_dim or tuple(latent.shape[-2:]) != tuple(c.latent_hw):
            raise ValueError(f"matcher: latent must be [B, {c.in_dim}, {c.latent_hw[0]}, {c.latent_hw[1]}], "
                             f"got {list(latent.shape)}")
        if text.dim() != 3 or text.shape[1:] != (c.text_len, c.text_dim) or text.shape[0] != latent.shape[0]:
            raise ValueError(f"matcher: text must be [{latent.shape[0]}, {c.text_len}, {c.text_dim}], "
                             f"got {list(text.shape)}")
        B, p = latent.shape[0], c.patch
        x = latent.float().unfold(2, p, p).unfold(3, p, p)                  # [B, C, h, w, p, p]
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, c.num_patches, -1)
        text = text.float()
        padding = text.abs().sum(-1) == 0                                   # zero rows are padding
        tokens = torch.cat([self.cls.expand(B, -1, -1) + self.kind[0],
                            self.patch_in(x) + self.kind[1],
                            self.text_in(self.text_norm(text)) + self.kind[2]], dim=1) + self.pos
        keep = torch.zeros(B, 1 + c.num_patches, dtype=torch.bool, device=latent.device)
        h = self.blocks(tokens, src_key_padding_mask=torch.cat([keep, padding], dim=1))
        return self.head(self.norm(h[:, 0])).squeeze(-1)


def save_matcher(model: FrameTextMatcher, folder: str | Path) -> Path:
    """``config.json`` + ``model.safetensors`` in ``folder``, each written atomically (weights first)."""
    from safetensors.torch import save_file

    from ..checkpoints import atomic_path
    out = Path(folder)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=1) + "\n")
    return out


def load_matcher(folder: str | Path, *, device: str | torch.device = "cpu") -> FrameTextMatcher:
    """A matcher saved by :func:`save_matcher`, in eval mode."""
    from ..checkpoints import read_safetensors
    root = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise InputError(f"{root}: no {name} (not a matcher folder)")
    try:
        config = MatcherConfig.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{root / CONFIG_FILE}: unreadable matcher config ({e})") from None
    model = FrameTextMatcher(config)
    state = read_safetensors(root / WEIGHTS_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [""]
        raise InputError(f"{root}: matcher weights do not fit its config ({first[0][:160]})") from None
    return model.to(device).eval()
