"""Attention layouts (which token may see which) and attention backends.

Every mask this model needs is block-structured at frame granularity: a contiguous run of query tokens
attends to one or two contiguous runs of key tokens. An ``AttentionPlan`` lists those runs, which lets each
backend compute exactly the masked attention, all but ``masked`` without materialising a dense [L, L] mask:

* ``sdpa``  – PyTorch scaled_dot_product_attention per query run, keys gathered from their runs (CPU/CUDA);
* ``masked`` – one scaled_dot_product_attention call with the plan's dense boolean mask (built once per plan);
              for short sequences only (the mask is L × L), where one fused call beats many small ones;
* ``flex``  – FlexAttention with a mask_mod derived from the plan (compiled on CUDA, eager elsewhere);
* ``flash`` – flash-attn per query run, used only if the package is installed (never required);
* ``auto``  – flash when installed and usable (CUDA, fp16/bf16), otherwise sdpa; on CUDA, block masks go
              through FlexAttention when it compiles (falling back to segmented SDPA if it does not); elsewhere
              block masks of at most ``MASKED_MAX_TOKENS`` tokens go through ``masked`` when a backward pass will
              follow (on a CPU its backward is about twice as fast as the segmented one's at the ShapesWorld size;
              without gradients the segmented calls, which skip the masked-out blocks, are slightly faster).

Layouts (the DiT's attention is an input, not a subclass):
``Bidirectional()``, ``BlockCausal(block_size)``, ``TeacherForcing(block_size)`` — the last one is the
[clean; noisy] sequence of stage-1 training (spec §1.5).
"""
from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "sdpa", "masked", "flex", "flash"]
BACKENDS = ("auto", "sdpa", "masked", "flex", "flash")
# "auto" uses one masked call for block masks up to this many tokens (a bool mask of this size squared: 4 MiB).
MASKED_MAX_TOKENS = 2048
_BLOCK_MASK_CACHE_SIZE = 16  # masks kept per kind (dense, Flex), least recently used dropped first


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bidirectional:
    """Every token attends to every token (the bidirectional Wan model)."""


@dataclass(frozen=True)
class BlockCausal:
    """Blocks of ``block_size`` frames; a token sees every frame up to the end of its own block."""

    block_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class TeacherForcing:
    """Sequence [clean frames; noisy frames]. Clean tokens are block-causal among clean tokens; a noisy token in
    block b sees the clean tokens of blocks < b and the noisy tokens of block b only."""

    block_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


Layout = Union[Bidirectional, BlockCausal, TeacherForcing]


@dataclass(frozen=True)
class Segment:
    """Query tokens [q0, q1) attend to the union of key ranges [k0, k1)."""

    q0: int
    q1: int
    keys: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class AttentionPlan:
    segments: tuple[Segment, ...]
    length: int  # total number of query (= key) tokens

    def dense_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """Boolean [L, L] mask (True = may attend). For tests and small sequences only."""
        m = torch.zeros(self.length, self.length, dtype=torch.bool, device=device)
        for s in self.segments:
            for k0, k1 in s.keys:
                m[s.q0:s.q1, k0:k1] = True
        return m


def _blocks(num_frames: int, block_size: int) -> list[tuple[int, int]]:
    """Frame ranges [f0, f1) of the blocks of a clip (the last block may be shorter)."""
    return [(f0, min(f0 + block_size, num_frames)) for f0 in range(0, num_frames, block_size)]


@lru_cache(maxsize=64)
def build_plan(layout: Layout, num_frames: int, tokens_per_frame: int) -> AttentionPlan:
    """The attention plan of ``layout`` for a clip of ``num_frames`` frames (2× that many for teacher forcing)."""
    S = tokens_per_frame
    if isinstance(layout, Bidirectional):
        L = num_frames * S
        return AttentionPlan((Segment(0, L, ((0, L),)),), L)
    if isinstance(layout, BlockCausal):
        segs = tuple(Segment(f0 * S, f1 * S, ((0, f1 * S),)) for f0, f1 in _blocks(num_frames, layout.block_size))
        return AttentionPlan(segs, num_frames * S)
    if isinstance(layout, TeacherForcing):
        N = num_frames * S
        blocks = _blocks(num_frames, layout.block_size)
        clean = [Segment(f0 * S, f1 * S, ((0, f1 * S),)) for f0, f1 in blocks]
        noisy = [Segment(N + f0 * S, N + f1 * S,
                         tuple(r for r in ((0, f0 * S), (N + f0 * S, N + f1 * S)) if r[1] > r[0]))
                 for f0, f1 in blocks]
        return AttentionPlan(tuple(clean + noisy), 2 * N)
    raise TypeError(f"unknown attention layout {layout!r}")


# ---------------------------------------------------------------------------------------------------------
# Backends. q, k, v are [B, L, H, D] (the Wan layout); outputs too.
# ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def flash_available() -> bool:
    """Whether flash-attn is installed (looked up once: a module search on every attention call costs ~10 % of a
    KV-cached rollout on a CPU)."""
    return importlib.util.find_spec("flash_attn") is not None


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]

    return flash_attn_func(q, k, v)


def _gather(x: Tensor, ranges: tuple[tuple[int, int], ...]) -> Tensor:
    if len(ranges) == 1:
        k0, k1 = ranges[0]
        return x[:, k0:k1]
    return torch.cat([x[:, k0:k1] for k0, k1 in ranges], dim=1)


