"""Reference parity: reproduce every tensor produced by the reference implementation (tests/data/parity,
see its PROVENANCE.md) through the public API, to max abs diff <= 1e-4 in float32."""
import json

import pytest
import torch
from safetensors.torch import load_file

from causal_forcing.config import ModelConfig
from causal_forcing.models.attention import TeacherForcing
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines.streaming import ReplayNoise, StreamConfig, sample_causal
from causal_forcing.schedulers.flow import (FewStepSchedule, flow_grid, flow_to_x0, sigma_from_t, training_grid,
                                            training_loss_weights, warp_timesteps)

from conftest import PARITY_DIR

TOL = 1e-4
pytestmark = pytest.mark.skipif(not (PARITY_DIR / "config.json").exists(), reason="no parity data")


def _load(name):
    return load_file(str(PARITY_DIR / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def parity_config():
    raw = json.loads((PARITY_DIR / "config.json").read_text())
    extra = {k: raw.pop(k) for k in ("latent_frames", "latent_hw", "tokens_per_frame") if k in raw}
    return ModelConfig.from_dict(raw), extra


def _model(cfg, state):
    m = WanDiT(cfg)
    m.load_state_dict(state, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def model(parity_config):
    return _model(parity_config[0], _load("weights"))


def _ema_state():
    from causal_forcing.checkpoints import load_dit_weights
    sd, _ = load_dit_weights(PARITY_DIR / "checkpoint_like.pt", ema=True)
    return sd


def test_scheduler_grids_match_reference():
    ref = _load("scheduler")
    t, s = training_grid(5.0)
    assert torch.equal(t, ref["train_timesteps"]) and torch.equal(s, ref["train_sigmas"])
    assert torch.allclose(training_loss_weights(5.0), ref["train_loss_weights"], atol=1e-6, rtol=1e-5)
    for n, lst in ((4, [1000, 750, 500, 250]), (2, [1000, 500]), (1, [1000])):
        assert torch.equal(warp_timesteps(lst), ref[f"warped_{n}step"])
    t48, s48 = flow_grid(48, 5.0)
    assert torch.equal(t48, ref["ode48_timesteps"]) and torch.equal(s48, ref["ode48_sigmas"])


@pytest.mark.parametrize("ema", [False, True])
def test_bidirectional_forward(parity_config, model, ema):
    ref = _load("bidirectional")
    m = _model(parity_config[0], _ema_state()) if ema else model
    sfx = "_ema" if ema else ""
    with torch.no_grad():
        out = m(ref["x"], ref["t"], ref["context"])
    assert (out - ref["output" + sfx]).abs().max() <= TOL
    t = ref["t"][:, None].expand(out.shape[:2])
    x0 = flow_to_x0(ref["x"], out, sigma_from_t(t, "grid"))
    assert (x0 - ref["x0_pred" + sfx]).abs().max() <= TOL


@pytest.mark.parametrize("prefix,block", [("nfpb1_", 1), ("nfpb3_", 3)])
def test_teacher_forcing_forward(model, prefix, block):
    ref = _load("causal_tf")
    with torch.no_grad():
        out = model(ref[prefix + "x"], ref[prefix + "t"], ref["context"], layout=TeacherForcing(block),
                    clean_x=ref[prefix + "clean_x"])
    assert (out - ref[prefix + "output"]).abs().max() <= TOL
    x0 = flow_to_x0(ref[prefix + "x"], out, sigma_from_t(ref[prefix + "t"], "grid"))
    assert (x0 - ref[prefix + "x0_pred"]).abs().max() <= TOL


@pytest.mark.parametrize("prefix,block", [("nfpb1_", 1), ("nfpb3_", 3), ("i2v_", 1)])
def test_kv_cache_streaming_trajectory(parity_config, model, prefix, block):
    """Replays the reference's exact call sequence (noise included) and compares every call and the output."""
    ref = _load("causal_kv")
    schedule = FewStepSchedule.from_config([1000, 750, 500, 250])
    assert torch.equal(torch.tensor(schedule.steps), ref["denoising_step_list"])
    calls = []
    image = ref.get("i2v_initial_latent") if prefix == "i2v_" else None
    noise = ReplayNoise(ref[prefix + "noise_init"], list(ref[prefix + "fresh_noise"]))
    num_frames = ref[prefix + "output"].shape[1]
    out = sample_causal(model, ref["context"], latent_hw=tuple(ref[prefix + "output"].shape[-2:]),
                        num_frames=num_frames, config=StreamConfig(block_size=block, schedule=schedule,
                                                                   commit_last=True),
                        noise=noise, initial_latent=image, trace=calls.append)
    assert (out - ref[prefix + "output"]).abs().max() <= TOL
    assert len(calls) == ref[prefix + "call_x"].shape[0]
    tpf = parity_config[1].get("tokens_per_frame") or model.tokens_per_frame(tuple(out.shape[-2:]))
    assert [c["start_frame"] * tpf for c in calls] == ref[prefix + "call_current_start"].tolist()
    assert [c["step"] for c in calls] == ref[prefix + "call_step"].tolist()
    assert [c["block"] for c in calls] == ref[prefix + "call_block"].tolist()
    for name, key in (("x", "call_x"), ("t", "call_t"), ("flow", "call_output")):
        got = torch.stack([c[name].float() for c in calls])
        assert (got - ref[prefix + key]).abs().max() <= TOL, name
    for c, want in zip(calls, ref[prefix + "call_x0_pred"]):
        if c["x0"] is not None:
            assert (c["x0"] - want).abs().max() <= TOL
