"""The frame-count rule shared by every VAE here (Wan's and the small ShapesWorld one): causal in time with 4x
temporal compression, the first pixel frame encoded alone, so `F` latent frames decode to `1 + 4 (F - 1)` pixel
frames, and the bookkeeping of decoding such a video block by block. Kept free of heavy imports (diffusers) so that
either VAE module can use it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

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


class BlockDecoder(ABC):
    """Decodes a latent video block by block, keeping the decoder's temporal cache between blocks: the contract
    every VAE's streaming decoder shares. The first latent frame of a video yields 1 pixel frame, every later one 4;
    blocks may hold any number of frames; the concatenated output equals the VAE's ``decode`` of the whole video.
    ``reset()`` starts a new video.

    A VAE supplies ``_new_cache()`` (its decoder's empty cache) and ``_decode(z)`` (denormalise and decode the
    block ``[B, f, C, h, w]``, already on the VAE's device and dtype, into ``[B, T_f, 3, H, W]``, reading
    ``self._cache`` and ``latent_frames_decoded``, the frames before this block); the VAE object needs
    ``latent_channels``, ``device`` and ``dtype``.
    """

    def __init__(self, vae: Any) -> None:
        self._vae = vae
        self.reset()

    @abstractmethod
    def _new_cache(self) -> Any:
        """The decoder's empty temporal cache for a new video."""

    @abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Denormalise and decode one block (see the class docstring)."""

    def reset(self) -> None:
        """Forget the decoded history (the next block is frame 0 of a new video)."""
        self._cache = self._new_cache()
        self._latent_frames = 0
        self._block_layout: tuple[int, int, int, int] | None = None
        self._placement: tuple[torch.device, torch.dtype] | None = None

    @property
    def latent_frames_decoded(self) -> int:
        """Latent frames consumed so far in the current video."""
        return self._latent_frames

    @property
    def pixel_frames_decoded(self) -> int:
        """Pixel frames produced so far in the current video."""
        return pixel_frames_for(self._latent_frames) if self._latent_frames else 0

    def _check_block(self, latents: torch.Tensor) -> None:
        vae = self._vae
        if latents.ndim != 5 or latents.shape[2] != vae.latent_channels or latents.shape[1] < 1:
            raise InputError(
                f"latents must be [B, F>=1, {vae.latent_channels}, h, w], got shape {tuple(latents.shape)}"
            )
        batch, _, channels, height, width = latents.shape
        layout = (batch, channels, height, width)
        if self._block_layout is not None and layout != self._block_layout:
            raise InputError(
                f"latent block [B, C, h, w] = {list(layout)} differs from this stream's {list(self._block_layout)}"
            )
        if self._placement is not None and (vae.device, vae.dtype) != self._placement:
            raise RuntimeError("the VAE changed device/dtype in the middle of a stream; call reset() first")

    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent block ``[B, f, C, h, w]`` -> its pixel frames ``[B, T_f, 3, H, W]`` in [-1, 1].

        T_f = 1 + 4(f - 1) for the first block of a video and 4f afterwards.
        """
        self._check_block(latents)
        vae = self._vae
        out = self._decode(latents.to(device=vae.device, dtype=vae.dtype))
        self._latent_frames += latents.shape[1]
        self._block_layout = (latents.shape[0], *latents.shape[2:])
        self._placement = (vae.device, vae.dtype)
        return out.clamp(-1.0, 1.0)
