"""Where the objects of a caption start: a learned layout model for frame 0.

A frame 0 assembled object by object (pipelines/compose.py) needs a place for each object. Where an object starts
decides where it goes: an object that starts near the wall it moves towards bounces at once and reads as moving
the other way, and two objects that start in each other's path overlap for much of the clip and one of them is
lost. The world's scenes avoid both, and this model learns the places they use from their first frames alone.

It is a density-ratio model. Its proposal ``q`` is a pool of object centres seen in training frames, drawn
independently per object, regardless of the text. A classifier learns to tell a real scene's centres (with the
scene's clauses) from centres drawn from ``q`` (with the same clauses); its logit estimates
``log p(centres | clauses) - log q(centres)``. To sample, :meth:`LayoutModel.sample` draws ``candidates``
arrangements from ``q`` and picks one with probability proportional to ``exp(logit)`` (sampling-importance
resampling), so samples follow ``p`` as the candidates grow. The score of an arrangement is the sum over object
pairs of the pair logit, each pair scored in both orders and averaged (a caption's objects have no order).

Clauses are given as text embeddings (pooled sentence vectors); nothing is parsed from the text. Centres are in
canvas units, (x, y) in [0, 1].
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

FOURIER_BANDS = 4


def _fourier(x: Tensor, bands: int = FOURIER_BANDS) -> Tensor:
    """[..., d] -> [..., d * (1 + 2 * bands)]: x with sin and cos at frequencies pi * 2^k."""
    freqs = math.pi * 2.0 ** torch.arange(bands, device=x.device, dtype=x.dtype)
    angles = x[..., None] * freqs
    return torch.cat([x, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


class LayoutModel(nn.Module):
    """Pair classifier over (clause a, clause b, centre a, centre b) and the proposal pool of centres.

    ``text_dim``: the size of a clause embedding; ``hidden``: the classifier's width; ``pool``: how many proposal
    centres are stored (a buffer, filled by :meth:`set_pool`)."""

    def __init__(self, text_dim: int = 384, hidden: int = 256, text_proj: int = 64, pool: int = 4096):
        super().__init__()
        if min(text_dim, hidden, text_proj, pool) < 1:
            raise ValueError("text_dim, hidden, text_proj and pool must be positive")
        self.text_dim, self.hidden, self.text_proj_dim = text_dim, hidden, text_proj
        self.text_proj = nn.Linear(text_dim, text_proj)
        position = 6 * (1 + 2 * FOURIER_BANDS)             # centre a, centre b, b - a
        self.net = nn.Sequential(nn.Linear(2 * text_proj + position, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("pool", torch.full((pool, 2), 0.5))

    def config(self) -> dict:
        return {"text_dim": self.text_dim, "hidden": self.hidden, "text_proj": self.text_proj_dim,
                "pool": int(self.pool.shape[0])}

    def set_pool(self, centres: Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the proposal pool with ``centres`` [N, 2] (resampled with replacement to the pool's size)."""
        if centres.dim() != 2 or centres.shape[1] != 2 or len(centres) == 0:
            raise ValueError(f"centres must be [N, 2] with N > 0, got {list(centres.shape)}")
        pick = torch.randint(len(centres), (self.pool.shape[0],), generator=generator)
        self.pool.copy_(centres[pick].to(self.pool))

    def propose(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Centres drawn from the pool: [*shape, 2]."""
        n = math.prod(shape)
        pick = torch.randint(self.pool.shape[0], (n,), generator=generator).to(self.pool.device)
        return self.pool[pick].view(*shape, 2)

    def pair_logit(self, text_a: Tensor, text_b: Tensor, centre_a: Tensor, centre_b: Tensor) -> Tensor:
        """Logit that centres ``centre_a``, ``centre_b`` [..., 2] of clauses ``text_a``, ``text_b`` [..., D] come
        from a real scene rather than the proposal: [...]."""
        pos = _fourier(torch.cat([centre_a, centre_b, centre_b - centre_a], dim=-1))
        feats = torch.cat([self.text_proj(text_a), self.text_proj(text_b), pos], dim=-1)
        return self.net(feats).squeeze(-1)

    def score(self, texts: Tensor, centres: Tensor) -> Tensor:
        """Log density ratio of arrangements ``centres`` [K, n, 2] for clauses ``texts`` [n, D]: [K] (0 for n = 1).
        """
        k, n = centres.shape[:2]
        total = centres.new_zeros(k)
        for i in range(n):
            for j in range(i + 1, n):
                ti, tj = texts[i].expand(k, -1), texts[j].expand(k, -1)
                ci, cj = centres[:, i], centres[:, j]
                total = total + 0.5 * (self.pair_logit(ti, tj, ci, cj) + self.pair_logit(tj, ti, cj, ci))
        return total

    @torch.no_grad()
    def sample(self, texts: Tensor, candidates: int = 1024, sharpness: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Centres [n, 2] for the clauses ``texts`` [n, D]: one of ``candidates`` proposals, drawn with
        probability proportional to exp(sharpness * score). ``sharpness`` 1 samples the learned distribution;
        above 1 it favours the arrangements the model finds most like the world's (fewer starts that bounce or
        overlap, less variety)."""
        if texts.dim() != 2 or texts.shape[1] != self.text_dim:
            raise ValueError(f"texts must be [n, {self.text_dim}], got {list(texts.shape)}")
        if candidates < 1:
            raise ValueError("candidates must be at least 1")
        if not sharpness >= 0.0:
            raise ValueError(f"sharpness must be >= 0, got {sharpness}")
        texts = texts.to(self.pool)
        proposals = self.propose((candidates, len(texts)), generator)
        weights = F.softmax(sharpness * self.score(texts, proposals).double(), dim=0)
        pick = torch.multinomial(weights.cpu(), 1, generator=generator).item()
        return proposals[pick]


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "causal-forcing-layout"


def pool_tokens(states: Tensor) -> Tensor:
    """Token states [n, L, D] -> one vector per clause [n, D] (float32, CPU): their mean over the tokens kept
    (rows that are not all zero)."""
    states = states.float().cpu()
    used = (states.abs().sum(-1) > 0).float()
    return (states * used[..., None]).sum(1) / used.sum(1, keepdim=True).clamp(min=1.0)


def pooled_text(encoder, clauses: Sequence[str]) -> Tensor:
    """One vector per clause [n, D]: :func:`pool_tokens` of ``encoder``'s token states."""
    return pool_tokens(encoder.encode(list(clauses)))


def save_layout_model(model: LayoutModel, folder) -> Path:
    """``config.json`` + ``model.safetensors`` in ``folder``, each written atomically (weights first)."""
    from safetensors.torch import save_file

    from ..checkpoints import atomic_path
    out = Path(folder)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, **model.config()}, indent=1) + "\n")
    return out


def load_layout_model(folder, *, device: str | torch.device = "cpu") -> LayoutModel:
    """A layout model saved by :func:`save_layout_model`, in eval mode."""
    from ..checkpoints import read_safetensors
    root = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise InputError(f"{root}: no {name} (not a layout model folder)")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{root / CONFIG_FILE}: unreadable layout config ({e})") from None
    if not isinstance(config, dict) or config.pop("format", None) != FORMAT:
        raise InputError(f"{root / CONFIG_FILE}: not a layout model config (format must be {FORMAT!r})")
    known = {"text_dim", "hidden", "text_proj", "pool"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"{root / CONFIG_FILE}: unknown layout config keys {', '.join(unknown)}")
    try:
        model = LayoutModel(**{k: int(v) for k, v in config.items()})
    except (TypeError, ValueError) as e:
        raise InputError(f"{root / CONFIG_FILE}: bad layout config ({e})") from None
    try:
        model.load_state_dict(read_safetensors(root / WEIGHTS_FILE))
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [""]
        raise InputError(f"{root}: layout weights do not fit its config ({first[0][:160]})") from None
    return model.to(device).eval()
