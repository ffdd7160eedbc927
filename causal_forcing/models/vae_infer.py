"""Read the architecture of a Wan2.1 VAE off its weight file (the original ``Wan2.1_VAE.pth`` key layout).

``models.vae.load_wan_vae`` builds the network from a config and then loads the weights strictly; a single weight
file carries no config, so without this module the full-size Wan2.1 VAE is assumed. Here the config is inferred
from the keys and shapes alone, so a file of any size loads (full size gives exactly the official config):

- ``base_dim``: output channels of the first convolution, ``encoder.conv1.weight`` ``[base_dim, 3, 3, 3, 3]``;
- ``z_dim``: channels of ``conv2`` (diffusers' ``post_quant_conv``) ``[z_dim, z_dim, 1, 1, 1]``;
- ``num_res_blocks``, ``dim_mult``, ``temperal_downsample``: the encoder's flat list ``encoder.downsamples.{i}``
  holds, per level, ``num_res_blocks`` residual blocks (``residual.*``; their output width is
  ``base_dim * dim_mult[level]``) and, between levels, a resample (``resample.1.*``, plus ``time_conv.*`` when the
  level also halves time);
- ``decoder_base_dim`` (only when it differs from ``base_dim``): ``decoder.conv1.weight`` has
  ``decoder_base_dim * dim_mult[-1]`` output channels.

Latent statistics (``latents_mean`` / ``latents_std``) are not stored in the file; the official Wan2.1 values
(diffusers' defaults) exist for ``z_dim`` 16 only, so other latent widths are refused by :func:`wan_vae_config_for`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoints import read_torch_file
from ..errors import CheckpointError, ConfigError

__all__ = ["OFFICIAL_Z_DIM", "infer_wan_vae_config", "read_weight_shapes", "wan_vae_config_for"]

#: Latent channels of the Wan2.1 VAE: the only width with official latent statistics.
OFFICIAL_Z_DIM = 16

Shapes = dict[str, tuple[int, ...]]

_ENCODER_LAYER = re.compile(r"encoder\.downsamples\.(\d+)\.(.+)")
_DIFFUSERS_MARKER = "encoder.conv_in.weight"


def _as_shapes(state: Mapping[str, Any]) -> Shapes:
    """Key → shape, from tensors (any device, ``meta`` included) or from shapes given directly."""
    return {key: tuple(int(n) for n in getattr(value, "shape", value)) for key, value in state.items()}


def _shape(shapes: Shapes, key: str, ndim: int, source: str) -> tuple[int, ...]:
    """The shape of ``key``, which must exist and have ``ndim`` dimensions."""
    if key not in shapes:
        raise CheckpointError(f"{source}: missing key {key!r}; cannot infer the VAE architecture")
    shape = shapes[key]
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: key {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _encoder_layers(shapes: Shapes, source: str) -> list[tuple[str, int | bool]]:
    """The encoder's flat layer list: ``("residual", output width)`` or ``("resample", halves time)`` per index."""
    suffixes: dict[int, set[str]] = {}
    for key in shapes:
        match = _ENCODER_LAYER.fullmatch(key)
        if match:
            suffixes.setdefault(int(match[1]), set()).add(match[2])
    if sorted(suffixes) != list(range(len(suffixes))) or not suffixes:
        raise CheckpointError(f"{source}: the encoder.downsamples.* indices are not 0..n-1 "
                              f"(found {sorted(suffixes)[:8]})")
    layers: list[tuple[str, int | bool]] = []
    for index in range(len(suffixes)):
        names = suffixes[index]
        prefix = f"encoder.downsamples.{index}."
        if "residual.6.weight" in names:
            layers.append(("residual", _shape(shapes, prefix + "residual.6.weight", 5, source)[0]))
        elif "resample.1.weight" in names:
            layers.append(("resample", "time_conv.weight" in names))
        elif "to_qkv.weight" in names:
            raise CheckpointError(f"{source}: attention inside the encoder levels ({prefix}to_qkv) is not part of "
                                  "the Wan2.1 VAE structure this loader reads")
        else:
            raise CheckpointError(f"{source}: unrecognised encoder layer {prefix}* ({', '.join(sorted(names))})")
    return layers


