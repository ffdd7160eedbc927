"""Tests of the small ShapesWorld VAE (`models.small_vae`), its training stage's pieces and `data.encode`.

Truths used: the frame-count rule 1 + 4(F - 1) of the Wan VAE, causality (a frame never depends on later
frames), the ShapesWorld renderer as ground truth and the ShapesBench judge for the shipped weights, and an
uninterrupted encode run as the reference for a resumed one.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from causal_forcing.cli import encode as encode_cli
from causal_forcing.data import shapes
from causal_forcing.data.encode import encode_clips
from causal_forcing.data.latents import LatentDataset
from causal_forcing.data.shapes_io import write_training_set
from causal_forcing.errors import CheckpointError, ConfigError, InputError
from causal_forcing.eval import shapesbench
from causal_forcing.models.small_vae import (
    BUNDLED_SHAPES_VAE,
    SmallVAE,
    SmallVAEConfig,
    latent_frames_for,
    load_vae,
    pixel_frames_for,
    upsample2x,
)
from causal_forcing.training import loop
from causal_forcing.training import vae as vae_stage
from causal_forcing.training.config import load_config

TINY = SmallVAEConfig(encoder_channels=(4, 8, 8, 16), encoder_blocks=(1, 1), decoder_channels=(16, 8, 8, 4),
                      decoder_blocks=(1, 1, 1), latents_mean=tuple(0.1 * i for i in range(16)),
                      latents_std=tuple(1.0 + 0.05 * i for i in range(16)))

# Floors for the shipped weights on the clips below (measured values are in docs/shapes_vae.md).
PSNR_MIN_DB = 26.0   # every clip (measured: 27.7 dB at worst on these six)
PSNR_MEAN_DB = 30.0  # mean over the six (measured: 33.9 dB)
SEMANTIC_FLOOR = 0.95


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> SmallVAE:
    torch.manual_seed(0)
    return SmallVAE(TINY).eval().requires_grad_(False)


# The shipped weights come from `causal-forcing train vae` (docs/shapes_world.md); until they are trained and
# committed, the tests that need them are skipped with this reason.
needs_shipped = pytest.mark.skipif(not (BUNDLED_SHAPES_VAE / "config.json").exists(),
                                   reason="shipped ShapesWorld VAE weights not trained yet")


@pytest.fixture(scope="module")
def shipped() -> SmallVAE:
    if not (BUNDLED_SHAPES_VAE / "config.json").exists():
        pytest.skip("shipped ShapesWorld VAE weights not trained yet")
    return load_vae("shapes")


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    return vae_stage.frames_to_tensor(frames).unsqueeze(0)


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels[0].permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Frame counts, causality, streaming
# ---------------------------------------------------------------------------------------------------------------
def test_frame_count_rule(tiny: SmallVAE) -> None:
    assert [pixel_frames_for(f) for f in (1, 2, 21)] == [1, 5, 81]
    assert [latent_frames_for(t) for t in (1, 5, 81)] == [1, 2, 21]
    for bad in (0, 2, 4, 80):
        with pytest.raises(InputError):
            latent_frames_for(bad)
    for frames in (1, 5, 9, 17):
        z = tiny.encode(torch.rand(2, frames, 3, 16, 24) * 2 - 1)
        assert z.shape == (2, latent_frames_for(frames), 16, 2, 3)
        assert tiny.decode(z).shape == (2, frames, 3, 16, 24)
    with pytest.raises(InputError):
        tiny.encode(torch.zeros(1, 6, 3, 16, 16))
    with pytest.raises(InputError):
        tiny.encode(torch.zeros(1, 5, 3, 12, 16))
    assert tiny.encode_image(torch.zeros(3, 16, 16)).shape == (1, 1, 16, 2, 2)


@pytest.mark.parametrize("blocks", [[1] * 7, [3, 3, 1], [2, 1, 4], [7]])
def test_streaming_decode_equals_one_shot(tiny: SmallVAE, blocks: list[int]) -> None:
    torch.manual_seed(1)
    latents = torch.randn(2, sum(blocks), 16, 2, 2)
    whole = tiny.decode(latents)
    stream = tiny.streaming_decoder()
    parts, start = [], 0
    for index, size in enumerate(blocks):
        part = stream.decode_block(latents[:, start:start + size])
        assert part.shape[1] == (pixel_frames_for(size) if index == 0 else 4 * size)
        parts.append(part)
        start += size
        assert stream.latent_frames_decoded == start and stream.pixel_frames_decoded == pixel_frames_for(start)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)


def test_streaming_refuses_a_vae_moved_mid_stream(tiny: SmallVAE) -> None:
    """The decoder's cache holds tensors of the old dtype: a stream must be reset after the VAE changes dtype."""
    import copy
    vae = copy.deepcopy(tiny)
    latents = torch.randn(1, 3, 16, 2, 2)
    stream = vae.streaming_decoder()
    stream.decode_block(latents[:, :1])
    vae.to(torch.float64)
    with pytest.raises(RuntimeError, match="changed device/dtype"):
        stream.decode_block(latents[:, 1:])
    stream.reset()
    torch.testing.assert_close(stream.decode_block(latents), vae.decode(latents.double()), rtol=0, atol=1e-9)


