"""Interactive streaming: unbounded video with a rolling KV cache, live prompt switching with re-caching.

Built on the public pieces of ``streaming.py`` (``CausalStream``, ``commit_block``) and ``KVCache``:

* **Unbounded streams.** ``InteractiveStream(pipeline, prompt, num_frames=None, window_frames=W, sink_frames=S)``
  streams decoded frames forever; memory is flat (a fixed-size KV cache, a bounded latent history, a bounded
  timing record, the VAE decoder's fixed feature cache).
* **Prompt switching with re-caching** (LongLive-style). ``CausalStream.set_context`` alone only swaps the text:
  the cached self-attention K/V of the recent frames were computed under the old prompt (every layer after the
  first sees the text through cross-attention). ``switch_context(stream, context, history, recache_frames=n)``
  additionally *rewinds* the cache over the last n committed clean frames (whole blocks) and commits them again
  at t = 0 under the new prompt, block by block at their original positions, so the cache is what a stream that
  had committed those same clean frames under the new prompt would hold. Older frames (the attention sink
  included) keep their K/V. Re-caching runs the model once per re-cached block.
* **I2V**: the image latent is the first committed block and may be re-cached like any other.

Frames that may be re-cached: whole blocks that the cache still holds outside a sink that already rolls (once
frames have been evicted, slots no longer equal positions below the sink boundary).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..models.kv_cache import SinkRope
from ..models.vae import ImageSource, pixel_frames_for, pixels_to_frames
from .streaming import CausalStream, StreamConfig, commit_block
from .video import BlockTiming, VideoPipeline

__all__ = [
    "InteractiveStream",
    "LatentHistory",
    "RollingTiming",
    "recache",
    "switch_context",
    "windowed_config",
]

# Streams may run in several threads at once (one server session each). Tokenizers (HF "fast" tokenizers) are not
# safe to call concurrently and the pipeline's placement count is plain Python state, so prompt and image encoding
# and acquiring/releasing the pipeline go through this lock. Model forwards do not need it.
_PIPELINE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# Cache surgery
# ---------------------------------------------------------------------------------------------------------------
def windowed_config(config: StreamConfig, window_frames: int, sink_frames: int = 0,
                    sink_rope: SinkRope = "rolling") -> StreamConfig:
    """``config`` with a rolling KV cache of ``window_frames`` latent frames whose first ``sink_frames`` stay."""
    return dataclasses.replace(config, window_frames=window_frames, sink_frames=sink_frames, sink_rope=sink_rope)


class LatentHistory:
    """The most recent committed latent blocks of one stream, ``(start_frame, latents [B, n, C, h, w])``.

    Keeps whole blocks, dropping the oldest while the rest still hold ``keep_frames`` frames.
    """

    def __init__(self, keep_frames: int):
        if keep_frames < 1:
            raise ValueError(f"keep_frames must be >= 1, got {keep_frames}")
        self.keep_frames = keep_frames
        self._blocks: deque[tuple[int, Tensor]] = deque()
        self._frames = 0

    @property
    def frames(self) -> int:
        return self._frames

    def push(self, start_frame: int, latents: Tensor) -> None:
        if self._blocks:
            last_start, last = self._blocks[-1]
            if start_frame != last_start + last.shape[1]:
                raise ValueError(f"block at frame {start_frame} does not follow the block at {last_start}")
        self._blocks.append((start_frame, latents.detach()))
        self._frames += latents.shape[1]
        while self._frames - self._blocks[0][1].shape[1] >= self.keep_frames:
            self._frames -= self._blocks.popleft()[1].shape[1]

    def suffix(self, frames: int, limit: int) -> list[tuple[int, Tensor]]:
        """The newest whole blocks holding at least ``frames`` frames (fewer if the history is shorter), but never
        more than ``limit`` frames in total; oldest first."""
        chosen: list[tuple[int, Tensor]] = []
        total = 0
        for start, latents in reversed(self._blocks):
            n = latents.shape[1]
            if total >= frames or total + n > limit:
                break
            chosen.append((start, latents))
            total += n
        return chosen[::-1]


@torch.no_grad()
def recache(stream: CausalStream, blocks: list[tuple[int, Tensor]]) -> int:
    """Rewind ``stream``'s cache over ``blocks`` (its newest committed blocks, oldest first) and commit them again
    at t = 0 with the stream's current context, at their original positions. Returns the frames re-cached."""
    if not blocks:
        return 0
    cache = stream.cache
    frames = sum(b.shape[1] for _, b in blocks)
    last_start, last = blocks[-1]
    if cache.num_frames != stream.frame or last_start + last.shape[1] != stream.frame:
        raise ValueError(f"the blocks end at frame {last_start + last.shape[1]}, the cache holds "
                         f"{cache.num_frames} frame(s) and the stream is at {stream.frame}; commit first")
    if any(s + b.shape[1] != s_next for (s, b), (s_next, _) in zip(blocks, blocks[1:])):
        raise ValueError("the blocks to re-cache are not contiguous")
    cache.rewind(frames)
    for start, latents in blocks:
        commit_block(stream.model, latents, context=stream.context, cache=cache, start_frame=start, t=0.0,
                     trace=stream.trace, block=stream.block - 1, kind="recache")
    return frames


