"""Wan2.1 causal 3D VAE adapter: normalised encode/decode, streaming decode, weight loading, I2V images.

The network itself is diffusers' `AutoencoderKLWan`; this module only drives it.

Conventions
- Pixels: float `[B, T, 3, H, W]` in [-1, 1] (frame-major, like the latents). `frames_to_pixels` and
  `pixels_to_frames` convert from/to uint8 `[T, H, W, 3]` numpy frames.
- Latents: **normalised** float `[B, F, C, h, w]`, z = (mu - mean) / std with the per-channel statistics of the
  VAE's config (`latents_mean` / `latents_std`; for Wan2.1 these are the official values of spec section 9).
- Frame counts: T = 1 + 4 * (F - 1) (a causal first frame, then 4x temporal compression); spatial factor
  2 ** (levels - 1) * patch_size (8 for Wan2.1).

Statelessness: diffusers' own `encode`/`decode` keep their temporal feature cache on the module
(`_feat_map`, `_enc_feat_map`, reset by `clear_cache`). This adapter never uses those attributes; it calls the
encoder/decoder sub-modules with a cache list it owns. A `WanVAE` is therefore safe to share between several
`StreamingDecoder`s; each stream owns its cache and nothing per-call is stored on the module. The flip side:
diffusers' tiling, slicing and `apply_forward_hook` offloading hooks around `encode`/`decode` are not used.

Streaming decode is exact: decoding block by block gives the same frames as decoding the whole video at once,
with no frames to drop (the reference demo instead starts from an all-zero cache, gets 4 frames for the first
latent frame and discards 3 of them, which does not reproduce the one-shot decode).
"""
from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file as load_safetensors
from torch import nn

from causal_forcing.errors import CheckpointError, ConfigError, InputError
from causal_forcing.models.frames import (
    TEMPORAL_FACTOR,
    BlockDecoder,
    latent_frames_for,
    pixel_frames_for,
)

__all__ = [
    "StreamingDecoder",
    "WanVAE",
    "build_autoencoder",
    "diffusers_to_original",
    "frames_to_pixels",
    "latent_frames_for",
    "load_image",
    "load_wan_vae",
    "original_to_diffusers",
    "pixel_frames_for",
    "pixels_to_frames",
    "read_state_dict",
]


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

PathLike = str | Path
ImageSource = PathLike | Image.Image


def _wan():
    """diffusers' Wan VAE module, imported on first use: importing diffusers takes seconds, and the frame helpers
    of this module (and the CLI with the bundled small VAE) do not need it."""
    from diffusers.models.autoencoders import autoencoder_kl_wan

    return autoencoder_kl_wan


# ---------------------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------------------
def _count_causal_convs(module: nn.Module) -> int:
    """Number of cache slots the diffusers encoder/decoder uses: one per causal 3D convolution."""
    return sum(isinstance(m, _wan().WanCausalConv3d) for m in module.modules())


def _validate_config(config: Mapping[str, Any]) -> None:
    """Reject `AutoencoderKLWan` configs this adapter cannot drive correctly."""
    z_dim = config["z_dim"]
    for name in ("latents_mean", "latents_std"):
        if len(config[name]) != z_dim:
            raise ConfigError(f"VAE config {name} has {len(config[name])} values but z_dim is {z_dim}")
    if min(config["latents_std"]) <= 0:
        raise ConfigError("VAE config latents_std must be positive")
    levels = len(config["dim_mult"])
    temporal = 2 ** sum(bool(flag) for flag in config["temperal_downsample"][: levels - 1])
    if temporal != TEMPORAL_FACTOR:
        raise ConfigError(
            f"VAE config compresses time {temporal}x; only {TEMPORAL_FACTOR}x (two temporal levels) is supported"
        )
    patch = config.get("patch_size") or 1
    if config.get("in_channels", 3) != 3 * patch * patch or config.get("out_channels", 3) != 3 * patch * patch:
        raise ConfigError(f"VAE config in/out_channels must be 3 * patch_size**2 = {3 * patch * patch} (RGB)")