def test_upsample_equals_nearest_interpolation() -> None:
    x = torch.randn(3, 5, 4, 7)
    assert torch.equal(upsample2x(x), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_large_batches_decode_in_parts_with_the_same_result(tiny: SmallVAE, monkeypatch) -> None:
    """Truth: each video decoded on its own; `decode` of the batch, split into calls of 2 videos, agrees."""
    import causal_forcing.models.small_vae as small_vae
    torch.manual_seed(2)
    latents = torch.randn(5, 3, 16, 2, 2)
    alone = torch.cat([tiny.decode(latents[i:i + 1]) for i in range(5)])
    monkeypatch.setattr(small_vae, "DECODE_FRAMES_PER_CALL", 2 * 4 * 3)
    calls, decode_block = [], small_vae.SmallStreamingDecoder.decode_block
    monkeypatch.setattr(small_vae.SmallStreamingDecoder, "decode_block",
                        lambda self, z: calls.append(len(z)) or decode_block(self, z))
    torch.testing.assert_close(tiny.decode(latents), alone, rtol=0, atol=1e-6)
    assert calls == [2, 2, 1]


def test_streaming_carries_history_and_resets(shipped: SmallVAE) -> None:
    frames = shapes.render_seed(5, 64, 17)[1]
    with torch.inference_mode():
        latents = shipped.encode(to_pixels(frames))
        stream = shipped.streaming_decoder()
        stream.decode_block(latents[:, :2])
        continued = stream.decode_block(latents[:, 2:])
        fresh = shipped.streaming_decoder().decode_block(latents[:, 2:])  # latent 2 gives 1 frame here, 4 above
        assert (continued[:, 4:] - fresh[:, 1:]).abs().max() > 0.05  # the history changes the output
        stream.reset()
        torch.testing.assert_close(stream.decode_block(latents), shipped.decode(latents), rtol=0, atol=1e-5)
    with pytest.raises(InputError):
        stream.decode_block(torch.randn(1, 1, 16, 3, 2))  # layout differs from the stream's
    with pytest.raises(InputError):
        stream.decode_block(torch.randn(1, 1, 8, 2, 2))


def test_encoder_and_decoder_are_causal(tiny: SmallVAE) -> None:
    torch.manual_seed(3)
    pixels = torch.rand(1, 13, 3, 16, 16) * 2 - 1
    changed = pixels.clone()
    changed[:, 5:] = -changed[:, 5:]  # frames 5.. belong to latent frames 2..
    z, z_changed = tiny.encode(pixels), tiny.encode(changed)
    torch.testing.assert_close(z[:, :2], z_changed[:, :2], rtol=0, atol=1e-6)
    assert (z[:, 2:] - z_changed[:, 2:]).abs().max() > 1e-3
    out, out_changed = tiny.decode(z), tiny.decode(z_changed)
    torch.testing.assert_close(out[:, :5], out_changed[:, :5], rtol=0, atol=1e-6)


def test_normalisation_round_trip(tiny: SmallVAE) -> None:
    raw = torch.randn(2, 16, 3, 2, 2)
    torch.testing.assert_close(tiny.denormalize(tiny.normalize(raw)), raw)
    z = tiny.encode(torch.zeros(1, 5, 3, 16, 16))
    torch.testing.assert_close(z.transpose(1, 2), tiny.normalize(tiny.encode_raw(torch.zeros(1, 5, 3, 16, 16))
                                                                 .transpose(1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tiny: SmallVAE, tmp_path: Path) -> None:
    tiny.save_folder(tmp_path / "vae")
    loaded = SmallVAE.from_folder(tmp_path / "vae")
    assert loaded.config == TINY
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    z = torch.randn(1, 3, 16, 2, 2)
    assert torch.equal(loaded.decode(z), tiny.decode(z))
    assert isinstance(load_vae(tmp_path / "vae"), SmallVAE)


def test_load_errors(tiny: SmallVAE, tmp_path: Path) -> None:
    folder = tiny.save_folder(tmp_path / "vae")
    good = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**good, "decoder_channels": [16, 8, 8, 8]}))
    with pytest.raises(CheckpointError, match="shape"):
        SmallVAE.from_folder(folder)
    (folder / "config.json").write_text(json.dumps({**good, "extra": 1}))
    with pytest.raises(CheckpointError, match="unknown"):
        SmallVAE.from_folder(folder)
    (folder / "config.json").write_text(json.dumps(good))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        SmallVAE.from_folder(folder)
    with pytest.raises(CheckpointError, match="config.json"):
        SmallVAE.from_folder(tmp_path / "missing")
    with pytest.raises(ConfigError):
        SmallVAEConfig(latents_std=(0.0,) * 16)