def switch_context(stream: CausalStream, context: Tensor, history: LatentHistory | None,
                   recache_frames: int = 0) -> int:
    """Switch ``stream`` to ``context``; with ``recache_frames`` > 0 also re-cache that many of the newest frames
    (rounded up to whole blocks, capped at what the cache can rewind). Returns the frames re-cached."""
    stream.set_context(context)  # commits the last block under the prompt it was made with
    if recache_frames <= 0 or history is None:
        return 0
    return recache(stream, history.suffix(recache_frames, stream.cache.rewindable_frames))


# ---------------------------------------------------------------------------------------------------------------
# Decoded interactive stream
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RollingTiming:
    """Timings of a possibly endless stream: running totals plus the most recent blocks only."""

    setup_s: float = 0.0
    time_to_first_frame_s: float | None = None
    blocks_done: int = 0
    pixel_frames: int = 0
    latency_s: float = 0.0               # sum of every block's sampling + decoding time
    last_switch_s: float | None = None   # the last prompt switch: text encoding + re-caching
    recent: deque[BlockTiming] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, block: BlockTiming) -> None:
        self.blocks_done += 1
        self.pixel_frames += block.pixel_frames
        self.latency_s += block.latency_s
        self.recent.append(block)

    @property
    def fps(self) -> float:
        """Frames per second of the whole stream so far (setup and decode included)."""
        t = self.setup_s + self.latency_s
        return self.pixel_frames / t if t > 0 else 0.0

    @property
    def recent_fps(self) -> float:
        """Frames per second over the recent blocks (decode included): the current rate."""
        t = sum(b.latency_s for b in self.recent)
        return sum(b.pixel_frames for b in self.recent) / t if t > 0 else 0.0


