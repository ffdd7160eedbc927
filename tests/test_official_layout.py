"""Official Wan2.1 file layouts at any size: architecture inference and `generate --base` end to end.

Truths used: the full-size architectures built on the meta device (diffusers' ``AutoencoderKLWan`` defaults are
the official Wan2.1 VAE; Wan's UMT5-XXL key/shape table is written out below from ``wan/modules/t5.py``); tiny
random models written by this test in the official layouts (DiT ``config.json`` with the official WanModel fields
+ safetensors, ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` + tokenizer, a released ``.pt`` with the
FSDP-wrapped key prefix); diffusers' own one-shot VAE encode/decode for the I2V first frame; PyAV reading the MP4s.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")

from diffusers import AutoencoderKLWan  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import fan_in_init  # noqa: E402
from causal_forcing import cli  # noqa: E402
from causal_forcing.checkpoints import save_safetensors  # noqa: E402
from causal_forcing.cli.generate import resize_pipeline  # noqa: E402
from causal_forcing.config import ModelConfig  # noqa: E402
from causal_forcing.errors import CheckpointError, ConfigError  # noqa: E402
from causal_forcing.models.text import (  # noqa: E402
    UMT5_CHECKPOINT_NAME,
    UMT5_TOKENIZER_DIR,
    hf_to_wan_t5_state_dict,
    umt5_xxl_config,
)
from causal_forcing.models.text_infer import infer_umt5_config, umt5_config_for_folder  # noqa: E402
from causal_forcing.models.vae import (  # noqa: E402
    build_autoencoder,
    diffusers_to_original,
    load_image,
    pixels_to_frames,
)
from causal_forcing.models.vae_infer import infer_wan_vae_config, read_weight_shapes, wan_vae_config_for  # noqa: E402
from causal_forcing.models.wan import WanDiT  # noqa: E402
from causal_forcing.pipelines.loading import load_pipeline  # noqa: E402

FRAME_HW = (32, 48)                      # 4 x 6 latents: not square, so a height/width swap shows
SIZE = f"{FRAME_HW[0]}x{FRAME_HW[1]}"
FPS = 16                                 # the released models' frame rate
PROMPT = "a red cat sits on the mat"
FSDP_PREFIX = "model._fsdp_wrapped_module."
WORDS = ["a", "red", "blue", "cat", "dog", "sits", "runs", "on", "the", "mat", "in", "park"]

# The DiT part of an official Wan2.1 config.json: exactly its fields (no text_dim: Wan's is 4096), tiny values.
DIT_CONFIG_JSON = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 64, "eps": 1e-06,
                   "ffn_dim": 128, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 2,
                   "num_layers": 2, "out_dim": 16, "text_len": 16}
# A T5 as wide as UMT5-XXL (the DiT's text_dim) but otherwise tiny.
TINY_T5 = {"vocab_size": 64, "d_model": 4096, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2}
TINY_VAE = {"base_dim": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def official_umt5_xxl_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's T5Encoder: vocab 256384, dim 4096, dim_attn 4096,
    dim_ffn 10240, 64 heads, 24 layers, 32 buckets, one position table per layer)."""
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (4096,), p + "norm2.weight": (4096,),
                       p + "ffn.gate.0.weight": (10240, 4096), p + "ffn.fc1.weight": (10240, 4096),
                       p + "ffn.fc2.weight": (4096, 10240), p + "pos_embedding.embedding.weight": (32, 64)})
        shapes.update({p + f"attn.{n}.weight": (4096, 4096) for n in "qkvo"})
    return shapes