@needs_shipped
def test_shipped_weights_size_and_config() -> None:
    weights = BUNDLED_SHAPES_VAE / "model.safetensors"
    total = weights.stat().st_size + (BUNDLED_SHAPES_VAE / "config.json").stat().st_size
    assert total <= 10 * 1024 * 1024
    vae = load_vae("shapes")
    assert vae.latent_channels == 16 and vae.spatial_factor == 8
    assert max(vae.config.latents_std) != 1.0  # statistics were measured, not left at the defaults


# ---------------------------------------------------------------------------------------------------------------
# The shipped weights on ShapesWorld
# ---------------------------------------------------------------------------------------------------------------
def test_shipped_round_trip_quality(shipped: SmallVAE) -> None:
    """Reconstructions keep what the judge reads. In-distribution clips keep every semantic attribute; held-out
    clips (combinations the VAE never saw, e.g. yellow triangles) keep colour and motion, and their shape is
    where this VAE is known to fail (docs/shapes_vae.md), so it is not asserted."""
    prompts = shapes.standard_eval_prompts()
    chosen = [p for p in prompts if not p.held_out][:4] + [p for p in prompts if p.held_out][:2]
    psnrs, results = [], {False: [], True: []}
    for prompt in chosen:
        frames = shapes.render(shapes.clip_for_caption(prompt.caption, prompt.seed, 64, 81))
        pixels = to_pixels(frames)
        with torch.inference_mode():
            latents = shipped.encode(pixels)
            recon = shipped.decode(latents)
        assert latents.shape == (1, 21, 16, 8, 8)
        assert 0.2 < latents.std().item() < 5.0  # normalised to about unit scale
        decoded = to_frames(recon)
        psnrs.append(vae_stage.psnr(vae_stage.frames_to_tensor(decoded), vae_stage.frames_to_tensor(frames)))
        results[prompt.held_out].append(shapesbench.score_clip(decoded, prompt.caption))
    assert min(psnrs) >= PSNR_MIN_DB and sum(psnrs) / len(psnrs) >= PSNR_MEAN_DB, psnrs
    seen, held_out = shapesbench.summarize(results[False]), shapesbench.summarize(results[True])
    for key in shapesbench.SEMANTIC_KEYS:
        assert seen[key] >= SEMANTIC_FLOOR, (key, seen)
    assert held_out["color"] >= SEMANTIC_FLOOR and held_out["motion"] >= SEMANTIC_FLOOR, held_out


