"""Streaming few-step sampling of a block-causal generator with a KV cache (spec §3).

The pieces are plain functions (``denoise_block``, ``commit_block``) plus ``CausalStream``, an object that
owns everything one stream needs — its KV cache, its noise source and its position — while the model stays
shared and stateless. Per block:

    x ← initial noise of the block
    for each timestep t_i of the block's schedule:
        x0̂ = x − σ(t_i)·G(x, t_i)                 (KV-cached forward at the block's start frame)
        if not last: x ← (1 − σ_{i+1})·x0̂ + σ_{i+1}·ε_fresh
    commit: G(x0̂, t = 0) once more, overwriting the block's cache slots with clean K/V
    yield x0̂

The commit after the last block of a finite video is skipped by default (it only prepares a next block).
I2V puts the image latent first: it is committed to the cache at t = 0 and yielded as the first frames.
A first-frame model (``pipelines.first_frame``), when given and there is no image, makes frame 0 (or a prefix of
``frames`` frames) with its own sampler; it is then committed, block by block, and continued like the student's own.
Noise comes from one ``NoiseSource``; ``SeededNoise`` draws every tensor from one seeded generator in call
order (initial noise of a block when the block starts, then each renoising draw), ``ReplayNoise`` replays
given tensors (to reproduce another implementation's run exactly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from ..models.kv_cache import KVCache
from ..models.wan import WanDiT
from ..schedulers.flow import FewStepSchedule, add_noise, flow_to_x0

# A trace callback receives one record per model call: kind ("denoise" | "commit" | "image"), block, step,
# start_frame, x (input), t, flow (output), x0.
TraceFn = Callable[[dict], None]


class NoiseSource(Protocol):
    def initial(self, shape: tuple[int, ...]) -> Tensor: ...
    def fresh(self, shape: tuple[int, ...]) -> Tensor: ...


class SeededNoise:
    """All noise of a stream from one seeded generator, drawn in call order."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = generator or torch.Generator(device=self.device).manual_seed(int(seed))

    @classmethod
    def from_generator(cls, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> "SeededNoise":
        """Draw from an existing generator (e.g. a trainer's, whose state is checkpointed)."""
        return cls(0, generator.device, dtype, generator=generator)

    def _draw(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    initial = _draw
    fresh = _draw

    def state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class ReplayNoise:
    """Replays fixed tensors: ``initial`` is consumed frame-wise from a [B, F, C, H, W] tensor, ``fresh`` one
    tensor at a time from a sequence (e.g. the recorded draws of a reference run)."""

    def __init__(self, initial: Tensor, fresh: Sequence[Tensor] = ()):
        self._initial = initial
        self._frame = 0
        self._fresh = list(fresh)
        self._next = 0

    def initial(self, shape: tuple[int, ...]) -> Tensor:
        n = shape[1]
        if self._frame + n > self._initial.shape[1]:
            raise IndexError("replayed initial noise is exhausted")
        out = self._initial[:, self._frame:self._frame + n]
        self._frame += n
        return out

    def fresh(self, shape: tuple[int, ...]) -> Tensor:
        if self._next >= len(self._fresh):
            raise IndexError("replayed fresh noise is exhausted")
        out = self._fresh[self._next]
        self._next += 1
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"replayed noise has shape {tuple(out.shape)}, expected {tuple(shape)}")
        return out


def _timesteps(value: float, like: Tensor) -> Tensor:
    return torch.full(like.shape[:2], value, dtype=torch.float32, device=like.device)


def denoise_block(model: WanDiT, x: Tensor, steps: Sequence[float], schedule: FewStepSchedule, *,
                  context: Tensor, cache: KVCache, start_frame: int, noise: NoiseSource,
                  exit_step: int | None = None, grad_exit: bool = False, trace: TraceFn | None = None,
                  block: int = 0) -> Tensor:
    """Few-step denoising of one block (predict x0, renoise with fresh noise, repeat); returns x0̂.

    ``exit_step`` stops after that step (self-forcing rollouts); with ``grad_exit`` only the exit step's
    forward records gradients.
    """
    last = len(steps) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(steps):
        raise ValueError(f"exit_step {exit_step} is outside the {len(steps)}-step schedule")
    x0 = x
    for i in range(last + 1):
        t = _timesteps(steps[i], x)
        with torch.set_grad_enabled(grad_exit and i == last):
            flow = model(x, t, context, cache=cache, start_frame=start_frame)
            x0 = flow_to_x0(x, flow, schedule.sigma(t))
        if trace is not None:
            trace(dict(kind="denoise", block=block, step=i, start_frame=start_frame, x=x, t=t, flow=flow, x0=x0))
        if i < last:
            eps = noise.fresh(tuple(x.shape)).to(x.device, x.dtype)
            x = add_noise(x0.detach(), eps, schedule.sigma(_timesteps(steps[i + 1], x)))
    return x0


@torch.no_grad()
def commit_block(model: WanDiT, x0: Tensor, *, context: Tensor, cache: KVCache, start_frame: int,
                 t: float = 0.0, noise: NoiseSource | None = None, schedule: FewStepSchedule | None = None,
                 trace: TraceFn | None = None, block: int = 0, kind: str = "commit") -> None:
    """Run the model on a finished block at timestep ``t`` so its cache slots hold its K/V as context.

    With t = 0 the block goes in exactly as it is (no noise). With t > 0 ("context noise") it is first
    noised to σ(t) with a fresh draw from ``noise``.
    """
    tt = _timesteps(t, x0)
    x = x0.detach()
    if t > 0:
        if noise is None or schedule is None:
            raise ValueError("a commit at t > 0 needs a noise source and a schedule")
        x = add_noise(x, noise.fresh(tuple(x.shape)).to(x.device, x.dtype), schedule.sigma(tt))
    flow = model(x, tt, context, cache=cache, start_frame=start_frame)
    if trace is not None:
        trace(dict(kind=kind, block=block, step=-1 if kind == "commit" else -2, start_frame=start_frame,
                   x=x, t=tt, flow=flow, x0=None))


@dataclass
class StreamConfig:
    """How a stream samples: block size, schedule, commits, cache window."""

    block_size: int = 1
    schedule: FewStepSchedule = field(default_factory=lambda: FewStepSchedule.from_config([1000, 750, 500, 250]))
    commit_t: float = 0.0                 # timestep of the clean cache refresh ("context_noise")
    commit_last: bool = False             # also refresh after the last block of a finite video
    window_frames: int | None = None      # local attention window (rolling cache), None = global
    sink_frames: int = 0
    sink_rope: str = "absolute"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


class CausalStream:
    """One streaming generation: owns its KV cache, noise source and position; the model is shared.

    Iterate to get finished latent blocks [B, n, C, H, W] in order (the I2V image latent comes first).
    ``num_frames`` is the number of latent frames in total (including an I2V image); ``None`` streams
    forever, which needs a windowed cache.
    """

    def __init__(self, model: WanDiT, context: Tensor, *, latent_hw: tuple[int, int],
                 num_frames: int | None, config: StreamConfig | None = None, noise: NoiseSource | None = None,
                 seed: int = 0, initial_latent: Tensor | None = None, trace: TraceFn | None = None,
                 exit_steps: Callable[[int], int] | None = None, grad_exit: bool = False,
                 first_frame: Callable[[Tensor, Tensor], Tensor] | None = None):
        self.model = model
        # Optional first-frame model (pipelines.first_frame): (context, noise [B, k, C, H, W]) -> latent frames
        # 0..k-1 (k = its ``frames``, default 1); one with ``iter_frames`` gives them one at a time, and the stream
        # hands each on as soon as it is made. Without an I2V image it makes the prefix; the student then starts
        # at frame k, as after an image.
        self.first_frame = first_frame
        # Self-forcing rollouts (training): stop block b after step exit_steps(b), with gradient on that step.
        self.exit_steps = exit_steps
        self.grad_exit = grad_exit
        self.cfg = config or StreamConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch_size = context.shape[0]
        self.latent_hw = tuple(latent_hw)
        self.context = context.to(self.device)
        self.noise = noise or SeededNoise(seed, self.device)
        self.trace = trace
        self.initial_latent = initial_latent
        n_img = 0 if initial_latent is None else initial_latent.shape[1]
        if num_frames is not None and num_frames <= n_img:
            raise ValueError(f"num_frames={num_frames} leaves no frame to generate after {n_img} image frame(s)")
        if num_frames is None and self.cfg.window_frames is None:
            raise ValueError("an unbounded stream needs a local window (window_frames)")
        self.num_frames = num_frames
        capacity = num_frames if self.cfg.window_frames is None else self.cfg.window_frames
        self.cache = model.new_cache(batch_size=self.batch_size, latent_hw=self.latent_hw, capacity_frames=capacity,
                                     window_frames=self.cfg.window_frames, sink_frames=self.cfg.sink_frames,
                                     sink_rope=self.cfg.sink_rope)
        self.frame = 0          # next latent frame to produce
        self.block = 0          # index of the next *generated* block (the image does not count)
        self._pending_commit: tuple[Tensor, int] | None = None
        # A first-frame model's prefix being made: (its frames, one at a time, and how many in all).
        self._prefix: tuple[Iterator[Tensor], int] | None = None
        self._held: list[Tensor] = []   # prefix frames handed on but not yet a whole block, so not yet committed

    # ---- prompt --------------------------------------------------------------------------------------
    def set_context(self, context: Tensor) -> None:
        """Switch the prompt: later blocks use the new text (the cross-attention cache is replaced)."""
        if context.shape[0] != self.batch_size:
            raise ValueError(f"new context has batch {context.shape[0]}, the stream has {self.batch_size}")
        self._flush_commit()  # the last block goes into the cache under the prompt it was made with
        if self._held:        # so do prefix frames short of a whole block
            self._commit_held()
            self._flush_commit()
        self._prefix = None   # a prefix still being made was for the old prompt: the student takes over here
        self.context = context.to(self.device)
        self.cache.text.reset()

    # ---- iteration -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.num_frames is not None and self.frame >= self.num_frames

    def __iter__(self) -> Iterator[Tensor]:
        while not self.done:
            yield self.next_block()

    def next_block(self) -> Tensor:
        """Produce the next finished latent block [B, n, C, H, W] (with gradient only for ``grad_exit``)."""
        if self.done:
            raise StopIteration
        self._flush_commit()
        if self.frame == 0 and self.initial_latent is not None:
            img = self.initial_latent.to(self.device, self.dtype).detach()
            commit_block(self.model, img, context=self.context, cache=self.cache, start_frame=0,
                         t=0.0, trace=self.trace, block=-1, kind="image")
            self.frame = img.shape[1]
            return img
        if self.frame == 0 and self.first_frame is not None and self._prefix is None:
            k = getattr(self.first_frame, "frames", 1)     # a first-frame model may make a prefix of k frames
            k = k if self.num_frames is None else min(k, self.num_frames)
            x = self.noise.initial((self.batch_size, k, self.model.config.in_dim, *self.latent_hw))
            x = x.to(self.device, torch.float32)
            by_frame = getattr(self.first_frame, "iter_frames", None)   # frame by frame where the sampler can
            frames = by_frame(self.context, x) if by_frame is not None else iter([self.first_frame(self.context, x)])
            self._prefix = (frames, k)
        if self._prefix is not None:
            return self._next_prefix_block()
        n = self.cfg.block_size if self.num_frames is None else min(self.cfg.block_size, self.num_frames - self.frame)
        C = self.model.config.in_dim
        shape = (self.batch_size, n, C, *self.latent_hw)
        x = self.noise.initial(shape).to(self.device, self.dtype)
        exit_step = self.exit_steps(self.block) if self.exit_steps is not None else None
        x0 = denoise_block(self.model, x, self.cfg.schedule.for_block(self.block), self.cfg.schedule,
                           context=self.context, cache=self.cache, start_frame=self.frame, noise=self.noise,
                           exit_step=exit_step, grad_exit=self.grad_exit, trace=self.trace, block=self.block)
        start = self.frame
        self.frame += n
        self.block += 1
        self._pending_commit = (x0, start)
        if self.done and self.cfg.commit_last:
            self._flush_commit()
        return x0

    def _next_prefix_block(self) -> Tensor:
        """The next piece of a first-frame model's prefix, handed on as soon as it is made: one frame at a time
        where the sampler gives them so (frame 0 reaches the consumer before the rest of the prefix is computed).
        The prefix goes into the cache in the student's blocks (block index -1 in traces): a block is committed once
        all its frames are made. With ``refine_steps`` the student re-draws the prefix a whole block at a time."""
        frames, k = self._prefix  # type: ignore[misc]
        n = self.cfg.block_size
        refine = int(getattr(self.first_frame, "refine_steps", 0))
        if refine:
            pieces: list[Tensor] = []
            while sum(p.shape[1] for p in pieces) < min(n, k - self.frame):
                pieces.append(next(frames).to(self.device, self.dtype))
            img = self._refine_prefix(torch.cat(pieces, dim=1), refine, start=self.frame)
        else:
            img = next(frames).to(self.device, self.dtype)
            self._held.append(img)
        self.frame += img.shape[1]
        if self._held and (sum(p.shape[1] for p in self._held) >= n or self.frame >= k):
            self._commit_held()
        if self.frame >= k:
            self._prefix = None
        if self.done and self.cfg.commit_last:
            self._flush_commit()
        return img

    def _commit_held(self) -> None:
        """Queue the held prefix frames (the newest frames made) as the next commit."""
        held = torch.cat(self._held, dim=1)
        self._pending_commit = (held, self.frame - held.shape[1])
        self._held = []

    def _refine_prefix(self, prefix: Tensor, refine: int, start: int = 0) -> Tensor:
        """Re-draw a first-frame model's prefix with the student, block by block: each block of the prefix is
        noised to the student's ``refine``-th last timestep and denoised through the student's last ``refine``
        steps, on the cache of the blocks before it. The coarse layout (where objects are, how they move) comes
        from the prefix; the fine detail is the student's own, so the student later continues frames that look
        like its own."""
        steps = self.cfg.schedule.steps
        if not 1 <= refine <= len(steps):
            raise ValueError(f"refine_steps {refine} is outside the student's {len(steps)}-step schedule")
        steps = steps[-refine:]
        n = self.cfg.block_size
        out = []
        for i in range(0, prefix.shape[1], n):
            self._flush_commit()
            piece = prefix[:, i:i + n]
            eps = self.noise.fresh(tuple(piece.shape)).to(piece.device, piece.dtype)
            x = add_noise(piece, eps, self.cfg.schedule.sigma(_timesteps(steps[0], piece)))
            x0 = denoise_block(self.model, x, steps, self.cfg.schedule, context=self.context, cache=self.cache,
                               start_frame=start + i, noise=self.noise, trace=self.trace, block=-1)
            self._pending_commit = (x0, start + i)
            out.append(x0)
        return torch.cat(out, dim=1)

    def _flush_commit(self) -> None:
        """Commit the previous block lazily, right before it is needed (so a consumer gets the block first)."""
        if self._pending_commit is None:
            return
        x0, start = self._pending_commit
        self._pending_commit = None
        # A first-frame model's prefix may be longer than a block: it goes in block by block, as the student's
        # own frames would (within a block attention is full, so one commit of the whole prefix would differ).
        n = self.cfg.block_size
        for i in range(0, x0.shape[1], n):
            commit_block(self.model, x0[:, i:i + n], context=self.context, cache=self.cache, start_frame=start + i,
                         t=self.cfg.commit_t, noise=self.noise, schedule=self.cfg.schedule, trace=self.trace,
                         block=self.block - 1)

    def generate(self) -> Tensor:
        """Run a finite stream to the end; returns all latent frames [B, F, C, H, W]."""
        if self.num_frames is None:
            raise ValueError("generate() needs a finite num_frames")
        return torch.cat(list(self), dim=1)


def sample_causal(model: WanDiT, context: Tensor, *, latent_hw: tuple[int, int], num_frames: int,
                  config: StreamConfig | None = None, noise: NoiseSource | None = None, seed: int = 0,
                  initial_latent: Tensor | None = None, trace: TraceFn | None = None,
                  first_frame: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Generate a whole latent video with the streaming sampler (convenience wrapper of ``CausalStream``)."""
    return CausalStream(model, context, latent_hw=latent_hw, num_frames=num_frames, config=config, noise=noise,
                        seed=seed, initial_latent=initial_latent, trace=trace, first_frame=first_frame).generate()
