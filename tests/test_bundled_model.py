"""The bundled ShapesWorld model: what `generate` uses with no model flag, offline, on a CPU.

The truth the shipped weights are held to is the ShapesBench judge (an independent, rule-based scorer of the
rendered world) on canonical captions the judge parses, compared with the same network untrained.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from causal_forcing.data import shapes
from causal_forcing.eval import shapesbench
from causal_forcing.pipelines.loading import BUNDLED, DEFAULT_MODEL, bundled_folder, load_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "causal_forcing" / "assets"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_default_model_is_bundled_and_small():
    assert DEFAULT_MODEL == "shapes-framewise" and {"shapes-framewise", "shapes-chunkwise"} <= set(BUNDLED)
    folders = {bundled_folder(name) for name in BUNDLED} | {ASSETS / "shapes_vae", ASSETS / "shapes_first_frame",
                                                           ASSETS / "shapes_prefix", ASSETS / "shapes_layout"}
    assert sum(_folder_bytes(f) for f in folders) <= 40 * 2**20


@pytest.fixture(scope="module")
def default_pipe():
    return load_pipeline()  # no model given: the bundled frame-wise model


def test_default_pipeline_shape(default_pipe):
    assert default_pipe.block_size == 1 and default_pipe.frame_size == (64, 64)
    assert len(default_pipe.stream_config.schedule.steps) == 4
    assert default_pipe.default_frames == 81


def test_bundled_layout_model_draws_starts_the_world_could_draw(default_pipe):
    """The bundled layout model, through the pipeline's own clause encoding, places the objects of two-object
    training captions at starts the world could have drawn (shapes.valid_start) far more often than independent
    draws from its pool do."""
    from causal_forcing.models.layout import pooled_text
    from causal_forcing.models.text import split_clauses
    sampler = default_pipe.first_frame
    assert sampler.spec.layout_path is not None and sampler.layout_model is not None
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    counts = {"model": 0, "pool": 0}
    specs = [c for c in (shapes.sample_clip(20_000 + i) for i in range(120)) if len(c.objects) == 2][:40]
    for spec in specs:
        attrs = [o.attrs for o in spec.objects]
        texts = pooled_text(sampler.text_encoder, split_clauses(spec.caption))
        drawn = sampler.layout_model.sample(texts, sampler.spec.layout_candidates, sampler.spec.layout_sharpness,
                                            gen)
        counts["model"] += shapes.valid_start(attrs, drawn.tolist(), rng)
        counts["pool"] += shapes.valid_start(attrs, sampler.layout_model.propose((2,), gen).tolist(), rng)
    assert counts["model"] >= 0.6 * len(specs) and counts["model"] >= counts["pool"] + 0.3 * len(specs), counts


def _semantic(pipe, captions):
    return float(np.mean([shapesbench.score_clip(pipe.generate(c, seed=s), c)["semantic"]
                          for s, c in enumerate(captions)]))


#: Canonical captions of 12 training-distribution clips.
CAPTIONS = [shapes.sample_clip(10_000 + i).caption for i in range(12)]


def _untrained(name=None):
    """The bundled networks (student, first-frame model and, where there is one, the prefix model) with their
    weights re-initialised (the head too, which init_weights zeroes)."""
    pipe = load_pipeline(name)
    torch.manual_seed(0)
    for net in (pipe.model, *pipe.first_frame.models()):
        net.init_weights()
        for p in net.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.02)
    return pipe


def test_default_model_follows_captions(default_pipe):
    """On canonical captions of training-distribution clips the judge's semantic score of the bundled model
    (0.91 measured on these 12 at shipping, 0.29 untrained; 0.87 on the 180 in-distribution prompts of the
    standard set) is well above the same networks with their weights re-initialised."""
    trained = _semantic(default_pipe, CAPTIONS)
    baseline = _semantic(_untrained(), CAPTIONS)
    assert trained >= 0.6 and trained >= baseline + 0.3, (trained, baseline)


def _moving_captions(n):
    """n canonical one-object captions of training-distribution combinations, moving left, right, up, down in turn."""
    rng = np.random.default_rng(1)
    out = []
    while len(out) < n:
        attrs = shapes.ObjectAttrs(str(rng.choice(list(shapes.SIZES))), str(rng.choice(list(shapes.COLORS))),
                                   str(rng.choice(shapes.SHAPES)), ("left", "right", "up", "down")[len(out) % 4])
        if not attrs.held_out:
            out.append(attrs.phrase)
    return out


def test_default_model_moves_objects_the_caption_s_way(default_pipe):
    """The judge's motion (the caption's exact direction over the first 16 frames) on 12 one-object moving
    captions, with the bundled first-frame and prefix models making frames 0-3 and without them (the student
    alone, which places objects by chance and moves them away from the nearer wall): 1.00 against 0.75 measured at
    shipping."""
    captions = _moving_captions(12)

    def motion(pipe):
        return float(np.mean([shapesbench.score_clip(pipe.generate(c, seed=s), c)["motion"]
                              for s, c in enumerate(captions)]))
    with_first = motion(default_pipe)
    first, default_pipe.first_frame = default_pipe.first_frame, None
    try:
        alone = motion(default_pipe)
    finally:
        default_pipe.first_frame = first
    assert with_first >= 0.85 and with_first >= alone + 0.1, (with_first, alone)


@pytest.fixture(scope="module")
def chunkwise_pipe():
    return load_pipeline("shapes-chunkwise")


def test_chunkwise_pipeline_shape(chunkwise_pipe):
    assert chunkwise_pipe.block_size == 3 and chunkwise_pipe.frame_size == (64, 64)
    assert len(chunkwise_pipe.stream_config.schedule.steps) == 4


def test_chunkwise_model_follows_captions(chunkwise_pipe):
    """The bundled chunk-wise model against the same networks re-initialised, on the 12 captions above (0.81
    against 0.25 at shipping)."""
    trained = _semantic(chunkwise_pipe, CAPTIONS)
    baseline = _semantic(_untrained("shapes-chunkwise"), CAPTIONS)
    assert trained >= 0.6 and trained >= baseline + 0.3, (trained, baseline)


@pytest.mark.parametrize("steps", [1, 2])
def test_default_model_at_fewer_steps(steps):
    pipe = load_pipeline(steps=steps)
    assert len(pipe.stream_config.schedule.steps) == steps
    clip = pipe.generate("a large blue square moving left", seed=0, num_frames=17)
    assert clip.shape == (17, 64, 64, 3) and clip.dtype == np.uint8 and clip.std() > 5


def test_generate_with_no_model_flag_offline(tmp_path):
    """A fresh process with the hub switched off: `generate` with nothing but a prompt writes an 81-frame MP4
    that the judge can score."""
    out = tmp_path / "clip.mp4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    caption = "a small red circle moving right"
    run = subprocess.run([sys.executable, "-m", "causal_forcing", "generate", "--prompt", caption, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 81 and frames[0].shape == (64, 64, 3)
    report = shapesbench.score_file(out, caption)
    assert report["frames"] == 81 and 0.0 <= report["total"] <= 1.0