def original_vae_shapes(config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of an original-layout Wan VAE file with ``config`` (meta device: no memory)."""
    model = build_autoencoder(config, device="meta")
    return {k: tuple(v.shape) for k, v in diffusers_to_original(model.state_dict(), model.config).items()}


def public(config) -> dict:
    """A diffusers config without its metadata entries."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------------------
# Inference: full size gives the official configs, tiny configs round trip
# ---------------------------------------------------------------------------------------------------------------
def test_full_size_vae_file_gives_the_official_config():
    inferred = infer_wan_vae_config(original_vae_shapes())
    assert inferred == {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                        "temperal_downsample": [False, True, True]}
    assert public(build_autoencoder(inferred, device="meta").config) == public(build_autoencoder(device="meta").config)


def test_full_size_t5_file_gives_the_umt5_xxl_config():
    assert infer_umt5_config(official_umt5_xxl_shapes()) == umt5_xxl_config()
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(umt5_xxl_config())
    assert infer_umt5_config(hf_to_wan_t5_state_dict(model.state_dict(), 24)) == umt5_xxl_config()


@pytest.mark.parametrize("config", [
    {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]},
    {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 2, 3], "temperal_downsample": [True, True, False]},
    {"base_dim": 6, "z_dim": 8, "dim_mult": [2, 2, 1, 1], "temperal_downsample": [False, False, True],
     "decoder_base_dim": 10},
])
def test_tiny_vae_configs_round_trip(config):
    assert infer_wan_vae_config(original_vae_shapes(config)) == {**config, "num_res_blocks": 2}


@pytest.mark.parametrize("config", [
    TINY_T5,
    {"vocab_size": 100, "d_model": 32, "d_kv": 16, "d_ff": 48, "num_layers": 3, "num_heads": 4,
     "relative_attention_num_buckets": 8},
    {"vocab_size": 17, "d_model": 12, "d_kv": 6, "d_ff": 20, "num_layers": 1, "num_heads": 3},
])
def test_tiny_t5_configs_round_trip(config):
    expected = umt5_xxl_config(**config)
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(expected)
    assert infer_umt5_config(hf_to_wan_t5_state_dict(model.state_dict(), expected.num_layers)) == expected