class WanVAE(nn.Module):
    """Normalised, stateless front end of a diffusers `AutoencoderKLWan`.

    Move it with `.to(device, dtype)` like any module; inputs are cast to the VAE's device/dtype and outputs come
    back in that dtype. Gradients follow the caller's autograd mode (wrap inference in `torch.inference_mode()`).
    """

    def __init__(self, model: AutoencoderKLWan) -> None:
        super().__init__()
        _validate_config(model.config)
        self.model = model
        self._encoder_slots = _count_causal_convs(model.encoder)
        self._decoder_slots = _count_causal_convs(model.decoder)
        # `first_chunk` (used by the Wan2.2 residual up-blocks) appeared in diffusers 0.35; older decoders lack it.
        self._decoder_takes_first_chunk = "first_chunk" in inspect.signature(model.decoder.forward).parameters

    # ---- geometry ------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of a latent frame (z_dim; 16 for Wan2.1)."""
        return int(self.model.config.z_dim)

    @property
    def patch_size(self) -> int:
        """Pixel patch folded into channels before the encoder (1 for Wan2.1)."""
        return int(self.model.config.get("patch_size") or 1)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width (8 for Wan2.1)."""
        return 2 ** (len(self.model.config.dim_mult) - 1) * self.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- normalisation --------------------------------------------------------------------------------------
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean/std, float32, shaped to broadcast over `[B, C, F, h, w]`."""
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.model.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.model.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean `[B, C, F, h, w]` -> normalised latent (mu - mean) / std, computed in float32."""
        mean, std = self._stats(mu.device)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent `[B, C, F, h, w]` -> raw latent z * std + mean, computed in float32."""
        mean, std = self._stats(z.device)
        return (z.float() * std + mean).to(z.dtype)

    # ---- encode ---------------------------------------------------------------------------------------------
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise InputError(f"pixels must be [B, T, 3, H, W], got shape {tuple(pixels.shape)}")
        latent_frames_for(pixels.shape[1])
        height, width = pixels.shape[-2:]
        if height % self.spatial_factor or width % self.spatial_factor:
            raise InputError(f"frame size {height}x{width} is not a multiple of {self.spatial_factor}")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, T, 3, H, W]` in [-1, 1] -> normalised latents `[B, F, C, H/8, W/8]` (posterior mean).

        Mirrors `AutoencoderKLWan._encode`: the encoder sees frame 0 alone, then chunks of 4 frames, carrying its
        causal feature cache (owned by this call).
        """
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        if self.patch_size > 1:
            x = _wan().patchify(x, patch_size=self.patch_size)
        cache: list[Any] = [None] * self._encoder_slots
        bounds = [0, 1, *range(1 + TEMPORAL_FACTOR, x.shape[2] + 1, TEMPORAL_FACTOR)]
        chunks = [
            self.model.encoder(x[:, :, start:stop], feat_cache=cache, feat_idx=[0])
            for start, stop in pairwise(bounds)
        ]
        moments = self.model.quant_conv(torch.cat(chunks, dim=2))
        mu = moments[:, : self.latent_channels]
        return self.normalize(mu).permute(0, 2, 1, 3, 4)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image `[3, H, W]` or `[B, 3, H, W]` in [-1, 1] (see `load_image`) -> latent `[B, 1, C, h, w]`."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4:
            raise InputError(f"image must be [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
        return self.encode(image.unsqueeze(1))

    # ---- decode ---------------------------------------------------------------------------------------------
    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh block-by-block decoder; it owns its feature cache, this VAE stays shared and stateless."""
        return StreamingDecoder(self)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, F, C, h, w]` -> pixels `[B, 1 + 4(F-1), 3, 8h, 8w]` clamped to [-1, 1]."""
        return self.streaming_decoder().decode_block(latents)


class StreamingDecoder(BlockDecoder):
    """Decodes a latent video block by block with the causal decoder's temporal feature cache (the contract of
    `frames.BlockDecoder`): the concatenated output equals `WanVAE.decode` of the whole video (same computation,
    frame by frame, as diffusers' `AutoencoderKLWan._decode`)."""

    def _new_cache(self) -> list[Any]:
        return [None] * self._vae._decoder_slots

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self._vae
        x = vae.model.post_quant_conv(vae.denormalize(z.permute(0, 2, 1, 3, 4)))
        frames = []
        for i in range(x.shape[2]):
            extra = {"first_chunk": self._latent_frames == 0 and i == 0} if vae._decoder_takes_first_chunk else {}
            frames.append(vae.model.decoder(x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], **extra))
        out = torch.cat(frames, dim=2)
        if vae.patch_size > 1:
            out = _wan().unpatchify(out, patch_size=vae.patch_size)
        return out.permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# Building and weight loading
