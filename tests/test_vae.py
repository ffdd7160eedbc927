"""Tests of the Wan VAE adapter (`causal_forcing.models.vae`) on tiny random `AutoencoderKLWan` configs.

Truths used: diffusers' own `AutoencoderKLWan.encode/decode` (one-shot, module-held cache), the per-channel
statistics printed in spec section 9, the official `wan/modules/vae.py` layout (re-derived below from its
structure), diffusers' converter for the original key layout, and synthetic images with known content.
"""
from __future__ import annotations

import io
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from PIL import Image
from safetensors.torch import save_file

from causal_forcing.errors import CheckpointError, ConfigError, InputError
from causal_forcing.models.vae import (
    StreamingDecoder,
    WanVAE,
    build_autoencoder,
    diffusers_to_original,
    frames_to_pixels,
    latent_frames_for,
    load_image,
    load_wan_vae,
    original_to_diffusers,
    pixel_frames_for,
    pixels_to_frames,
    read_state_dict,
)

TINY = {"base_dim": 8}
TINY_WAN22 = {"base_dim": 8, "is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
              "scale_factor_spatial": 16}

# Spec section 9 (the official Wan2.1 WanVAE class carries the same literals).
SPEC_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
             -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
SPEC_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
            1.6382, 1.1253, 2.8251, 1.9160]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(config: dict, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**config).eval()


@pytest.fixture(scope="module")
def model() -> AutoencoderKLWan:
    return make_model(TINY)


@pytest.fixture(scope="module")
def vae(model: AutoencoderKLWan) -> WanVAE:
    return WanVAE(model)


