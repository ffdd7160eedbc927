"""An optional first-frame model: latent frame 0 from a separate many-step sampler, the rest from the student.

A frame-wise student makes frame 0 from pure noise, with no history: that frame is a text-to-image problem, and
it decides where each object starts. On ShapesWorld the start position also decides the direction of motion
(docs/results.md, "Run 8"), and a Wan DiT, whose only positional input is relative (RoPE), places objects by
chance. A pipeline may therefore name a second DiT, trained on frame 0 alone (with the absolute position
embedding ``ModelConfig.abs_pos_freqs``), that draws frame 0 with its own many-step, classifier-free-guided
sampler; the few-step student then continues from it exactly as from an I2V image (the frame is committed to
its KV cache at t = 0). Frame 0 is one latent frame, so the extra model calls are cheap next to the clip.

The same model may make a short prefix instead (``frames`` > 1: frames 0..frames-1, autoregressively, each with
the full guided solve). A student continues the motion it is shown far better than it picks a motion for each
object from the caption (docs/results.md, "Run 9"), so a first-frame model trained on the first few frames can
hand over a clip whose objects already move the caption's way. The prefix is committed to the student's cache
block by block, at the student's block size, as the student's own frames would be.

In ``pipeline.json``::

    "first_frame": {"path": "first_frame", "steps": 20, "guidance": 4.0, "shift": 5.0, "solver": "unipc",
                    "frames": 1}

``path`` is a model folder (``config.json`` + ``model.safetensors``) relative to the pipeline folder. The
negative prompt of the guidance is the all-zero context, the unconditional input the model was trained with
(``data.text_encoder: dataset`` drops captions to zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.wan import WanDiT
from .teacher import sample_autoregressive

SOLVERS = ("unipc", "euler")


@dataclass(frozen=True)
class FirstFrameSpec:
    """The ``first_frame`` entry of ``pipeline.json``: where the model is and how to sample it."""

    path: str = "first_frame"
    steps: int = 20
    guidance: float = 4.0
    shift: float = 5.0
    solver: str = "unipc"
    frames: int = 1          # latent frames it makes before the student takes over (a prefix of the clip)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("first_frame.path must name a model folder")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ConfigError(f"first_frame.frames must be a positive integer, got {self.frames!r}")
        if self.steps < 1:
            raise ConfigError(f"first_frame.steps must be positive, got {self.steps}")
        if not self.guidance >= 1.0:
            raise ConfigError(f"first_frame.guidance must be >= 1 (1 = no guidance), got {self.guidance}")
        if not self.shift > 0.0:
            raise ConfigError(f"first_frame.shift must be positive, got {self.shift}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"first_frame.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")


class FirstFrameSampler:
    """Callable ``(context [B, L, D], noise [B, n, C, H, W]) -> latent frames 0..n-1 [B, n, C, H, W]`` (float32).

    ``frames`` (from the spec) is how many frames a stream asks it for; it samples them autoregressively, one
    frame per block, each with the full many-step guided solve."""

    def __init__(self, model: WanDiT, spec: FirstFrameSpec | None = None):
        self.model = model
        self.spec = spec or FirstFrameSpec()

    @property
    def frames(self) -> int:
        return self.spec.frames

    @torch.no_grad()
    def __call__(self, context: Tensor, noise: Tensor) -> Tensor:
        if noise.dim() != 5 or noise.shape[1] < 1:
            raise ValueError(f"first-frame noise must be [B, n, C, H, W] with n >= 1, got {list(noise.shape)}")
        s = self.spec
        device = next(self.model.parameters()).device
        context = context.to(device)
        negative = torch.zeros_like(context) if s.guidance != 1.0 else None
        return sample_autoregressive(self.model, context, negative, num_frames=noise.shape[1],
                                     latent_hw=tuple(noise.shape[-2:]), steps=s.steps, shift=s.shift,
                                     guidance=s.guidance, solver=s.solver, noise=noise,  # type: ignore[arg-type]
                                     batch_cfg=True)