class InteractiveStream:
    """One live video: uint8 frames ``[T, H, W, 3]`` per block, unbounded or finite, switchable prompt.

    ``num_frames``: pixel frames (1 + 4k, the I2V image included) or ``None`` for an endless stream, which needs
    a rolling window: the pipeline's own, or ``window_frames`` / ``sink_frames`` / ``sink_rope`` given here
    (these replace the pipeline's window). ``recache_frames``: frames re-cached by default on ``set_prompt``.
    Close it (or use it as a context manager) when stopping early.
    """

    def __init__(self, pipeline: VideoPipeline, prompt: str, *, seed: int = 0, image: ImageSource | None = None,
                 num_frames: int | None = None, window_frames: int | None = None, sink_frames: int = 0,
                 sink_rope: SinkRope = "rolling", recache_frames: int = 0, timing_window: int = 64) -> None:
        config = pipeline.stream_config
        if window_frames is not None:
            config = windowed_config(config, window_frames, sink_frames, sink_rope)
        latent_frames = None if num_frames is None else pipeline.latent_frames(num_frames)
        if latent_frames is None and config.window_frames is None:
            raise InputError("an endless stream needs a rolling window (window_frames)")
        if image is not None and config.block_size != 1:
            raise InputError(f"image-to-video needs a frame-wise model (block size 1); this one uses blocks of "
                             f"{config.block_size} latent frames")
        if image is not None and latent_frames is not None and latent_frames < 2:
            raise InputError("image-to-video needs at least 5 frames (the image plus one generated block)")
        if recache_frames < 0:
            raise InputError(f"recache_frames must be >= 0, got {recache_frames}")
        self.pipeline = pipeline
        self.prompt = prompt
        self.seed = seed
        self.recache_frames = recache_frames
        self.timing = RollingTiming(recent=deque(maxlen=timing_window))
        self._closed = False
        start = time.perf_counter()
        with _PIPELINE_LOCK:
            pipeline._acquire()
        try:
            with _PIPELINE_LOCK:
                context = pipeline.encode_prompt(prompt)
                initial = None if image is None else pipeline.encode_image(image)
                first = pipeline.first_frame_for(prompt)
            try:
                self._latents = CausalStream(pipeline.model, context, latent_hw=pipeline.latent_hw,
                                             num_frames=latent_frames, config=config, seed=seed,
                                             initial_latent=initial, first_frame=first)
            except ValueError as e:  # a window that cannot hold a block, too few frames, ...
                raise InputError(str(e)) from None
            self._decoder = pipeline.vae.streaming_decoder()
        except BaseException:
            self.close()
            raise
        cache = self._latents.cache
        self.history = LatentHistory(cache.capacity // cache.tokens_per_frame)
        self.timing.setup_s = time.perf_counter() - start

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def latents(self) -> CausalStream:
        """The underlying latent stream (its KV cache, position and noise)."""
        return self._latents

    @property
    def done(self) -> bool:
        return self._closed or self._latents.done

    @property
    def endless(self) -> bool:
        return self._latents.num_frames is None

    @property
    def pixel_frames(self) -> int:
        """Pixel frames produced so far."""
        return pixel_frames_for(self._latents.frame) if self._latents.frame else 0

    # ---- control -------------------------------------------------------------------------------------------
    def set_prompt(self, prompt: str, *, recache_frames: int | None = None) -> int:
        """Blocks generated from now on follow ``prompt``; earlier blocks are unchanged. Re-caches
        ``recache_frames`` (default: the stream's) of the newest frames first; returns the frames re-cached."""
        if self.done:
            raise InputError("the stream has ended")
        n = self.recache_frames if recache_frames is None else recache_frames
        if n < 0:
            raise InputError(f"recache_frames must be >= 0, got {n}")
        start = time.perf_counter()
        with _PIPELINE_LOCK:
            context = self.pipeline.encode_prompt(prompt)
        with torch.no_grad():
            recached = switch_context(self._latents, context, self.history, n)
        self.prompt = prompt
        self.timing.last_switch_s = time.perf_counter() - start
        return recached

    def next_block(self) -> np.ndarray:
        """Sample and decode the next block; uint8 frames ``[T, H, W, 3]``."""
        if self.done:
            raise StopIteration
        try:
            latents = self._latents
            is_image = latents.frame == 0 and latents.initial_latent is not None
            start_frame = latents.frame
            t0 = time.perf_counter()
            with torch.no_grad():
                block = latents.next_block()
                t1 = time.perf_counter()
                frames = pixels_to_frames(self._decoder.decode_block(block))
            t2 = time.perf_counter()
        except BaseException:
            self.close()
            raise
        self.history.push(start_frame, block)
        if self.timing.time_to_first_frame_s is None:
            self.timing.time_to_first_frame_s = self.timing.setup_s + (t2 - t0)
        self.timing.add(BlockTiming(self.timing.blocks_done, block.shape[1], len(frames), t1 - t0, t2 - t1,
                                    is_image))
        if self._latents.done:
            self.close()
        return frames

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self.done:
            yield self.next_block()

    def close(self) -> None:
        """Stop and release the pipeline's offloaded parts (idempotent). The cache goes with this object."""
        if not self._closed:
            self._closed = True
            with _PIPELINE_LOCK:
                self.pipeline._release()

    def __enter__(self) -> InteractiveStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