def stats(model: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def diffusers_decode(model: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Reference decode: denormalise by hand, then diffusers' one-shot decode; back to [B, T, 3, H, W]."""
    mean, std = stats(model)
    with torch.no_grad():
        return model.decode(latents.permute(0, 2, 1, 3, 4) * std + mean).sample.permute(0, 2, 1, 3, 4)


def random_latents(frames: int, batch: int = 1, seed: int = 1, size: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, size, size, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Statistics and frame counts
# ---------------------------------------------------------------------------------------------------------------
def test_diffusers_default_statistics_are_the_official_wan21_values() -> None:
    full = build_autoencoder(device="meta")
    assert list(full.config.latents_mean) == SPEC_MEAN
    assert list(full.config.latents_std) == SPEC_STD


def test_frame_count_rule() -> None:
    assert [pixel_frames_for(f) for f in (1, 2, 3, 21)] == [1, 5, 9, 81]
    assert [latent_frames_for(t) for t in (1, 5, 9, 81)] == [1, 2, 3, 21]
    for bad in (0, 2, 4, 6, 80, 82):
        with pytest.raises(InputError, match="1 \\+ 4k"):
            latent_frames_for(bad)
    with pytest.raises(InputError):
        pixel_frames_for(0)


# ---------------------------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------------------------
def test_encode_is_normalised_posterior_mean(model: AutoencoderKLWan, vae: WanVAE) -> None:
    pixels = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels)
        mu = model.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mean
    mean, std = stats(model)
    assert latents.shape == (2, 3, 16, 4, 4)
    assert torch.equal(latents, ((mu - mean) / std).permute(0, 2, 1, 3, 4))


def test_encode_image_is_a_one_frame_video(vae: WanVAE) -> None:
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode_image(image)
        video_latent = vae.encode(image[None, None])
    assert latent.shape == (1, 1, 16, 4, 6)
    assert torch.equal(latent, video_latent)


@pytest.mark.parametrize("shape, message", [
    ((1, 6, 3, 32, 32), "1 \\+ 4k"),
    ((1, 0, 3, 32, 32), "1 \\+ 4k"),
    ((1, 5, 4, 32, 32), "\\[B, T, 3, H, W\\]"),
    ((1, 5, 3, 36, 32), "multiple of 8"),
    ((5, 3, 32, 32), "\\[B, T, 3, H, W\\]"),
])
def test_encode_rejects_bad_pixels(vae: WanVAE, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InputError, match=message):
        vae.encode(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------------------------
# Decode and streaming decode
# ---------------------------------------------------------------------------------------------------------------
def test_decode_equals_diffusers_decode(model: AutoencoderKLWan, vae: WanVAE) -> None:
    latents = random_latents(4, batch=2)
    with torch.no_grad():
        pixels = vae.decode(latents)
    expected = diffusers_decode(model, latents)
    assert pixels.shape == (2, 13, 3, 32, 32)
    assert torch.equal(pixels, expected)
    assert pixels.abs().max() <= 1.0 and expected.std() > 0.05  # clamped, and not a degenerate constant


@pytest.mark.parametrize("blocks", [[1, 1, 1, 1, 1], [3, 2], [2, 3], [1, 3, 1], [5]])
def test_streaming_decode_equals_one_shot(model: AutoencoderKLWan, vae: WanVAE, blocks: list[int]) -> None:
    latents = random_latents(sum(blocks))
    expected = diffusers_decode(model, latents)
    stream = vae.streaming_decoder()
    outputs, start = [], 0
    with torch.no_grad():
        for size in blocks:
            outputs.append(stream.decode_block(latents[:, start : start + size]))
            start += size
    counts = [out.shape[1] for out in outputs]
    assert counts == [pixel_frames_for(blocks[0])] + [4 * size for size in blocks[1:]]
    assert stream.latent_frames_decoded == 5 and stream.pixel_frames_decoded == 17
    assert (torch.cat(outputs, dim=1) - expected).abs().max() <= 1e-5


def test_streaming_cache_matters(model: AutoencoderKLWan, vae: WanVAE) -> None:
    """Negative control: restarting the decoder for every block (no carried cache) gives different frames."""
    latents = random_latents(4)
    expected = diffusers_decode(model, latents)
    with torch.no_grad():
        head = vae.streaming_decoder().decode_block(latents[:, :2])
        tail = vae.streaming_decoder().decode_block(latents[:, 2:])
    assert tail.shape[1] == 5  # a fresh stream treats its first latent frame as frame 0 of a video
    assert (head - expected[:, :5]).abs().max() <= 1e-5
    assert (tail[:, 1:] - expected[:, 5:9]).abs().max() > 1e-3


def test_two_streams_share_one_vae(model: AutoencoderKLWan, vae: WanVAE) -> None:
    first, second = random_latents(3, seed=4), random_latents(3, seed=5)
    streams = (vae.streaming_decoder(), vae.streaming_decoder())
    outputs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    with torch.no_grad():
        for i in range(3):  # interleave the two videos frame by frame
            for stream, latents, out in zip(streams, (first, second), outputs):
                out.append(stream.decode_block(latents[:, i : i + 1]))
    for latents, out in zip((first, second), outputs):
        assert (torch.cat(out, dim=1) - diffusers_decode(model, latents)).abs().max() <= 1e-5


def test_streaming_reset_and_block_checks(vae: WanVAE) -> None:
    latents = random_latents(2)
    stream = StreamingDecoder(vae)
    with torch.no_grad():
        once = stream.decode_block(latents)
        with pytest.raises(InputError, match="differs from this stream"):
            stream.decode_block(random_latents(1, size=6))
        with pytest.raises(InputError, match="\\[B, F>=1, 16, h, w\\]"):
            stream.decode_block(torch.zeros(1, 1, 8, 4, 4))
        with pytest.raises(InputError, match="\\[B, F>=1, 16, h, w\\]"):
            stream.decode_block(torch.zeros(1, 0, 16, 4, 4))
        stream.reset()
        assert stream.pixel_frames_decoded == 0
        again = stream.decode_block(latents)
    assert torch.equal(once, again)


def test_wan22_style_config_streams_like_diffusers() -> None:
    """A residual, patch-2 config (Wan2.2 structure) exercises `first_chunk` and (un)patchify."""
    model = make_model(TINY_WAN22)
    vae = WanVAE(model)
    assert vae.spatial_factor == 16
    pixels = torch.rand(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    latents = random_latents(3, size=2)
    mean, std = stats(model)
    with torch.no_grad():
        encoded = vae.encode(pixels)
        mu = model.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist.mean
        stream = vae.streaming_decoder()
        streamed = torch.cat([stream.decode_block(latents[:, :1]), stream.decode_block(latents[:, 1:])], dim=1)
    assert torch.equal(encoded, ((mu - mean) / std).permute(0, 2, 1, 3, 4))
    assert (streamed - diffusers_decode(model, latents)).abs().max() <= 1e-5


def test_bfloat16_decode_tracks_float32() -> None:
    vae = WanVAE(make_model(TINY))
    latents = random_latents(2)
    with torch.no_grad():
        reference = vae.decode(latents)
        vae.to(dtype=torch.bfloat16)
        low = vae.decode(latents)
        encoded = vae.encode(torch.zeros(1, 1, 3, 32, 32))
    assert low.dtype == torch.bfloat16 and encoded.dtype == torch.bfloat16
    assert low.abs().max() <= 1.0
    assert (low.float() - reference).abs().max() < 0.25


def test_config_statistics_must_match_latent_channels() -> None:
    with pytest.raises(ConfigError, match="latents_mean"):
        WanVAE(AutoencoderKLWan(base_dim=8, z_dim=4))


# ---------------------------------------------------------------------------------------------------------------
# Weight layouts and loading
# ---------------------------------------------------------------------------------------------------------------
def official_wan21_layout(dim: int = 96, z_dim: int = 16, dim_mult: tuple[int, ...] = (1, 2, 4, 4),
                          num_res_blocks: int = 2, temporal: tuple[bool, ...] = (False, True, True)
                          ) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the official `WanVAE_` (Wan-Video/Wan2.1 `wan/modules/vae.py`).

    Re-derived from that module's structure: ResidualBlock = residual Sequential(RMS_norm, SiLU, CausalConv3d,
    RMS_norm, SiLU, Dropout, CausalConv3d) + 1x1x1 shortcut when channels change; AttentionBlock = norm, to_qkv,
    proj; Resample = resample Sequential(pad/upsample, Conv2d) (+ time_conv for the 3D modes); flat `downsamples`
    / `upsamples` lists; `middle` = (res, attn, res); `head` = (RMS_norm, SiLU, CausalConv3d).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, kernel: tuple[int, ...]) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, *kernel)
        shapes[f"{name}.bias"] = (c_out,)

    def residual(name: str, c_in: int, c_out: int) -> None:
        shapes[f"{name}.residual.0.gamma"] = (c_in, 1, 1, 1)
        conv(f"{name}.residual.2", c_in, c_out, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (c_out, 1, 1, 1)
        conv(f"{name}.residual.6", c_out, c_out, (3, 3, 3))
        if c_in != c_out:
            conv(f"{name}.shortcut", c_in, c_out, (1, 1, 1))

    def middle(prefix: str, c: int) -> None:
        residual(f"{prefix}.middle.0", c, c)
        shapes[f"{prefix}.middle.1.norm.gamma"] = (c, 1, 1)
        conv(f"{prefix}.middle.1.to_qkv", c, 3 * c, (1, 1))
        conv(f"{prefix}.middle.1.proj", c, c, (1, 1))
        residual(f"{prefix}.middle.2", c, c)

    def head(prefix: str, c: int, c_out: int) -> None:
        shapes[f"{prefix}.head.0.gamma"] = (c, 1, 1, 1)
        conv(f"{prefix}.head.2", c, c_out, (3, 3, 3))

    levels = len(dim_mult)
    dims = [dim * m for m in (1, *dim_mult)]
    conv("encoder.conv1", 3, dims[0], (3, 3, 3))
    index = 0
    for level, (c_in, c_out) in enumerate(pairwise(dims)):
        for _ in range(num_res_blocks):
            residual(f"encoder.downsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if level != levels - 1:
            conv(f"encoder.downsamples.{index}.resample.1", c_out, c_out, (3, 3))
            if temporal[level]:
                conv(f"encoder.downsamples.{index}.time_conv", c_out, c_out, (3, 1, 1))
            index += 1
    middle("encoder", dims[-1])
    head("encoder", dims[-1], 2 * z_dim)
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))

    dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
    conv("decoder.conv1", z_dim, dims[0], (3, 3, 3))
    middle("decoder", dims[0])
    index = 0
    for level, (c_in, c_out) in enumerate(pairwise(dims)):
        if level > 0:
            c_in //= 2
        for _ in range(num_res_blocks + 1):
            residual(f"decoder.upsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if level != levels - 1:
            conv(f"decoder.upsamples.{index}.resample.1", c_out, c_out // 2, (3, 3))
            if temporal[::-1][level]:
                conv(f"decoder.upsamples.{index}.time_conv", c_out, 2 * c_out, (3, 1, 1))
            index += 1
    head("decoder", dims[-1], 3)
    return shapes


def test_full_size_original_layout_matches_official_names_and_shapes() -> None:
    full = build_autoencoder(device="meta")
    diffusers_state = full.state_dict()
    original = diffusers_to_original(diffusers_state, full.config)
    assert {k: tuple(v.shape) for k, v in original.items()} == official_wan21_layout()
    assert len(original) == len(diffusers_state) == 194
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "decoder.upsamples.4.shortcut.weight",
                "decoder.upsamples.3.time_conv.weight", "decoder.middle.1.to_qkv.weight", "conv1.weight",
                "conv2.weight"):
        assert key in original
    # diffusers' converter is the exact inverse of our map on the full key set.
    back = original_to_diffusers(original)
    assert set(back) == set(diffusers_state)
    assert all(back[k] is diffusers_state[k] for k in diffusers_state)


def test_original_layout_file_round_trip(tmp_path: Path, model: AutoencoderKLWan) -> None:
    original = {k: v.clone() for k, v in diffusers_to_original(model.state_dict(), model.config).items()}
    assert "decoder.upsamples.4.shortcut.weight" in original and "post_quant_conv.weight" not in original
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, path)
    loaded = load_wan_vae(path, TINY)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_diffusers_folder_and_single_safetensors(tmp_path: Path, model: AutoencoderKLWan) -> None:
    model.save_pretrained(tmp_path / "vae")
    single = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    from_folder = load_wan_vae(tmp_path / "vae", dtype=torch.float64)
    from_file = load_wan_vae(single, TINY)
    latents = random_latents(2)
    with torch.no_grad():
        expected = diffusers_decode(model, latents)
        assert from_folder.dtype == torch.float64
        assert (from_folder.decode(latents).float() - expected).abs().max() <= 1e-5
        assert torch.equal(from_file.decode(latents), expected)


def corrupt_and_expect(path: Path, config: dict | None, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_wan_vae(path, config)
    assert "\n" not in str(info.value)


def test_strict_loading_names_the_bad_key(tmp_path: Path, model: AutoencoderKLWan) -> None:
    original = diffusers_to_original(model.state_dict(), model.config)
    path = tmp_path / "vae.pth"

    torch.save({k: v for k, v in original.items() if k != "decoder.upsamples.7.resample.1.bias"}, path)
    corrupt_and_expect(path, TINY, "missing key 'decoder.upsamples.7.resample.1.bias'")

    torch.save({**original, "encoder.extra.weight": torch.zeros(1)}, path)
    corrupt_and_expect(path, TINY, "unexpected key 'encoder.extra.weight'")

    torch.save({**original, "decoder.head.2.weight": torch.zeros(3, 8, 3, 3, 1)}, path)
    corrupt_and_expect(path, TINY, "'decoder.head.2.weight' has shape \\(3, 8, 3, 3, 1\\)")

    torch.save(original, path)
    corrupt_and_expect(path, None, "shape")  # tiny weights against the default (full-size) config

    diffusers_file = tmp_path / "vae.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.conv_in.bias"}
    save_file(state, str(diffusers_file))
    corrupt_and_expect(diffusers_file, TINY, "missing key 'decoder.conv_in.bias'")
    torch.save(original, path)
    assert isinstance(load_wan_vae(path, TINY), WanVAE)  # the intact file loads: the keys were the cause


def test_unreadable_weight_files(tmp_path: Path, model: AutoencoderKLWan) -> None:
    original = diffusers_to_original(model.state_dict(), model.config)
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(original, good_pth)
    save_file({k: v.contiguous() for k, v in original.items()}, str(good_st))

    for source, name in ((good_pth, "cut.pth"), (good_st, "cut.safetensors")):
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        corrupt_and_expect(tmp_path / name, TINY, "corrupt, truncated")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    corrupt_and_expect(tmp_path / "noise.pth", TINY, "corrupt, truncated")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    corrupt_and_expect(tmp_path / "empty.safetensors", TINY, "corrupt, truncated")
    corrupt_and_expect(tmp_path / "absent.pth", TINY, "not found")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    corrupt_and_expect(tmp_path / "tensor.pth", TINY, "not a flat dict")
    torch.save({"weights": original}, tmp_path / "nested.pth")
    corrupt_and_expect(tmp_path / "nested.pth", TINY, "not a flat dict")
    torch.save({"encoder.foo": torch.zeros(1)}, tmp_path / "other.pth")
    corrupt_and_expect(tmp_path / "other.pth", TINY, "neither an original Wan VAE nor a diffusers")
    for good in (good_pth, good_st):  # the intact files load: damage was the cause
        assert isinstance(load_wan_vae(good, TINY), WanVAE)


_UNPICKLED: list[int] = []


def _unpickle_payload() -> torch.Tensor:
    _UNPICKLED.append(1)
    return torch.zeros(1)


class _Payload:
    """A pickle that runs code when loaded: `weights_only=True` must refuse to construct it."""

    def __reduce__(self):
        return _unpickle_payload, ()


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"encoder.conv1.weight": _Payload()}, path)
    corrupt_and_expect(path, TINY, "corrupt, truncated")
    assert not _UNPICKLED  # the payload's code never ran


