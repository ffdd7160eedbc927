"""The frame-count rule shared by every VAE here (Wan's and the small ShapesWorld one): causal in time with 4x
temporal compression, the first pixel frame encoded alone, so `F` latent frames decode to `1 + 4 (F - 1)` pixel
frames. Kept free of heavy imports (diffusers) so that either VAE module can use it."""
from __future__ import annotations

from ..errors import InputError

TEMPORAL_FACTOR = 4
"""Pixel frames per latent frame (after the first)."""


def pixel_frames_for(latent_frames: int) -> int:
    """Number of pixel frames decoded from `latent_frames` latent frames: 1 + 4 * (F - 1)."""
    if latent_frames < 1:
        raise InputError(f"a video needs at least 1 latent frame, got {latent_frames}")
    return 1 + TEMPORAL_FACTOR * (latent_frames - 1)


def latent_frames_for(pixel_frames: int) -> int:
    """Number of latent frames encoding `pixel_frames` frames; the count must be 1 + 4k (1, 5, ..., 81)."""
    if pixel_frames < 1 or (pixel_frames - 1) % TEMPORAL_FACTOR:
        raise InputError(
            f"pixel frame count must be 1 + {TEMPORAL_FACTOR}k (1, 5, 9, ..., 81), got {pixel_frames}"
        )
    return 1 + (pixel_frames - 1) // TEMPORAL_FACTOR
