"""The KV cache of block-causal streaming inference (spec §1.5).

A ``KVCache`` belongs to one stream (the caller), never to the model, so several streams can share one set of
weights. It holds, for every transformer layer:

* self-attention K (already rotated with absolute RoPE positions) and V, preallocated to a capacity in
  frames, written block by block. The first call for a block *appends*; further calls for the same block
  (later denoising steps, the final clean refresh) *overwrite* the same slots.
* optionally a local window with an attention sink: when appending would overflow, the first ``sink_frames``
  frames stay, the oldest other frames are evicted (rolling), and the new block goes to the end. With
  ``sink_rope="rolling"`` the sink's keys are re-rotated at attention time to sit right before the oldest
  kept frame, so the attended span looks like a clip of the trained length (as in Rolling Forcing /
  LongLive); ``"absolute"`` keeps them at their true positions (the reference's self-forcing behaviour).
* the cross-attention K/V of the text (``TextCache``), computed on first use and reset for a new prompt.

Cached tensors are always stored detached: no gradient ever flows across blocks through the cache. The
current block's own K/V reach attention un-detached, so a training rollout gets gradients inside a block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .rope import rotate_frames

SinkRope = Literal["absolute", "rolling"]


@dataclass(frozen=True)
class CacheWrite:
    """Where one forward call writes its tokens and what it attends to (slot indices into the cache)."""

    start: int          # first slot written
    end: int            # one past the last slot written (= end of the attended range)
    evict: int          # tokens evicted (shifted out) before writing, 0 if none
    global_end: int     # token index in the video after this call
    sink_shift: int     # frames by which to re-rotate the sink's keys at attention time


class TextCache:
    """Per-layer cross-attention K/V of the prompt. ``reset()`` before using a new prompt."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    def reset(self) -> None:
        self.layers = [None] * len(self.layers)

    @property
    def is_set(self) -> bool:
        return all(entry is not None for entry in self.layers)