def test_shipped_weights_reject_noise_as_shapes(shipped: SmallVAE) -> None:
    """The judge must not be fooled: decoding random latents gives no valid clip of a caption."""
    torch.manual_seed(4)
    with torch.inference_mode():
        decoded = to_frames(shipped.decode(torch.randn(1, 5, 16, 8, 8) * 3))
    assert shapesbench.score_clip(decoded, "a big red square moving left")["all_correct"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Training stage pieces
# ---------------------------------------------------------------------------------------------------------------
def test_training_batches_are_reproducible_windows() -> None:
    source = vae_stage.ClipSource("", 64, 81)
    a = vae_stage.training_batch(source, seed=3, step=7, batch=2, frames=9, crop=32)
    b = vae_stage.training_batch(source, seed=3, step=7, batch=2, frames=9, crop=32)
    c = vae_stage.training_batch(source, seed=3, step=8, batch=2, frames=9, crop=32)
    assert a.shape == (2, 9, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    rgb = ((a + 1.0) * 127.5).round().to(torch.int64).permute(0, 1, 3, 4, 2).reshape(-1, 3)
    palette = {(0, 0, 0), *shapes.COLORS.values()}
    assert {tuple(c) for c in rgb.unique(dim=0).tolist()} <= palette


def test_recolor_keeps_objects_and_avoids_held_out_combinations() -> None:
    rng = np.random.default_rng(0)
    held_out_prone = shapes.ObjectAttrs(size="big", color="red", shape="triangle", motion="up")
    judged = {vae_stage.judged_color(vae_stage.random_object_color(held_out_prone, rng)) for _ in range(300)}
    assert judged == {"red", "green", "blue", "white"}  # never black, yellow (triangle) or purple (moving up)
    spec, frames = shapes.render_seed(3, 64, 17)
    out = vae_stage.recolor(frames, spec.attrs, rng)
    assert np.array_equal((out != 0).any(-1), (frames != 0).any(-1))  # same object pixels, background black
    for attrs in spec.attrs:
        mask = np.all(frames == shapes.COLORS[attrs.color], axis=-1)
        assert len(np.unique(out[mask], axis=0)) == 1  # one new flat colour per object


def test_offpalette_loss_closed_form_and_finite_gradient() -> None:
    """The hinge equals max(0, d - margin) / 255 averaged over pixels, d the RGB distance (0-255) to the nearest
    of black and the palette computed here by hand; exact palette pixels cost nothing and get a zero (not NaN)
    gradient, and a dim edge pixel is pushed towards its nearest colour."""
    colors = [(0, 0, 0), *shapes.COLORS.values()]
    rgb = np.array([colors[1], (0, 0, 0), (128, 0, 0), (128, 128, 128), (200, 190, 30), colors[-1]], dtype=float)
    margin = 20.0
    nearest = np.sqrt(((rgb[:, None] - np.array(colors, dtype=float)[None]) ** 2).sum(-1)).min(1)
    expected = np.maximum(nearest - margin, 0.0).mean() / 255.0
    out = torch.tensor(rgb / 127.5 - 1.0, dtype=torch.float32).T.reshape(1, 3, 2, 3).requires_grad_(True)
    loss = vae_stage.offpalette_loss(out, margin)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    loss.backward()
    grad = out.grad.reshape(3, 6).T
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[[0, 1, 5]], torch.zeros(3, 3))           # on the palette: nothing to learn
    exact = torch.tensor(np.array(colors, dtype=float) / 127.5 - 1.0, dtype=torch.float32).T.reshape(1, 3, 1, -1)
    assert vae_stage.offpalette_loss(exact, 0.0).item() < 1e-6   # float32 rounding of the colours only
    # Mid-red (128, 0, 0) sits between red and black; a step against the gradient moves it nearer one of them.
    step = out.detach() - 0.05 * out.grad.sign()
    assert vae_stage.offpalette_loss(step, margin) < loss


def test_stage_config_validation(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "vae.yaml"
    cfg = load_config(vae_stage.Config, config)
    assert cfg.stage.frames == 17 and cfg.stage.size == 64
    # The preset's rate: linear warm-up, then a cosine from optim.lr down to 5% of it at train.max_steps.
    lr, warm, total = cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps
    assert loop.learning_rate(cfg, 0) == pytest.approx(lr / warm)
    assert loop.learning_rate(cfg, warm) == pytest.approx(lr)
    assert loop.learning_rate(cfg, (warm + total) // 2) == pytest.approx(lr * (0.05 + 0.95 * 0.5), rel=1e-3)
    assert loop.learning_rate(cfg, total) == pytest.approx(lr * 0.05)
    for override in ("stage.frames=16", "stage.crop=12", "stage.frames=85", "stage.latent_noise=-1",
                     "stage.offpalette_weight=-1", "stage.offpalette_margin=-5",
                     "stage.lr_min_ratio=0.1", "optim.schedule=step"):
        with pytest.raises((ConfigError, InputError)):
            load_config(vae_stage.Config, config, [override])


def test_stage_trains_resumes_and_exports(tmp_path: Path) -> None:
    """Two steps + resume for one more equals three uninterrupted steps; the export loads with statistics."""
    common = ["stage.encoder_channels=[4,8,8,16]", "stage.decoder_channels=[16,8,8,4]", "stage.encoder_blocks=[1,1]",
              "stage.decoder_blocks=[1,1,1]", "stage.frames=5", "stage.crop=16", "stage.crop_steps=100",
              "stage.stats_clips=2", "stage.eval_clips=1", "stage.source_frames=17", "stage.threads=1",
              "data.batch_size=2", "train.progress=false", "train.save_every=1", "train.max_steps=3",
              "optim.warmup_steps=1", "ema.decay=0.9"]
    straight = load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'a'}"])
    final = vae_stage.run(straight)
    paused = load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'b'}", "train.max_steps=2"])
    vae_stage.run(paused)
    resumed = load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="resume"):
        vae_stage.run(resumed)
    final_b = vae_stage.run(resumed, resume=True)
    a, b = SmallVAE.from_folder(final), SmallVAE.from_folder(final_b)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    assert a.config.latents_std == b.config.latents_std and a.config.latents_std != (1.0,) * 16
    report = json.loads((final / "eval.json").read_text())
    assert math.isfinite(report["psnr_db"]) and report["eval_clips"] == 1
    wider = load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'c'}", f"train.init={final}",
                                                 "stage.decoder_channels=[16,8,8,8]"])
    with pytest.raises(ConfigError, match="architecture"):
        vae_stage.run(wider)
    tuned = load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'd'}", f"train.init={final}",
                                                 "optim.lr=1e-12", "train.max_steps=1", "ema.decay=0.0"])
    tuned_model = SmallVAE.from_folder(vae_stage.run(tuned))
    for key, value in a.state_dict().items():  # a negligible step from the init weights
        torch.testing.assert_close(tuned_model.state_dict()[key], value, rtol=0, atol=1e-6)
    # Decoder-only fine-tune: the encoder and the latent statistics stay bit-identical, the decoder learns.
    decoder_only = ["stage.trainable=decoder", "optim.lr=1e-2", "train.max_steps=2", "stage.latent_noise=0.3",
                    "stage.offpalette_weight=2.0"]
    with pytest.raises(ConfigError, match="train.init"):
        vae_stage.run(load_config(vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'e'}",
                                                           *decoder_only]))
    dec = SmallVAE.from_folder(vae_stage.run(load_config(
        vae_stage.Config, None, [*common, f"train.out_dir={tmp_path / 'f'}", f"train.init={final}", *decoder_only])))
    assert dec.config == a.config  # statistics kept, not re-measured
    changed = {key for key, value in a.state_dict().items() if not torch.equal(dec.state_dict()[key], value)}
    assert changed and all(key.startswith("decoder.") for key in changed)
    with pytest.raises((ConfigError, InputError)):
        load_config(vae_stage.Config, None, ["stage.trainable=encoder"])


