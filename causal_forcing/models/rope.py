"""3D rotary position embedding of the Wan DiT (interleaved pairs, absolute frame positions).

Each head's channels form complex pairs (2i, 2i+1). The first group of pairs rotates with the token's frame
index, the next with its row, the last with its column (split d - 4·⌊d/6⌋, 2·⌊d/6⌋, 2·⌊d/6⌋ channels).
Angles are computed in float64 on the fly from integer positions, so there is no position table to run past:
a stream may go on for any number of frames.
"""
from __future__ import annotations

import torch
from torch import Tensor

THETA = 10000.0


def _inv_freq(channels: int, device: torch.device) -> Tensor:
    """Frequencies 1 / θ^(2j / channels), j = 0 .. channels/2 - 1, in float64."""
    return 1.0 / torch.pow(THETA, torch.arange(0, channels, 2, dtype=torch.float64, device=device) / channels)


def rope_angles(head_dim: int, frames: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Rotation angles [L, head_dim / 2] (float64) for tokens at the given (frame, row, column) positions."""
    d = head_dim
    c_t, c_hw = d - 4 * (d // 6), 2 * (d // 6)
    dev = frames.device
    return torch.cat([
        frames.to(torch.float64)[:, None] * _inv_freq(c_t, dev)[None],
        rows.to(torch.float64)[:, None] * _inv_freq(c_hw, dev)[None],
        cols.to(torch.float64)[:, None] * _inv_freq(c_hw, dev)[None],
    ], dim=1)


def grid_positions(num_frames: int, height: int, width: int, start_frame: int = 0,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(frame, row, column) of every token of a [F, H', W'] token grid in raster order (frame-major)."""
    f = torch.arange(start_frame, start_frame + num_frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    ff, hh, ww = torch.meshgrid(f, h, w, indexing="ij")
    return ff.reshape(-1), hh.reshape(-1), ww.reshape(-1)


class RotaryTable:
    """The rotations for one token layout as unit complex numbers cos + i·sin [L, D/2] (complex64), computed once
    and reused by every layer."""

    def __init__(self, angles: Tensor):
        self.rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    @property
    def cos(self) -> Tensor:
        return self.rot.real

    @property
    def sin(self) -> Tensor:
        return self.rot.imag

    @classmethod
    def for_grid(cls, head_dim: int, num_frames: int, height: int, width: int, start_frame: int = 0,
                 device: torch.device | str = "cpu") -> "RotaryTable":
        return cls(rope_angles(head_dim, *grid_positions(num_frames, height, width, start_frame, device)))

    @classmethod
    def concat(cls, tables: list["RotaryTable"]) -> "RotaryTable":
        out = cls.__new__(cls)
        out.rot = torch.cat([t.rot for t in tables])
        return out


def apply_rope(x: Tensor, table: RotaryTable) -> Tensor:
    """Rotate x [B, L, H, D] by the table's angles [L, D/2] (interleaved pairs); float32 math, x's dtype out.

    Each pair (re, im) is one complex number multiplied by cos + i·sin: (re·cos − im·sin, re·sin + im·cos), in one
    complex multiply (a third of the time of the four real products and a stack, forward and backward, on a CPU)."""
    pairs = x.to(torch.float32).unflatten(-1, (-1, 2)).contiguous()
    out = torch.view_as_complex(pairs) * table.rot[None, :, None, :]
    return torch.view_as_real(out).flatten(-2).to(x.dtype)


def rotate_frames(x: Tensor, head_dim: int, delta_frames: int) -> Tensor:
    """Shift the temporal position of already-rotated keys x [B, L, H, D] by ``delta_frames`` frames.

    Rotations compose, so this moves cached keys (e.g. an attention sink) to a new frame position without
    knowing their original position.
    """
    if delta_frames == 0:
        return x
    L = x.shape[1]
    zeros = torch.zeros(L, dtype=torch.long, device=x.device)
    frames = torch.full((L,), delta_frames, dtype=torch.long, device=x.device)
    return apply_rope(x, RotaryTable(rope_angles(head_dim, frames, zeros, zeros)))