class KVCache:
    """Per-layer self-attention K/V of one stream, plus its text cache. See the module docstring."""

    def __init__(self, *, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 tokens_per_frame: int, capacity_frames: int, window_frames: int | None = None,
                 sink_frames: int = 0, sink_rope: SinkRope = "absolute",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if window_frames is not None:
            if window_frames < 1:
                raise ValueError(f"window_frames must be >= 1, got {window_frames}")
            if not 0 <= sink_frames < window_frames:
                raise ValueError(f"sink_frames must be in [0, window_frames), got {sink_frames}")
            capacity_frames = window_frames
        elif sink_frames:
            raise ValueError("sink_frames needs a local window (window_frames)")
        if capacity_frames < 1:
            raise ValueError(f"capacity_frames must be >= 1, got {capacity_frames}")
        if sink_rope not in ("absolute", "rolling"):
            raise ValueError(f"sink_rope must be 'absolute' or 'rolling', got {sink_rope!r}")
        self.num_layers = num_layers
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity_frames * tokens_per_frame
        self.windowed = window_frames is not None
        self.sink = sink_frames * tokens_per_frame
        self.sink_rope = sink_rope
        shape = (batch_size, self.capacity, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.text = TextCache(num_layers)
        self.global_end = 0   # token index (in the whole video) after the last written token
        self.local_end = 0    # slot index after the last written slot
        self.evicted = 0      # tokens evicted so far (rolling window)

    @classmethod
    def for_model(cls, config, *, batch_size: int, tokens_per_frame: int, capacity_frames: int,
                  window_frames: int | None = None, sink_frames: int = 0, sink_rope: SinkRope = "absolute",
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """A cache shaped for a model ``config`` (a ModelConfig)."""
        return cls(num_layers=config.num_layers, batch_size=batch_size, num_heads=config.num_heads,
                   head_dim=config.head_dim, tokens_per_frame=tokens_per_frame, capacity_frames=capacity_frames,
                   window_frames=window_frames, sink_frames=sink_frames, sink_rope=sink_rope, dtype=dtype,
                   device=device)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_frames(self) -> int:
        """Frames of video written so far (including evicted ones)."""
        return self.global_end // self.tokens_per_frame

    def reset(self) -> None:
        """Forget everything (buffers are reused); also resets the text cache."""
        self.global_end = self.local_end = self.evicted = 0
        self.text.reset()

    def plan(self, start_token: int, num_tokens: int) -> CacheWrite:
        """Where a call for tokens [start_token, start_token + num_tokens) of the video goes. Pure.

        A new block normally starts where the last one ended; it may also start later (positions skipped,
        e.g. to place a few chosen frames at their original positions).
        """
        end = start_token + num_tokens
        if end == self.global_end and num_tokens <= self.local_end:
            # Same block again (a later denoising step or the clean refresh): overwrite its slots.
            return CacheWrite(self.local_end - num_tokens, self.local_end, 0, end, self._sink_shift(self.evicted))
        if start_token < self.global_end:
            raise ValueError(
                f"KV cache calls must append a new block or repeat the last one: cache holds tokens up to "
                f"{self.global_end}, call is for [{start_token}, {end})")
        if num_tokens > self.capacity - self.sink:
            raise ValueError(f"a block of {num_tokens} tokens does not fit a cache of {self.capacity} tokens "
                             f"with a {self.sink}-token sink")
        overflow = self.local_end + num_tokens - self.capacity
        evict = 0
        if overflow > 0:
            if not self.windowed:
                raise ValueError(f"KV cache is full ({self.capacity // self.tokens_per_frame} frames); "
                                 f"use a larger capacity or a local window")
            evict = overflow
        new_end = self.local_end - evict + num_tokens
        return CacheWrite(new_end - num_tokens, new_end, evict, end, self._sink_shift(self.evicted + evict))

    @property
    def rewindable_frames(self) -> int:
        """Latent frames at the end of the cache that ``rewind`` may take back: everything written so far while
        nothing was evicted; once the window rolls, the frames after the sink."""
        floor = self.sink if self.evicted else 0
        return max(self.local_end - floor, 0) // self.tokens_per_frame

    def rewind(self, frames: int) -> None:
        """Forget the last ``frames`` latent frames written, so the next write for them appends again in place.

        The slots keep their data until overwritten; eviction count and sink rotation are unchanged, so frames
        written again at the same positions land in the same slots with the same RoPE as before (the prompt
        switch's re-cache, ``pipelines.interactive``).
        """
        if frames < 0 or frames > self.rewindable_frames:
            raise ValueError(f"cannot rewind {frames} frame(s); the cache can rewind {self.rewindable_frames}")
        tokens = frames * self.tokens_per_frame
        self.local_end -= tokens
        self.global_end -= tokens

    def _sink_shift(self, evicted_tokens: int) -> int:
        if self.sink_rope != "rolling" or self.sink == 0:
            return 0
        return evicted_tokens // self.tokens_per_frame

    def commit(self, w: CacheWrite) -> None:
        """Advance the bookkeeping after every layer has written ``w``."""
        self.evicted += w.evict
        self.local_end = w.end
        self.global_end = w.global_end

    # ---- per-layer data ---------------------------------------------------------------------------------
    def write_and_read(self, layer: int, w: CacheWrite, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store this call's K/V (detached) and return the K/V the call attends to: cache slots [0, w.end),
        with the call's own K/V un-detached at the end."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        if w.evict:
            keep = self.local_end - self.sink - w.evict
            for buf in (k_buf, v_buf):
                buf[:, self.sink:self.sink + keep] = buf[:, self.sink + w.evict:self.sink + w.evict + keep].clone()
        k_buf[:, w.start:w.end] = k_new.detach()
        v_buf[:, w.start:w.end] = v_new.detach()
        if k_new.requires_grad or v_new.requires_grad:
            k = torch.cat([k_buf[:, :w.start], k_new], dim=1)
            v = torch.cat([v_buf[:, :w.start], v_new], dim=1)
        else:
            k, v = k_buf[:, :w.end], v_buf[:, :w.end]
        if w.sink_shift:
            k = torch.cat([rotate_frames(k[:, :self.sink], self.head_dim, w.sink_shift), k[:, self.sink:]], dim=1)
        return k, v

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
