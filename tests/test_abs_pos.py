"""The optional embeddings Wan does not have: absolute 2-D position (``ModelConfig.abs_pos_freqs``) and latent frame
index (``ModelConfig.abs_time_frames``)."""
import math

import pytest
import torch

from causal_forcing.checkpoints import (load_dit_weights, load_into, model_config_to_diffusers, save_model_folder,
                                        save_released_pt)
from causal_forcing.cli.info import infer_architecture
from causal_forcing.config import ModelConfig, model_preset
from causal_forcing.errors import CheckpointError, ConfigError
from causal_forcing.models.attention import BlockCausal, TeacherForcing
from causal_forcing.models.wan import WanDiT, grid_position_features


def _model(freqs: int, seed: int = 0, frames: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(model_preset("tiny").replace(abs_pos_freqs=freqs, abs_time_frames=frames))
    model.init_weights()
    with torch.no_grad():                 # a non-zero head, so outputs depend on everything before it
        for p in model.head.parameters():
            p.normal_(std=0.1)
        if model.pos_embedding is not None:
            model.pos_embedding.weight.normal_()
        if model.frame_embedding is not None:
            model.frame_embedding.weight.normal_()
    return model.eval()


def _inputs(frames: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, frames, 16, 8, 8, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 8, 32, generator=g))


def test_features_closed_form_and_resolution_independent():
    f = grid_position_features((2, 3), 1)
    assert f.shape == (6, 4)
    # token (row 1, column 0): u = 0.75, v = 1/6
    expected = [math.sin(0.75 * math.pi), math.cos(0.75 * math.pi), math.sin(math.pi / 6), math.cos(math.pi / 6)]
    assert torch.allclose(f[3], torch.tensor(expected), atol=1e-6)
    # the centre token of a 3x3 grid and the only token of a 1x1 grid sit at the same canvas point
    assert torch.allclose(grid_position_features((3, 3), 4)[4], grid_position_features((1, 1), 4)[0])


def test_off_by_default_is_wan():
    model = WanDiT(model_preset("tiny"))
    assert model.pos_embedding is None and model.frame_embedding is None
    assert not any(k.startswith(("pos_embedding", "frame_embedding")) for k in model.state_dict())
    assert model_preset("tiny").beyond_wan == ()
    assert ModelConfig.from_dict({k: v for k, v in model_preset("tiny").to_dict().items()
                                  if k != "abs_pos_freqs"}).abs_pos_freqs == 0
    with pytest.raises(ConfigError, match="abs_pos_freqs"):
        model_preset("tiny").replace(abs_pos_freqs=-1)
    with pytest.raises(ConfigError, match="abs_time_frames"):
        model_preset("tiny").replace(abs_time_frames=-2)


@pytest.mark.parametrize("added", [{"abs_pos_freqs": 4}, {"abs_time_frames": 3}])
def test_zero_initialised_embedding_leaves_trained_weights_unchanged(added):
    plain = _model(0)
    with_pos = WanDiT(model_preset("tiny").replace(**added))
    state = plain.state_dict()
    load_into(with_pos, with_pos.added_state(state))
    x, t, c = _inputs()
    assert torch.equal(with_pos.eval()(x, t, c), plain(x, t, c))
    # once trained (non-zero), the same tokens at different canvas positions / frames are treated differently
    with torch.no_grad():
        (with_pos.pos_embedding or with_pos.frame_embedding).weight.normal_()
    assert not torch.allclose(with_pos(x, t, c), plain(x, t, c), atol=1e-3)


def test_translation_changes_output_only_through_the_embedding():
    """Without the embedding, a constant input gives the same output at every token of a frame away from the
    (RoPE-invisible) content: with identical tokens, attention is position-free. With it, outputs vary by position."""
    x = torch.ones(1, 1, 16, 8, 8)
    t, c = torch.tensor([500.0]), torch.randn(1, 8, 32)
    for freqs, uniform in ((0, True), (3, False)):
        out = _model(freqs)(x, t, c)[0, 0]               # [C, H, W]
        tokens = out.unfold(1, 2, 2).unfold(2, 2, 2)     # [C, 4, 4, 2, 2]: one entry per token
        spread = (tokens - tokens[:, :1, :1]).abs().max().item()
        assert (spread < 1e-5) == uniform, (freqs, spread)