def test_vae_inference_errors(tmp_path):
    shapes = original_vae_shapes(TINY_VAE)
    with pytest.raises(CheckpointError, match="'conv2.weight'"):
        infer_wan_vae_config({k: v for k, v in shapes.items() if k != "conv2.weight"})
    gap = {k: v for k, v in shapes.items() if not k.startswith("encoder.downsamples.4.")}
    with pytest.raises(CheckpointError, match="0..n-1"):
        infer_wan_vae_config(gap)
    uneven = {k: v for k, v in shapes.items() if not k.startswith("encoder.downsamples.10.")}
    with pytest.raises(CheckpointError, match="same positive number"):
        infer_wan_vae_config(uneven)
    with pytest.raises(CheckpointError, match="diffusers' key layout"):
        infer_wan_vae_config(build_autoencoder(TINY_VAE, device="meta").state_dict())
    # File-level helper: a folder or a diffusers-layout file keeps the loader's own rule; z_dim != 16 is refused.
    assert wan_vae_config_for(tmp_path) is None
    model = AutoencoderKLWan(base_dim=4, z_dim=4)
    save_file(model.state_dict(), str(tmp_path / "diffusers.safetensors"))
    assert wan_vae_config_for(tmp_path / "diffusers.safetensors") is None
    torch.save(diffusers_to_original(model.state_dict(), model.config), tmp_path / "z4.pth")
    assert read_weight_shapes(tmp_path / "z4.pth")["conv2.weight"] == (4, 4, 1, 1, 1)
    with pytest.raises(ConfigError, match="z_dim=4"):
        wan_vae_config_for(tmp_path / "z4.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="broken.pth"):
        wan_vae_config_for(tmp_path / "broken.pth")


def test_t5_inference_errors(tmp_path):
    shapes = official_umt5_xxl_shapes()
    with pytest.raises(CheckpointError, match="'blocks.0.ffn.fc1.weight'"):
        infer_umt5_config({k: v for k, v in shapes.items() if k != "blocks.0.ffn.fc1.weight"})
    with pytest.raises(CheckpointError, match="0..n-1"):
        infer_umt5_config({k: v for k, v in shapes.items() if not k.startswith("blocks.3.")})
    with pytest.raises(CheckpointError, match="shared relative-position table"):
        infer_umt5_config({**shapes, "pos_embedding.embedding.weight": (32, 64)})
    with pytest.raises(CheckpointError, match="not a multiple of 64 heads"):
        infer_umt5_config({**shapes, "blocks.0.attn.q.weight": (4000, 4096)})
    with pytest.raises(CheckpointError, match="UMT5 checkpoint not found"):
        umt5_config_for_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# A tiny Wan2.1 base folder in the official layouts
# ---------------------------------------------------------------------------------------------------------------
def save_tiny_tokenizer(folder: Path) -> None:
    """A T5-like WordLevel tokenizer saved with ``save_pretrained``: <pad>=0, </s>=1 after every text, <unk>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))


def write_tiny_release(root: Path) -> dict:
    """Write a tiny Wan2.1 base folder, a released checkpoint and a PNG under ``root``; their paths and weights.

    ``root/Wan2.1-T2V-1.3B/`` (the base folder), ``root/causal_forcing.pt`` and ``root/first.png``. Also used by
    docs/benchmarks.md to time the tiny configuration.
    """
    base = root / "Wan2.1-T2V-1.3B"
    base.mkdir(parents=True)
    config = ModelConfig.from_dict(DIT_CONFIG_JSON)
    (base / "config.json").write_text(json.dumps(DIT_CONFIG_JSON, indent=2))
    save_safetensors(fan_in_init(WanDiT(config), seed=11).state_dict(), base / "diffusion_pytorch_model.safetensors")

    torch.manual_seed(1)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    torch.save(diffusers_to_original(vae.state_dict(), vae.config), base / "Wan2.1_VAE.pth")

    torch.manual_seed(2)
    t5 = transformers.UMT5EncoderModel(umt5_xxl_config(**TINY_T5)).eval()
    t5_state = {k: v.to(torch.bfloat16) for k, v in hf_to_wan_t5_state_dict(t5.state_dict(), 2).items()}
    torch.save(t5_state, base / UMT5_CHECKPOINT_NAME)
    save_tiny_tokenizer(base / UMT5_TOKENIZER_DIR)

    raw = fan_in_init(WanDiT(config), seed=12).state_dict()
    ema = fan_in_init(WanDiT(config), seed=13).state_dict()
    checkpoint = {name: {FSDP_PREFIX + k: v for k, v in sd.items()} for name, sd in (("generator", raw),
                                                                                      ("generator_ema", ema))}
    torch.save(checkpoint, root / "causal_forcing.pt")
    image = root / "first.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
    return {"base": base, "pt": root / "causal_forcing.pt", "image": image, "vae": vae, "t5": t5_state, "ema": ema}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    return write_tiny_release(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def pipe(release):
    return resize_pipeline(load_pipeline(base=release["base"], checkpoint=release["pt"]), FRAME_HW)


def test_base_folder_loads_every_part_at_its_own_size(release, pipe):
    """Source (a) with tiny files: the architectures come from the files, the weights are the files' weights."""
    for key, value in release["ema"].items():  # frame-wise: generator_ema by convention
        assert torch.equal(pipe.model.state_dict()[key], value), key
    for key, value in release["vae"].state_dict().items():
        assert torch.equal(pipe.vae.model.state_dict()[key], value), key
    t5 = pipe.text_encoder.encoder.model
    assert (t5.config.d_model, t5.config.num_layers, t5.config.num_heads, t5.config.d_ff) == (4096, 2, 2, 32)
    assert torch.equal(t5.shared.weight, release["t5"]["token_embedding.weight"].float())
    assert pipe.text_encoder.text_len == 16 and (pipe.frame_size, pipe.fps) == (FRAME_HW, FPS)


def test_image_to_video_first_block_is_the_decoded_image_latent(release, pipe):
    with pipe.stream(PROMPT, seed=3, num_frames=9, image=release["image"]) as stream:
        first = next(iter(stream))
    with torch.no_grad():
        latent = pipe.vae.encode_image(load_image(release["image"], *FRAME_HW).unsqueeze(0))
        np.testing.assert_array_equal(first, pixels_to_frames(pipe.vae.decode(latent)))


# ---------------------------------------------------------------------------------------------------------------
# `causal-forcing generate --base`
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def generate(release, capsys):
    """Run `causal-forcing generate --base ... --checkpoint ...` in-process; (rc, stdout, stderr).

    Argument errors exit through argparse (SystemExit), like the installed command."""
    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = cli.main(["generate", "--base", str(release["base"]), "--checkpoint", str(release["pt"]),
                           "--prompt", PROMPT, "--frames", "9", *map(str, args)])
        except SystemExit as exit_:
            rc = exit_.code
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """Decoded RGB frames ``[T, H, W, 3]`` and the stream's frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def diffusers_first_frame(vae: AutoencoderKLWan, image: Path) -> np.ndarray:
    """The I2V first frame by diffusers' own one-shot encode (posterior mean) and decode: uint8 ``[H, W, 3]``."""
    pixels = load_image(image, *FRAME_HW)[None, :, None]  # [1, 3, 1, H, W]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return pixels_to_frames(decoded.permute(0, 2, 1, 3, 4))[0]


def assert_encodes(mp4: np.ndarray, source: np.ndarray) -> None:
    """The MP4 frames are the source frames up to H.264 loss: each decodes closest to its own source frame."""
    errors = np.abs(mp4.astype(int)[:, None] - source.astype(int)[None]).mean(axis=(2, 3, 4))
    assert (errors.argmin(axis=1) == np.arange(len(source))).all() and errors.diagonal().max() < 12


def test_generate_from_the_official_layouts(generate, release, pipe, tmp_path):
    out = tmp_path / "t2v.mp4"
    rc, stdout, stderr = generate("--size", SIZE, "--seed", 3, "--out", out)
    assert rc == 0, stderr
    assert "generator_ema" in stdout and f"9 frames {FRAME_HW[1]}x{FRAME_HW[0]} @ {FPS} fps" in stdout
    frames, fps = read_mp4(out)
    assert frames.shape == (9, *FRAME_HW, 3) and fps == FPS
    assert_encodes(frames, pipe.generate(PROMPT, seed=3, num_frames=9))

    rc, _, _ = generate("--size", SIZE, "--seed", 3, "--out", tmp_path / "again.mp4")
    assert rc == 0
    np.testing.assert_array_equal(read_mp4(tmp_path / "again.mp4")[0], frames)
    rc, _, _ = generate("--size", SIZE, "--seed", 4, "--out", tmp_path / "other.mp4")
    assert rc == 0 and not np.array_equal(read_mp4(tmp_path / "other.mp4")[0], frames)


def test_generate_image_to_video_from_the_official_layouts(generate, release, pipe, tmp_path):
    rc, _, stderr = generate("--size", SIZE, "--seed", 3, "--image", release["image"], "--out", tmp_path / "i2v.mp4")
    assert rc == 0, stderr
    frames, fps = read_mp4(tmp_path / "i2v.mp4")
    assert frames.shape == (9, *FRAME_HW, 3) and fps == FPS
    source = pipe.generate(PROMPT, seed=3, num_frames=9, image=release["image"])
    assert_encodes(frames, source)
    # Frame 0 is the image's latent decoded (diffusers' own encode/decode of the file's VAE weights), up to
    # float rounding of the latent normalisation round trip.
    first = diffusers_first_frame(release["vae"], release["image"]).astype(int)
    assert np.abs(source[0].astype(int) - first).max() <= 1
    assert not np.array_equal(source[0], pipe.generate(PROMPT, seed=3, num_frames=1)[0])


@pytest.mark.parametrize("size, message", [("30x48", "multiple of 16"), ("32by48", "HEIGHTxWIDTH"),
                                           ("0x16", "HEIGHTxWIDTH")])
def test_generate_rejects_a_bad_size(generate, tmp_path, size, message):
    rc, _, stderr = generate("--size", size, "--out", tmp_path / "bad.mp4")
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not list(tmp_path.rglob("*.mp4"))