def infer_wan_vae_config(state: Mapping[str, Any], source: str = "VAE weights") -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments of an original-layout Wan VAE state dict (tensors or shapes).

    Returns ``base_dim``, ``z_dim``, ``dim_mult``, ``num_res_blocks`` and ``temperal_downsample`` (plus
    ``decoder_base_dim`` when the decoder is wider or narrower than the encoder); the rest keeps diffusers'
    defaults (the Wan2.1 structure). For the official ``Wan2.1_VAE.pth`` this is exactly the official config.

    Raises:
        CheckpointError: the keys are not the original Wan layout, or their shapes do not form a Wan2.1 VAE.
    """
    shapes = _as_shapes(state)
    if "encoder.conv1.weight" not in shapes and _DIFFUSERS_MARKER in shapes:
        raise CheckpointError(f"{source} is in diffusers' key layout; its architecture comes from a config.json")
    base_dim = _shape(shapes, "encoder.conv1.weight", 5, source)[0]
    z_dim = _shape(shapes, "conv2.weight", 5, source)[0]
    layers = _encoder_layers(shapes, source)

    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for kind, value in layers:
        if kind == "resample":
            temporal.append(bool(value))
            levels.append([])
        else:
            levels[-1].append(int(value))
    counts = {len(widths) for widths in levels}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(f"{source}: the encoder levels hold {[len(w) for w in levels]} residual blocks; "
                              "every level must hold the same positive number")
    dim_mult = []
    for widths in levels:
        if widths[-1] % base_dim:
            raise CheckpointError(f"{source}: encoder level width {widths[-1]} is not a multiple of base_dim "
                                  f"{base_dim}")
        dim_mult.append(widths[-1] // base_dim)

    config: dict[str, Any] = {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": dim_mult,
                              "num_res_blocks": counts.pop(), "temperal_downsample": temporal}
    decoder_width = _shape(shapes, "decoder.conv1.weight", 5, source)[0]
    if decoder_width % dim_mult[-1]:
        raise CheckpointError(f"{source}: decoder.conv1 width {decoder_width} is not a multiple of dim_mult[-1] "
                              f"{dim_mult[-1]}")
    if decoder_width // dim_mult[-1] != base_dim:
        config["decoder_base_dim"] = decoder_width // dim_mult[-1]
    return config


def read_weight_shapes(path: str | Path) -> Shapes:
    """Key → shape of a ``.safetensors`` or torch weight file, without reading the tensors' data.

    safetensors headers are read directly; zip-format torch files (every ``torch.save`` since 1.6) are
    memory-mapped, so even a multi-gigabyte file costs almost nothing.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weight file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as error:  # SafetensorError for bad headers, OSError for I/O
            raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors): {error}") from None
    state = read_torch_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat dict of named tensors")
    shapes = _as_shapes(state)
    del state  # drop the memory map before returning
    return shapes


def wan_vae_config_for(path: str | Path) -> dict[str, Any] | None:
    """The config to load the VAE at ``path`` with: inferred for an original-layout weight file, else None.

    None (let ``load_wan_vae`` decide, as before) for a diffusers folder (it has its own ``config.json``) and for a
    single file in diffusers' key layout (the Wan2.1 defaults apply). Meant as the ``config`` argument of
    ``models.vae.load_wan_vae``.

    Raises:
        CheckpointError: unreadable file or keys/shapes that do not form a Wan2.1 VAE.
        ConfigError: the latent width is not 16 (no official latent statistics exist for it).
    """
    path = Path(path)
    if path.is_dir():
        return None
    shapes = read_weight_shapes(path)
    if "encoder.conv1.weight" not in shapes and _DIFFUSERS_MARKER in shapes:
        return None
    config = infer_wan_vae_config(shapes, source=str(path))
    if config["z_dim"] != OFFICIAL_Z_DIM:
        raise ConfigError(f"{path}: latent width z_dim={config['z_dim']}; a bare weight file has no latent "
                          f"statistics and the official Wan2.1 ones are for z_dim {OFFICIAL_Z_DIM} (use a diffusers "
                          "VAE folder whose config.json has latents_mean/latents_std)")
    return config
