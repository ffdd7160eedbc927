"""Flow-matching training of a bidirectional base / teacher model (full attention, one timestep per sample).

The Wan base cannot be downloaded here, so ShapesWorld needs its own base/teacher; with ``train.init`` this
stage also fine-tunes existing bidirectional weights.
"""
from __future__ import annotations

from .ar_diffusion import Config, DiffusionStage

__all__ = ["Config", "Stage"]


class Stage(DiffusionStage):
    causal = False
    name = "bidirectional"
    Config = Config