# ---------------------------------------------------------------------------------------------------------------
def build_autoencoder(config: Mapping[str, Any] | None = None, *,
                      device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Instantiate an `AutoencoderKLWan` (random weights; `device="meta"` for none).

    `config` holds `AutoencoderKLWan` init arguments (a diffusers `config.json` works: keys starting with `_` are
    metadata); unspecified ones take diffusers' defaults, which are the Wan2.1 VAE. Unknown keys raise ConfigError.
    """
    config = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    cls = _wan().AutoencoderKLWan
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown AutoencoderKLWan config key {unknown[0]!r}")
    with torch.device(device):
        return cls(**config)


def _short_reason(error: BaseException) -> str:
    """Exception type and the first sentence of its message, on one line."""
    lines = str(error).strip().splitlines()
    sentence = lines[0].split(". ")[0].rstrip(".")[:200] if lines else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a flat tensor state dict from `.safetensors` or a torch file (`torch.load(weights_only=True)`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VAE weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for corrupt or truncated files
        raise CheckpointError(f"cannot read VAE weights {path} (corrupt, truncated or not tensors-only): "
                              f"{_short_reason(error)}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"VAE weights {path} are not a flat dict of named tensors")
    return dict(state)


def _require_wan21_layout(config: Mapping[str, Any]) -> None:
    """The original Wan key layout (and diffusers' converter for it) exists for the Wan2.1 structure only."""
    wan21 = not config.get("is_residual", False) and not config["attn_scales"]
    if not wan21 or config["num_res_blocks"] != 2 or len(config["dim_mult"]) != 4:
        raise ConfigError(
            "the original Wan VAE key layout needs a Wan2.1-structured config "
            "(is_residual=False, attn_scales=[], num_res_blocks=2, 4 levels)"
        )


def original_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original `Wan2.1_VAE.pth` state dict to diffusers' names (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(state))


_RESNET_TO_ORIGINAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_HEAD_TO_ORIGINAL = {
    "conv_in.weight": "conv1.weight",
    "conv_in.bias": "conv1.bias",
    "norm_out.gamma": "head.0.gamma",
    "conv_out.weight": "head.2.weight",
    "conv_out.bias": "head.2.bias",
}


def _original_key(key: str, num_res_blocks: int) -> str:
    """Original Wan name of one diffusers `AutoencoderKLWan` (Wan2.1 structure) parameter name."""
    top = re.fullmatch(r"(post_quant_conv|quant_conv)\.(weight|bias)", key)
    if top:
        return f"{'conv2' if top[1] == 'post_quant_conv' else 'conv1'}.{top[2]}"
    part = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if part:
        coder, rest = part[1], part[2]
        if rest in _HEAD_TO_ORIGINAL:
            return f"{coder}.{_HEAD_TO_ORIGINAL[rest]}"
        resnet = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if resnet and resnet[2] in _RESNET_TO_ORIGINAL:
            return f"{coder}.middle.{2 * int(resnet[1])}.{_RESNET_TO_ORIGINAL[resnet[2]]}"
        attention = re.fullmatch(r"mid_block\.attentions\.(\d+)\.(.+)", rest)
        if attention:
            return f"{coder}.middle.{2 * int(attention[1]) + 1}.{attention[2]}"
        down = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
        if coder == "encoder" and down:
            return f"encoder.downsamples.{down[1]}.{_RESNET_TO_ORIGINAL.get(down[2], down[2])}"
        # The original decoder is one flat list: per level, num_res_blocks + 1 residual blocks, then a resample.
        stride = num_res_blocks + 2
        up = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
        if coder == "decoder" and up and up[3] in _RESNET_TO_ORIGINAL:
            return f"decoder.upsamples.{int(up[1]) * stride + int(up[2])}.{_RESNET_TO_ORIGINAL[up[3]]}"
        upsampler = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
        if coder == "decoder" and upsampler:
            return f"decoder.upsamples.{int(upsampler[1]) * stride + num_res_blocks + 1}.{upsampler[2]}"
    raise CheckpointError(f"VAE key {key!r} has no equivalent in the original Wan2.1 layout")


def diffusers_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict to the original `Wan2.1_VAE.pth` names (inverse map)."""
    _require_wan21_layout(config)
    return {_original_key(key, config["num_res_blocks"]): value for key, value in state.items()}


def _is_original_layout(state: Mapping[str, torch.Tensor], source: PathLike) -> bool:
    if "encoder.conv1.weight" in state:
        return True
    if "encoder.conv_in.weight" in state:
        return False
    raise CheckpointError(f"{source} is neither an original Wan VAE nor a diffusers AutoencoderKLWan state dict")


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], name_of: Callable[[str], str],
                 source: PathLike) -> None:
    """Load `state` into a (meta) model with `assign=True`; any key or shape mismatch raises CheckpointError.

    `name_of` maps a diffusers name to the name the file uses, so messages name keys as they appear in the file.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"VAE weights {source}: missing key {name_of(missing[0])!r} "
                              f"({len(missing)} missing in total)")
    if unexpected:
        raise CheckpointError(f"VAE weights {source}: unexpected key {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected in total)")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"VAE weights {source}: key {name_of(key)!r} has shape {tuple(state[key].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=True, assign=True)


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"VAE folder has no {CONFIG_NAME}: {path}") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot parse VAE config {path}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"VAE config {path} is not a JSON object")
    class_name = config.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
        raise CheckpointError(f"VAE config {path} describes {class_name!r}, not AutoencoderKLWan")
    return config