# ---------------------------------------------------------------------------------------------------------------
# Latent datasets
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    write_training_set(folder, num=5, seed=11, size=64, frames=17)
    return folder


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    encode_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def dataset_by_id(folder: Path) -> dict[str, dict]:
    data = LatentDataset(folder)
    return {item["record"]["id"]: item for item in (data[i] for i in range(len(data)))}


def test_encode_records_and_latents(clip_folder: Path, shipped: SmallVAE, tmp_path: Path) -> None:
    assert run_cli("encode", "--clips", str(clip_folder), "--out", str(tmp_path / "ds"), "--shard-size", "2") == 0
    items = dataset_by_id(tmp_path / "ds")
    manifest = [json.loads(line) for line in (clip_folder / "manifest.jsonl").read_text().splitlines()]
    assert sorted(items) == sorted(Path(m["file"]).stem for m in manifest)
    for entry in manifest:
        item = items[Path(entry["file"]).stem]
        assert item["latents"].shape == (5, 16, 8, 8) and "context" not in item
        assert item["record"]["caption"] == entry["train_caption"]
        assert item["record"]["canonical"] == entry["caption"]
        frames = shapes.render_seed(entry["seed"], 64, 17)[1]
        with torch.inference_mode():
            expected = shipped.encode(to_pixels(frames))[0]
        torch.testing.assert_close(item["latents"], expected, rtol=1e-2, atol=1e-2)  # stored as float16


