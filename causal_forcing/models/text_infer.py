"""Read the architecture of a Wan T5 encoder off its weights (``models_t5_umt5-xxl-enc-bf16.pth`` key layout).

``UMT5TextEncoder.from_wan_folder`` defaults to the full-size UMT5-XXL config; this module infers the config from
the keys and shapes of the Wan-layout state dict instead, so an encoder of any size loads (the official file gives
exactly :func:`models.text.umt5_xxl_config`):

- ``token_embedding.weight`` ``[vocab_size, d_model]``;
- ``blocks.{i}.*`` → ``num_layers`` (indices 0..n-1);
- ``blocks.0.pos_embedding.embedding.weight`` ``[relative_attention_num_buckets, num_heads]`` (UMT5: one table
  per layer);
- ``blocks.0.attn.q.weight`` ``[num_heads * d_kv, d_model]``;
- ``blocks.0.ffn.fc1.weight`` ``[d_ff, d_model]``.

The relative-position ``max_distance`` is not stored in the file; Wan's T5 always uses 128 (the XXL value).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoints import read_torch_file
from ..errors import CheckpointError
from .text import UMT5_CHECKPOINT_NAME, umt5_xxl_config

if TYPE_CHECKING:
    from transformers import UMT5Config

__all__ = ["infer_umt5_config", "umt5_config_for_folder"]

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_SHARED_POSITION_TABLE = "pos_embedding.embedding.weight"


def _matrix(shapes: Mapping[str, tuple[int, ...]], key: str, source: str) -> tuple[int, int]:
    """The two sizes of the 2-D weight ``key``."""
    if key not in shapes:
        raise CheckpointError(f"{source}: missing key {key!r}; cannot infer the T5 architecture")
    shape = shapes[key]
    if len(shape) != 2:
        raise CheckpointError(f"{source}: key {key!r} has shape {shape}, expected a matrix")
    return shape[0], shape[1]


def infer_umt5_config(state: Mapping[str, Any], source: str = "T5 state dict") -> UMT5Config:
    """The ``UMT5Config`` of a Wan-layout T5 encoder state dict (tensors on any device, or shapes).

    Everything the shapes do not determine (activation, norms, dropout, max distance) is Wan's, as in
    :func:`models.text.umt5_xxl_config`; for the official file the result equals ``umt5_xxl_config()``.

    Raises:
        CheckpointError: a key needed for the inference is missing or mis-shaped, the block indices have gaps,
            or the file is a T5 with one shared relative-position table (not UMT5).
    """
    shapes = {key: tuple(int(n) for n in getattr(value, "shape", value)) for key, value in state.items()}
    if _SHARED_POSITION_TABLE in shapes:
        raise CheckpointError(f"{source}: one shared relative-position table ({_SHARED_POSITION_TABLE}) means a "
                              "T5, not Wan's UMT5 (one table per layer)")
    layers = sorted({int(m[1]) for key in shapes if (m := _BLOCK.match(key))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: the blocks.* indices are not 0..n-1 (found {layers[:8]})")
    vocab_size, d_model = _matrix(shapes, "token_embedding.weight", source)
    buckets, num_heads = _matrix(shapes, "blocks.0.pos_embedding.embedding.weight", source)
    inner, _ = _matrix(shapes, "blocks.0.attn.q.weight", source)
    d_ff, _ = _matrix(shapes, "blocks.0.ffn.fc1.weight", source)
    if inner % num_heads:
        raise CheckpointError(f"{source}: attention width {inner} is not a multiple of {num_heads} heads")
    return umt5_xxl_config(vocab_size=vocab_size, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff,
                           num_layers=len(layers), num_heads=num_heads, relative_attention_num_buckets=buckets)


def umt5_config_for_folder(folder: str | Path) -> UMT5Config:
    """The UMT5 config of the T5 weights in a Wan2.1 folder (``models_t5_umt5-xxl-enc-bf16.pth``).

    Only the shapes are read: the (zip-format) file is memory-mapped, so this costs almost nothing even for the
    11 GB official file. Meant as the ``config`` argument of ``UMT5TextEncoder.from_wan_folder``.

    Raises:
        CheckpointError: the file is missing, unreadable, not a state dict, or not a Wan-layout UMT5 encoder.
    """
    path = Path(folder) / UMT5_CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"UMT5 checkpoint not found: {path}")
    state = read_torch_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat dict of named tensors")
    return infer_umt5_config(state, source=str(path))