def test_folder_and_config_errors(tmp_path: Path, model: AutoencoderKLWan) -> None:
    model.save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="not both"):
        load_wan_vae(tmp_path / "vae", TINY)
    (tmp_path / "vae" / "config.json").write_text("{ not json")
    corrupt_and_expect(tmp_path / "vae", None, "cannot parse VAE config")
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    corrupt_and_expect(tmp_path / "vae", None, "not AutoencoderKLWan")
    (tmp_path / "empty").mkdir()
    corrupt_and_expect(tmp_path / "empty", None, "no config.json")
    with pytest.raises(ConfigError, match="unknown AutoencoderKLWan config key 'base_dimension'"):
        build_autoencoder({"base_dimension": 8}, device="meta")
    with pytest.raises(ConfigError, match="Wan2.1-structured"):
        diffusers_to_original(make_model(TINY_WAN22).state_dict(), make_model(TINY_WAN22).config)


def test_read_state_dict_keeps_every_tensor(tmp_path: Path, model: AutoencoderKLWan) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    read = read_state_dict(tmp_path / "w.safetensors")
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------------
# Images and frames
# ---------------------------------------------------------------------------------------------------------------
GREEN, WHITE, RED, BLUE = (0, 255, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)


def banded_image(transpose: bool) -> Image.Image:
    """256x128 (2:1): red left eighth, blue right eighth, green middle, a white 32x32 square in the centre."""
    array = np.zeros((128, 256, 3), dtype=np.uint8)
    array[:, :] = GREEN
    array[:, :32] = RED
    array[:, 224:] = BLUE
    array[48:80, 112:144] = WHITE
    if transpose:  # 1:2 portrait version: the bands are at the top and bottom
        array = array.transpose(1, 0, 2)
    return Image.fromarray(np.ascontiguousarray(array))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("transpose", [False, True])