@pytest.mark.parametrize("freqs,frames", [(3, 0), (0, 2), (3, 2)])
def test_streaming_and_teacher_forcing_match_full_forward(freqs, frames):
    """The frame index reaches a streamed block through start_frame and the clean copy of teacher forcing through
    its own frames: both paths must agree with the one-shot block-causal forward."""
    model = _model(freqs, frames=frames)
    x, t, c = _inputs()
    with torch.no_grad():
        full = model(x, t, c, layout=BlockCausal(1))
        cache = model.new_cache(batch_size=2, latent_hw=(8, 8), capacity_frames=3)
        streamed = torch.cat([model(x[:, i:i + 1], t, c, cache=cache, start_frame=i) for i in range(3)], dim=1)
        assert torch.allclose(streamed, full, atol=1e-5)
        # teacher forcing with clean = noisy input and equal timesteps is block-causal attention over x
        tf = model(x, t, c, layout=TeacherForcing(1), clean_x=x, clean_t=t)
        # frame 0 has no clean history in either; it must agree exactly with the block-causal forward
        assert torch.allclose(tf[:, 0], full[:, 0], atol=1e-5)


def test_frame_index_is_clamped_to_the_last_entry():
    """Closed form: frame k gets entry min(k, abs_time_frames - 1), so every frame from the last entry on is
    modulated alike (streams of any length), and frame 0 differently."""
    model = _model(0, frames=2)
    t = torch.full((1, 3), 400.0)
    e_late, _ = model._time(t, torch.float32, first_frame=7)
    e_later, _ = model._time(t, torch.float32, first_frame=70)
    e_first, _ = model._time(t, torch.float32, first_frame=0)
    assert torch.equal(e_late, e_later)
    assert torch.equal(e_first[:, 1], e_late[:, 0]) and not torch.allclose(e_first[:, 0], e_first[:, 1])
    plain = e_first[:, 0] - model.frame_embedding.weight[0]
    assert torch.allclose(plain, e_first[:, 1] - model.frame_embedding.weight[1], atol=1e-6)


def test_frame_embedding_round_trip_and_exports_refuse(tmp_path):
    model = _model(0, frames=5)
    save_model_folder(model, model.config, tmp_path / "m")
    state, config = load_dit_weights(tmp_path / "m")
    assert config.abs_time_frames == 5 and config.beyond_wan == ("abs_time_frames",)
    assert torch.equal(state["frame_embedding.weight"], model.frame_embedding.weight)
    assert infer_architecture({k: tuple(v.shape) for k, v in state.items()})["abs_time_frames"] == 5
    with pytest.raises(CheckpointError, match="abs_time_frames"):
        model_config_to_diffusers(config)
    with pytest.raises(CheckpointError, match="frame_embedding"):
        save_released_pt(tmp_path / "x.pt", generator=state)
    assert not (tmp_path / "x.pt").exists()


def test_save_load_roundtrip_and_exports_refuse(tmp_path):
    model = _model(2)
    save_model_folder(model, model.config, tmp_path / "m")
    state, config = load_dit_weights(tmp_path / "m")
    assert config.abs_pos_freqs == 2
    assert torch.equal(state["pos_embedding.weight"], model.pos_embedding.weight)
    assert infer_architecture({k: tuple(v.shape) for k, v in state.items()})["abs_pos_freqs"] == 2
    with pytest.raises(CheckpointError, match="abs_pos_freqs"):
        model_config_to_diffusers(config)
    with pytest.raises(CheckpointError, match="pos_embedding"):
        save_released_pt(tmp_path / "x.pt", generator=state)
    assert not (tmp_path / "x.pt").exists()