def load_wan_vae(path: PathLike, config: Mapping[str, Any] | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load a Wan VAE strictly, frozen and in eval mode.

    `path` is one of
    - a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`); `config` must then be None;
    - a single weight file (`.safetensors`, or a torch file such as the original `Wan2.1_VAE.pth`) in either the
      original Wan key layout or diffusers' layout (detected from the keys); `config` gives the architecture
      (default: the Wan2.1 VAE).
    """
    path = Path(path)
    if path.is_dir():
        if config is not None:
            raise ConfigError("pass either a diffusers VAE folder (with its config.json) or a config, not both")
        config = _read_config_json(path / CONFIG_NAME)
        weights = path / WEIGHTS_NAME
    else:
        weights = path
    model = build_autoencoder(config, device="meta")
    state = read_state_dict(weights)
    if _is_original_layout(state, weights):
        _require_wan21_layout(model.config)
        num_res_blocks = model.config.num_res_blocks
        _load_strict(model, original_to_diffusers(state), lambda k: _original_key(k, num_res_blocks), weights)
    else:
        _load_strict(model, state, lambda k: k, weights)
    vae = WanVAE(model).to(device=device, dtype=dtype)
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Images and frames
# ---------------------------------------------------------------------------------------------------------------
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _upright_copy(image: Image.Image) -> Image.Image:
    """Decode `image` and return an EXIF-upright copy that no longer depends on the open file."""
    image.load()
    upright = ImageOps.exif_transpose(image)
    return upright if upright is not image else image.copy()


def _open_image(source: ImageSource) -> Image.Image:
    """Fully decoded, EXIF-upright PIL image; a missing, corrupt or non-image input raises InputError."""
    is_pil = isinstance(source, Image.Image)
    if not is_pil and not Path(source).is_file():
        raise InputError(f"image not found: {source}")
    try:
        if is_pil:
            return _upright_copy(source)
        with Image.open(source) as image:
            return _upright_copy(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        label = "PIL image" if is_pil else str(source)
        raise InputError(f"cannot read image {label}: {error}") from error


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB version of any PIL mode; transparency is composited onto `background`."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return image.convert("RGB")


def _cover_crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[float, float, float, float]:
    """Largest centred box of the source with the target aspect ratio (the part kept by cover + centre crop)."""
    if src_w * dst_h > dst_w * src_h:  # source is wider than the target: trim left and right
        crop_w = src_h * dst_w / dst_h
        left = (src_w - crop_w) / 2
        return left, 0.0, left + crop_w, float(src_h)
    crop_h = src_w * dst_h / dst_w  # source is taller (or equal): trim top and bottom
    top = (src_h - crop_h) / 2
    return 0.0, top, float(src_w), top + crop_h


def load_image(source: ImageSource, height: int, width: int, *,
               background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """Load an I2V conditioning image as a float32 `[3, height, width]` tensor in [-1, 1].

    Accepts a path (PNG, JPEG, or any format Pillow reads) or a PIL image in any mode: palette, grey, CMYK and
    16-bit grey are converted to RGB; transparent pixels (RGBA, LA, palette/RGB with a transparency key) are
    composited onto `background` (white by default). EXIF orientation is applied. The image is scaled
    (bicubic) with its aspect ratio preserved until it covers height x width, and the overflow is cropped
    equally from both sides (centre crop); unlike the reference, nothing is stretched.
    """
    if height < 1 or width < 1:
        raise InputError(f"image target size must be positive, got {height}x{width}")
    image = _to_rgb(_open_image(source), background)
    box = _cover_crop_box(image.width, image.height, width, height)
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC, box=box)
    array = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames `[T, H, W, 3]` -> float32 pixels `[1, T, 3, H, W]` in [-1, 1]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return (torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """Pixels `[T, 3, H, W]` or `[1, T, 3, H, W]` in [-1, 1] -> uint8 frames `[T, H, W, 3]` (rounded, clamped)."""
    if pixels.ndim == 5:
        if pixels.shape[0] != 1:
            raise InputError(f"pixels_to_frames converts one video; got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InputError(f"pixels must be [T, 3, H, W] or [1, T, 3, H, W], got shape {tuple(pixels.shape)}")
    values = ((pixels.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return values.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