def test_load_image_covers_and_centre_crops_without_distortion(transpose: bool) -> None:
    image = load_image(banded_image(transpose), 32, 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    pixels = to_uint8(image)
    assert pixels[..., 1].min() >= 250  # only green and white survive: the red/blue bands were cropped away
    # The 32x32 source square, scaled by 1/4, is an 8x8 square in the centre: aspect ratio preserved.
    white = pixels[..., 2] > 127
    rows, cols = np.nonzero(white.any(axis=1))[0], np.nonzero(white.any(axis=0))[0]
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 19, 12, 19)
    assert white.sum() == 64


def test_load_image_non_square_target_keeps_aspect() -> None:
    image = to_uint8(load_image(banded_image(False), 16, 48))  # 3:1 target from a 2:1 image: trim top/bottom
    white = image.min(axis=-1) > 127
    rows, cols = np.nonzero(white.any(axis=1))[0], np.nonzero(white.any(axis=0))[0]
    # scale 48/256 = 3/16: the square becomes 6x6, centred at (8, 24)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 10, 21, 26)
    # the full width is kept: the side bands (256/8 px -> 6 px) are still there
    assert image[:, :5, 0].min() > 200 and image[:, :5, 1:].max() < 50
    assert image[:, -5:, 2].min() > 200 and image[:, -5:, :2].max() < 50


