"""A small causal video autoencoder for ShapesWorld with the Wan VAE's interface and compression.

`SmallVAE` is a drop-in stand-in for `causal_forcing.models.vae.WanVAE` on ShapesWorld: the same method names
(`encode`, `decode`, `encode_image`, `streaming_decoder`, `normalize`, `denormalize`), the same tensor layouts
and the same compression, so every latent shape downstream is what the Wan VAE would give:

- Pixels: float `[B, T, 3, H, W]` in [-1, 1]; latents: normalised float `[B, F, 16, H/8, W/8]`,
  z = (mu - mean) / std with per-channel statistics stored in the config (measured on ShapesWorld clips).
- Frame counts: T = 1 + 4 (F - 1). Like TAEHV, the encoder sees frame 0 repeated four times and then groups of
  4 frames; the decoder emits 4 frames per latent frame and drops the first 3 frames of a video, so the first
  latent frame gives 1 pixel frame and every later one 4.

Network (TAEHV-style, 2D convolutions only). Time is handled by `MemBlock`s, residual blocks that see their
input at the current time step concatenated with their input at the previous one (zeros before the first), by
`TPool` (groups of `s` frames folded into channels, encoder) and `TGrow` (channels unfolded into `s` frames,
decoder). Every layer depends only on the present and the past, so the model is causal, and decoding a video
block by block with each `MemBlock`'s last input frame carried over (`StreamingDecoder`) is the same
computation as decoding it at once. Encoder: 64 -> 32 px per frame, pairs of frames pooled, 32 -> 16 px,
`MemBlock`s, pairs pooled again (one step per latent frame), 16 -> 8 px, `MemBlock`s, 1x1 projection to 16
channels. Decoder: 8 px `MemBlock`s at the latent rate, then three times "unfold time (x2, x2, x1), nearest
upsample x2, 3x3 conv", with `MemBlock`s at 16 and 32 px, and an output head at 64 px: two 3x3 convs
(`output: "rgb"`), or `AlphaHead` (`output: "alpha"`: sharp alpha over black x half-resolution colour map).

Files: `save_folder` writes `config.json` (`_class_name: "SmallVAE"`) and `model.safetensors`; `from_folder`
reads them strictly. `load_vae(path)` opens either kind of VAE: `"shapes"` (the bundled ShapesWorld weights in
`causal_forcing/assets/shapes_vae`), a `SmallVAE` folder, or anything `load_wan_vae` accepts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from causal_forcing.checkpoints import atomic_path
from causal_forcing.errors import CheckpointError, ConfigError, InputError
from causal_forcing.models.frames import (
    TEMPORAL_FACTOR,
    BlockDecoder,
    latent_frames_for,
    pixel_frames_for,
)

__all__ = [
    "BUNDLED_SHAPES_VAE",
    "SmallStreamingDecoder",
    "SmallVAE",
    "SmallVAEConfig",
    "latent_frames_for",
    "load_vae",
    "pixel_frames_for",
    "upsample2x",
]

SPATIAL_FACTOR = 8
"""Pixels per latent cell along height and width (as for Wan2.1)."""
DECODE_FRAMES_PER_CALL = 96
"""`SmallVAE.decode` splits a batch into calls of about this many pixel frames (at least one video each)."""
CLASS_NAME = "SmallVAE"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BUNDLED_SHAPES_VAE = Path(__file__).resolve().parent.parent / "assets" / "shapes_vae"
"""Folder of the shipped ShapesWorld weights (`load_vae("shapes")`)."""

PathLike = str | Path


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmallVAEConfig:
    """Architecture and latent statistics of a `SmallVAE` (stored as `config.json`)."""

    latent_channels: int = 16
    encoder_channels: tuple[int, int, int, int] = (24, 48, 64, 128)
    """Widths at full, 1/2, 1/4 and 1/8 resolution."""
    encoder_blocks: tuple[int, int] = (1, 2)
    """`MemBlock`s at 1/4 resolution (2 frames per step) and at 1/8 resolution (one step per latent frame)."""
    decoder_channels: tuple[int, int, int, int] = (128, 64, 32, 16)
    """Widths at 1/8 (latent), 1/4, 1/2 and full resolution."""
    decoder_blocks: tuple[int, int, int] = (2, 2, 1)
    """`MemBlock`s at 1/8, 1/4 and 1/2 resolution (1, 2 and 4 frames per latent frame)."""
    output: str = "rgb"
    """Decoder head: "rgb" (two 3x3 convs at full resolution) or "alpha" (`AlphaHead`)."""
    latents_mean: tuple[float, ...] = field(default_factory=lambda: (0.0,) * 16)
    latents_std: tuple[float, ...] = field(default_factory=lambda: (1.0,) * 16)

    def __post_init__(self) -> None:
        checks = [
            (self.latent_channels >= 1, "latent_channels must be >= 1"),
            (len(self.encoder_channels) == 4 and min(self.encoder_channels) >= 1,
             "encoder_channels needs 4 positive widths"),
            (len(self.decoder_channels) == 4 and min(self.decoder_channels) >= 1,
             "decoder_channels needs 4 positive widths"),
            (len(self.encoder_blocks) == 2 and min(self.encoder_blocks) >= 0,
             "encoder_blocks needs 2 non-negative counts"),
            (len(self.decoder_blocks) == 3 and min(self.decoder_blocks) >= 0,
             "decoder_blocks needs 3 non-negative counts"),
            (len(self.latents_mean) == self.latent_channels and len(self.latents_std) == self.latent_channels,
             f"latents_mean and latents_std need {self.latent_channels} values each"),
            (min(self.latents_std) > 0, "latents_std must be positive"),
            (self.output in ("rgb", "alpha"), f"output must be 'rgb' or 'alpha', got {self.output!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SmallVAE config: {message}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the class tag."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": CLASS_NAME, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmallVAEConfig:
        """Inverse of `to_json`; unknown keys or a foreign class tag raise ConfigError."""
        if data.get("_class_name") != CLASS_NAME:
            raise ConfigError(f"config describes {data.get('_class_name')!r}, not {CLASS_NAME!r}")
        values = {k: v for k, v in data.items() if not k.startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown SmallVAE config key {unknown[0]!r}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as error:
            raise ConfigError(f"SmallVAE config: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Layers. Temporal layers take and return `[N, T, C, H, W]`; the others are applied frame by frame.
# ---------------------------------------------------------------------------------------------------------------
def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class MemBlock(nn.Module):
    """Residual block over [input at t, input at t - 1]: relu(x + conv(relu(conv(cat(x, x_prev)))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(2 * channels, channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x: Tensor, past: Tensor | None) -> Tensor:
        """`x` [N, T, C, H, W]; `past` [N, C, H, W] (the input frame before x[:, 0]) or None (zeros)."""
        first = torch.zeros_like(x[:, :1]) if past is None else past.unsqueeze(1)
        previous = torch.cat([first, x[:, :-1]], dim=1)
        flat = torch.cat([x, previous], dim=2).flatten(0, 1)
        y = self.conv2(F.relu(self.conv1(flat)))
        return F.relu(x + y.view_as(x))


class TPool(nn.Module):
    """Fold each group of `stride` consecutive frames into channels and mix them with a 1x1 conv."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c, h, w = x.shape
        if t % self.stride:
            raise InputError(f"TPool needs a multiple of {self.stride} frames, got {t}")
        y = self.conv(x.reshape(n * t // self.stride, self.stride * c, h, w))
        return y.view(n, t // self.stride, -1, h, w)


class TGrow(nn.Module):
    """Unfold channels into `stride` consecutive frames (1x1 conv to stride * C channels, then reshape)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c, h, w = x.shape
        y = self.conv(x.flatten(0, 1))
        return y.view(n, t * self.stride, c, h, w)


def upsample2x(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling of `[N, C, H, W]`: the same values as `F.interpolate(x, scale_factor=2,
    mode="nearest")`, as a broadcast copy (about 3x faster on a CPU for the decoder's large frame batches)."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling of a frame batch."""

    def forward(self, x: Tensor) -> Tensor:
        return upsample2x(x)


class AlphaHead(nn.Module):
    """Output head: pixel = alpha * colour + (1 - alpha) * black, with a sharp full-resolution alpha (nearest x2
    upsampling, 3x3 conv, ReLU, 3x3 conv, sigmoid) and a colour map predicted at half resolution (3x3 conv, nearest
    x2 upsampling). It can output any pixel (alpha = 1), but shapes and colours come from separate paths, which
    helps flat-coloured objects on black keep hard edges and one colour up to their thinnest parts."""

    def __init__(self, c_in: int, c_mid: int) -> None:
        super().__init__()
        self.alpha = nn.Sequential(_Upsample(), _conv(c_in, c_mid), nn.ReLU(), _conv(c_mid, 1))
        self.color = _conv(c_in, 3)

    def forward(self, x: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.alpha(x))
        color = upsample2x(self.color(x))
        return alpha * (color + 1.0) - 1.0


class CausalStack(nn.Module):
    """A sequence of layers over `[N, T, C, H, W]` videos with one cache slot per `MemBlock`.

    `forward(x, cache)` reads each `MemBlock`'s previous input frame from `cache` and stores its new last input
    frame there, so consecutive calls with the same cache continue one video.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_slots = sum(isinstance(layer, MemBlock) for layer in layers)

    def new_cache(self) -> list[Tensor | None]:
        """An empty cache: the next call starts a video."""
        return [None] * self.num_slots

    def forward(self, x: Tensor, cache: list[Tensor | None]) -> Tensor:
        slot = 0
        for layer in self.layers:
            if isinstance(layer, MemBlock):
                past = cache[slot]
                cache[slot] = x[:, -1]
                x = layer(x, past)
                slot += 1
            elif isinstance(layer, (TPool, TGrow)):
                x = layer(x)
            else:
                n, t = x.shape[:2]
                y = layer(x.flatten(0, 1))
                x = y.view(n, t, *y.shape[1:])
        return x


def build_encoder(config: SmallVAEConfig) -> CausalStack:
    """Pixels `[N, 4F, 3, H, W]` (frame 0 repeated 4 times, then groups of 4) -> raw latents `[N, F, C, H/8, W/8]`."""
    c0, c1, c2, c3 = config.encoder_channels
    b2, b3 = config.encoder_blocks
    return CausalStack([
        _conv(3, c0), nn.ReLU(),
        _conv(c0, c1, stride=2), nn.ReLU(),
        TPool(c1, 2),
        _conv(c1, c2, stride=2), nn.ReLU(),
        *[MemBlock(c2) for _ in range(b2)],
        TPool(c2, 2),
        _conv(c2, c3, stride=2), nn.ReLU(),
        *[MemBlock(c3) for _ in range(b3)],
        nn.Conv2d(c3, config.latent_channels, 1),
    ])


def build_decoder(config: SmallVAEConfig) -> CausalStack:
    """Raw latents `[N, F, C, h, w]` -> pixels `[N, 4F, 3, 8h, 8w]` (the caller drops a video's first 3 frames)."""
    d0, d1, d2, d3 = config.decoder_channels
    k0, k1, k2 = config.decoder_blocks
    return CausalStack([
        _conv(config.latent_channels, d0), nn.ReLU(),
        *[MemBlock(d0) for _ in range(k0)],
        TGrow(d0, 2), _Upsample(), _conv(d0, d1), nn.ReLU(),
        *[MemBlock(d1) for _ in range(k1)],
        TGrow(d1, 2), _Upsample(), _conv(d1, d2), nn.ReLU(),
        *[MemBlock(d2) for _ in range(k2)],
        *([_Upsample(), _conv(d2, d3), nn.ReLU(), _conv(d3, 3)] if config.output == "rgb" else [AlphaHead(d2, d3)]),
    ])


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class SmallVAE(nn.Module):
    """Small causal autoencoder with `WanVAE`'s interface (see the module docstring).

    Gradients follow the caller's autograd mode; training uses `encode_raw` / `decode_raw` (no normalisation,
    no clamping, the pre-roll frames kept).
    """

    def __init__(self, config: SmallVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or SmallVAEConfig()
        self.encoder = build_encoder(self.config)
        self.decoder = build_decoder(self.config)

    # ---- geometry ------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of a latent frame (16)."""
        return self.config.latent_channels

    @property
    def patch_size(self) -> int:
        """Pixel patch folded into channels before the encoder (none: 1)."""
        return 1

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width (8)."""
        return SPATIAL_FACTOR

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- normalisation --------------------------------------------------------------------------------------
    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-channel latent mean/std, float32, shaped to broadcast over `[B, C, F, h, w]`."""
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw latent `[B, C, F, h, w]` -> normalised latent (mu - mean) / std (layout as in `WanVAE`)."""
        mean, std = self._stats(mu.device)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised latent `[B, C, F, h, w]` -> raw latent z * std + mean."""
        mean, std = self._stats(z.device)
        return (z.float() * std + mean).to(z.dtype)

    def with_stats(self, mean: list[float], std: list[float]) -> SmallVAE:
        """Set the latent normalisation statistics (in place; returns self)."""
        self.config = dataclasses.replace(self.config, latents_mean=tuple(float(m) for m in mean),
                                          latents_std=tuple(float(s) for s in std))
        return self

    # ---- encode ---------------------------------------------------------------------------------------------
    def _check_pixels(self, pixels: Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise InputError(f"pixels must be [B, T, 3, H, W], got shape {tuple(pixels.shape)}")
        latent_frames_for(pixels.shape[1])
        height, width = pixels.shape[-2:]
        if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
            raise InputError(f"frame size {height}x{width} is not a multiple of {SPATIAL_FACTOR}")

    def encode_raw(self, pixels: Tensor) -> Tensor:
        """Pixels `[B, 1 + 4(F-1), 3, H, W]` -> raw (unnormalised) latents `[B, F, C, H/8, W/8]`."""
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        x = torch.cat([x[:, :1].expand(-1, TEMPORAL_FACTOR - 1, -1, -1, -1), x], dim=1)
        return self.encoder(x, self.encoder.new_cache())

    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels `[B, T, 3, H, W]` in [-1, 1] -> normalised latents `[B, F, C, H/8, W/8]`."""
        raw = self.encode_raw(pixels)
        return self.normalize(raw.transpose(1, 2)).transpose(1, 2)

    def encode_image(self, image: Tensor) -> Tensor:
        """Image `[3, H, W]` or `[B, 3, H, W]` in [-1, 1] -> latent `[B, 1, C, h, w]`."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4:
            raise InputError(f"image must be [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
        return self.encode(image.unsqueeze(1))

    # ---- decode ---------------------------------------------------------------------------------------------
    def decode_raw(self, raw: Tensor, cache: list[Tensor | None] | None = None) -> Tensor:
        """Raw latents `[B, F, C, h, w]` -> unclamped pixels `[B, 4F, 3, 8h, 8w]`, pre-roll frames included."""
        return self.decoder(raw, self.decoder.new_cache() if cache is None else cache)

    def streaming_decoder(self) -> SmallStreamingDecoder:
        """A fresh block-by-block decoder; it owns its cache, this VAE stays shared and stateless."""
        return SmallStreamingDecoder(self)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents `[B, F, C, h, w]` -> pixels `[B, 1 + 4(F-1), 3, 8h, 8w]` clamped to [-1, 1].

        A large batch is decoded a few videos at a time (videos are independent, so the numbers are the same):
        on a CPU one call over thousands of frames is about twice as slow, its activations falling out of cache."""
        if latents.ndim == 5 and latents.shape[0] > 1:
            per_call = max(1, DECODE_FRAMES_PER_CALL // (TEMPORAL_FACTOR * latents.shape[1]))
            if per_call < latents.shape[0]:
                return torch.cat([self.streaming_decoder().decode_block(part)
                                  for part in latents.split(per_call)])
        return self.streaming_decoder().decode_block(latents)

    # ---- files ----------------------------------------------------------------------------------------------
    def save_folder(self, folder: PathLike) -> Path:
        """Write `model.safetensors` (float32), then `config.json`, each atomically, into `folder`; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        with atomic_path(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config.to_json(), indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_folder(cls, folder: PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> SmallVAE:
        """Load a folder written by `save_folder` strictly (frozen, eval mode)."""
        folder = Path(folder)
        config = _read_config(folder / CONFIG_NAME)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"SmallVAE folder has no {WEIGHTS_NAME}: {folder}")
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as error:  # safetensors raises several types for corrupt or truncated files
            raise CheckpointError(f"cannot read SmallVAE weights {weights}: {type(error).__name__}") from error
        model = cls(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            key = (missing or unexpected)[0]
            raise CheckpointError(f"SmallVAE weights {weights}: {'missing' if missing else 'unexpected'} key {key!r}")
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise CheckpointError(f"SmallVAE weights {weights}: key {key!r} has shape {tuple(state[key].shape)}, "
                                      f"the config expects {tuple(tensor.shape)}")
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class SmallStreamingDecoder(BlockDecoder):
    """Decodes a latent video block by block, carrying each `MemBlock`'s last input frame between blocks (the
    contract of `frames.BlockDecoder`: the concatenated output equals `SmallVAE.decode` of the whole video)."""

    def _new_cache(self) -> list[Tensor | None]:
        return self._vae.decoder.new_cache()

    def _decode(self, z: Tensor) -> Tensor:
        raw = self._vae.denormalize(z.transpose(1, 2)).transpose(1, 2)
        out = self._vae.decode_raw(raw, self._cache)
        return out[:, TEMPORAL_FACTOR - 1:] if self._latent_frames == 0 else out


# ---------------------------------------------------------------------------------------------------------------
# Files and dispatch
# ---------------------------------------------------------------------------------------------------------------
def _read_config(path: Path) -> SmallVAEConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"SmallVAE folder has no {CONFIG_NAME}: {path.parent}") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot parse SmallVAE config {path}: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"SmallVAE config {path} is not a JSON object")
    try:
        return SmallVAEConfig.from_json(data)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error


def _folder_class(folder: Path) -> str | None:
    """`_class_name` of the folder's config.json, or None without a readable one."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def load_vae(path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Open a video VAE, frozen and in eval mode: `"shapes"` (the bundled ShapesWorld `SmallVAE`), a folder
    written by `SmallVAE.save_folder`, or anything `causal_forcing.models.vae.load_wan_vae` accepts (a diffusers
    `AutoencoderKLWan` folder, a Wan2.1 weight file)."""
    if str(path) == "shapes":
        return SmallVAE.from_folder(BUNDLED_SHAPES_VAE, device=device, dtype=dtype)
    folder = Path(path)
    if folder.is_dir() and _folder_class(folder) == CLASS_NAME:
        return SmallVAE.from_folder(folder, device=device, dtype=dtype)
    from causal_forcing.models.vae import (
        load_wan_vae,  # imports diffusers: only when a Wan VAE is asked for
    )

    return load_wan_vae(folder, device=device, dtype=dtype)