def resolve_backend(backend: Backend, q: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "auto":
        usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available()
        return "flash" if usable else "sdpa"
    if backend == "flash" and not flash_available():
        raise RuntimeError("attention backend 'flash' requested but flash-attn is not installed")
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan | None = None,
              backend: Backend = "auto") -> Tensor:
    """Softmax attention with scale 1/√D. ``plan=None`` means every query sees every key (also when the
    key sequence is longer than the query sequence, as with a KV cache)."""
    name = resolve_backend(backend, q)
    if name == "flex":
        return _flex(q, k, v, plan)
    if (backend == "auto" and q.is_cuda and plan is not None and len(plan.segments) > 1
            and _flex_usable()):
        # Block masks on a GPU: one fused FlexAttention call instead of one SDPA call per block.
        try:
            return _flex(q, k, v, plan)
        except Exception as e:  # noqa: BLE001 - compilation problems must not stop inference
            _disable_flex(e)
    if name == "masked" or (backend == "auto" and name == "sdpa" and not q.is_cuda and plan is not None
                            and len(plan.segments) > 1 and plan.length <= MASKED_MAX_TOKENS
                            and torch.is_grad_enabled() and q.requires_grad):
        return _masked(q, k, v, plan)
    kernel = _flash if name == "flash" else _sdpa
    if plan is None:
        return kernel(q, k, v)
    if len(plan.segments) == 1 and plan.segments[0].keys == ((0, plan.length),):
        return kernel(q, k, v)
    outs = [kernel(q[:, s.q0:s.q1], _gather(k, s.keys), _gather(v, s.keys)) for s in plan.segments]
    return torch.cat(outs, dim=1)


def _cached(cache: OrderedDict, key: Any, build: Any) -> Any:
    """``cache[key]``, built by ``build()`` on a miss; the least recently used entries beyond
    ``_BLOCK_MASK_CACHE_SIZE`` are dropped."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        while len(cache) > _BLOCK_MASK_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


_DENSE_MASKS: "OrderedDict[tuple[AttentionPlan, str], Tensor]" = OrderedDict()


def _masked(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan | None) -> Tensor:
    """One SDPA call with the plan's dense boolean mask, cached per (plan, device) like the block masks."""
    if plan is None:
        return _sdpa(q, k, v)
    if plan.length != q.shape[1] or q.shape[1] != k.shape[1]:
        raise ValueError("plan length does not match the query/key length")
    mask = _cached(_DENSE_MASKS, (plan, str(q.device)), lambda: plan.dense_mask(q.device))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------------------
_compiled_flex = None
_flex_failed: str | None = None


@lru_cache(maxsize=1)
def _flex_importable() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex_usable() -> bool:
    return _flex_failed is None and _flex_importable()


def _disable_flex(error: Exception) -> None:
    """Remember that FlexAttention failed here (e.g. no compiler) and fall back to SDPA from now on."""
    global _flex_failed
    import warnings
    _flex_failed = f"{type(error).__name__}: {error}"
    warnings.warn(f"FlexAttention unavailable, using SDPA for block masks ({_flex_failed.splitlines()[0]})",
                  stacklevel=3)


def _flex_fn(device: torch.device):
    """flex_attention, compiled lazily on first CUDA use (never at import time)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def plan_mask_mod(plan: AttentionPlan, device: torch.device):
    """A FlexAttention mask_mod equivalent to ``plan`` (at most two key ranges per query run)."""
    L = plan.length
    seg_of = torch.zeros(L, dtype=torch.long)
    ranges = torch.zeros(len(plan.segments), 2, 2, dtype=torch.long)
    for i, s in enumerate(plan.segments):
        if len(s.keys) > 2:
            raise ValueError("flex backend supports at most two key ranges per segment")
        seg_of[s.q0:s.q1] = i
        for j, (k0, k1) in enumerate(s.keys):
            ranges[i, j, 0], ranges[i, j, 1] = k0, k1
    seg_of, ranges = seg_of.to(device), ranges.to(device)   # built on the CPU, copied once

    def mask_mod(b, h, q_idx, kv_idx):
        r = ranges[seg_of[q_idx]]
        in0 = (kv_idx >= r[0, 0]) & (kv_idx < r[0, 1])
        in1 = (kv_idx >= r[1, 0]) & (kv_idx < r[1, 1])
        return in0 | in1

    return mask_mod


_BLOCK_MASKS: "OrderedDict[tuple[AttentionPlan, str], Any]" = OrderedDict()


def plan_block_mask(plan: AttentionPlan, device: torch.device) -> Any:
    """The FlexAttention BlockMask of ``plan`` on ``device``, built once per (plan, device) and reused: every layer
    of every forward with the same layout shares it (building it costs far more than the attention itself)."""
    from torch.nn.attention.flex_attention import create_block_mask
    return _cached(_BLOCK_MASKS, (plan, str(device)), lambda: create_block_mask(
        plan_mask_mod(plan, device), None, None, plan.length, plan.length, device=device))


def _flex(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan | None) -> Tensor:
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    block_mask = None
    if plan is not None:
        if plan.length != Lq or Lq != Lk:
            raise ValueError("plan length does not match the query/key length")
        block_mask = plan_block_mask(plan, q.device)
    out = _flex_fn(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                             scale=1.0 / math.sqrt(D))
    return out.transpose(1, 2)