def test_max_frames_keeps_the_latents_of_the_first_pixel_frames(clip_folder: Path, shipped: SmallVAE,
                                                                 tmp_path: Path) -> None:
    """The VAE is causal, so the first 3 latent frames of a 17-frame clip are the latents of its first 9 frames:
    a dataset read with max_frames=3 trains on exactly the 9-frame clips."""
    assert run_cli("encode", "--clips", str(clip_folder), "--out", str(tmp_path / "ds")) == 0
    cropped = LatentDataset(tmp_path / "ds", max_frames=3)
    for i in range(len(cropped)):
        item = cropped[i]
        assert item["latents"].shape == (3, 16, 8, 8)
        frames = shapes.render_seed(item["record"]["seed"], 64, 17)[1][:9]
        with torch.inference_mode():
            expected = shipped.encode(to_pixels(frames))[0]
        torch.testing.assert_close(item["latents"], expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(InputError, match="fewer than max_frames=6"):
        LatentDataset(tmp_path / "ds", max_frames=6)[0]
    with pytest.raises(InputError, match="max_frames must be >= 0"):
        LatentDataset(tmp_path / "ds", max_frames=-1)


@needs_shipped
def test_encode_resumes_after_interruption(clip_folder: Path, tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    vae = load_vae("shapes")
    from causal_forcing.models.text import build_text_encoder

    text = build_text_encoder("minilm", text_len=16)
    options = {"vae_name": "shapes", "text_encoder": text, "text_encoder_name": "minilm", "shard_size": 2}
    encode_clips(clip_folder, vae, reference, **options)

    def interrupt(done: int, total: int) -> None:
        if done == 2:  # the first shard has just been written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_clips(clip_folder, vae, resumed, progress=interrupt, **options)
    assert len(LatentDataset(resumed)) == 2
    summary = encode_clips(clip_folder, vae, resumed, **options)
    assert (summary.encoded, summary.skipped, summary.total) == (3, 2, 5)
    want, got = dataset_by_id(reference), dataset_by_id(resumed)
    assert sorted(want) == sorted(got)
    for key, item in want.items():
        assert torch.equal(got[key]["latents"], item["latents"])
        assert torch.equal(got[key]["context"], item["context"]) and item["context"].shape == (16, 384)
        assert got[key]["record"] == item["record"]
    with pytest.raises(InputError, match="text_encoder"):
        encode_clips(clip_folder, vae, resumed, vae_name="shapes")