def test_load_image_files_and_pil_agree(tmp_path: Path) -> None:
    source = banded_image(False)
    source.save(tmp_path / "a.png")
    from_file = load_image(tmp_path / "a.png", 32, 32)
    assert torch.equal(from_file, load_image(source, 32, 32))
    source.save(tmp_path / "a.jpg", quality=95)
    from_jpeg = load_image(str(tmp_path / "a.jpg"), 32, 32)
    assert (from_jpeg - from_file).abs().max() < 0.1


def test_transparency_is_composited_onto_the_background() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)       # fully transparent red: must become the background
    rgba[:, 4:] = (0, 0, 0, 128)       # half-transparent black
    image = Image.fromarray(rgba)
    on_white = to_uint8(load_image(image, 8, 8))
    on_black = to_uint8(load_image(image, 8, 8, background=(0, 0, 0)))
    assert (on_white[:, :3] == 255).all() and (on_black[:, :3] == 0).all()
    assert np.abs(on_white[:, 5:].astype(int) - 127).max() <= 1 and (on_black[:, 5:] == 0).all()


def test_palette_grey_and_cmyk_modes(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    palette.info["transparency"] = 0  # palette index 0 is transparent
    pixels = to_uint8(load_image(palette, 8, 8))
    assert (pixels[:, :3] == 255).all() and (pixels[:, 5:] == (200, 100, 50)).all()

    grey = to_uint8(load_image(Image.new("L", (8, 8), 77), 8, 8))
    assert (grey == 77).all()
    grey_alpha = to_uint8(load_image(Image.new("LA", (8, 8), (0, 0)), 8, 8))
    assert (grey_alpha == 255).all()
    sixteen = to_uint8(load_image(Image.fromarray(np.full((8, 8), 257 * 40, dtype=np.uint16)), 8, 8))
    assert (sixteen == 40).all()

    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = to_uint8(load_image(tmp_path / "cmyk.jpg", 8, 8))
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # CMYK (0, 255, 255, 0) is red


def test_unreadable_images_raise_input_error(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:300])
    cases = [(tmp_path / "missing.png", "not found"), (tmp_path, "not found"),
             (tmp_path / "notes.png", "cannot read image"), (tmp_path / "cut.png", "cannot read image")]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as info:
            load_image(path, 8, 8)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="must be positive"):
        load_image(Image.new("RGB", (8, 8)), 0, 8)


def test_uint8_frame_helpers() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (5, 8, 12, 3), dtype=np.uint8)
    pixels = frames_to_pixels(frames)
    assert pixels.shape == (1, 5, 3, 8, 12) and pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(pixels_to_frames(pixels), frames)
    assert pixels_to_frames(torch.full((1, 3, 2, 2), 5.0)).min() == 255
    assert pixels_to_frames(torch.full((1, 3, 2, 2), -5.0)).max() == 0
    with pytest.raises(InputError):
        pixels_to_frames(torch.zeros(2, 1, 3, 4, 4))
    with pytest.raises(InputError):
        frames_to_pixels(frames.astype(np.float32))


def test_the_cli_and_the_pipelines_import_without_diffusers() -> None:
    """diffusers takes seconds to import; only the Wan VAE needs it, so it is imported when one is built."""
    import subprocess
    import sys

    code = ("import sys, causal_forcing.cli.generate, causal_forcing.pipelines.video, causal_forcing.serving.app, "
            "causal_forcing.models.vae; print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
