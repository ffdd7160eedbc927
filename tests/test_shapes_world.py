"""ShapesWorld (`shapes-v1`): determinism, layout rules, captions, held-out split, eval set and file output."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from causal_forcing.data import shapes
from causal_forcing.data import shapes_io
from causal_forcing.errors import InputError

PALETTE = {(0, 0, 0), (220, 40, 40), (40, 190, 70), (40, 90, 230), (235, 215, 40), (160, 70, 220),
           (240, 240, 240)}
SEEDS = range(120)


def _colors_in(video: np.ndarray) -> set[tuple[int, int, int]]:
    packed = np.unique(video.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
    return {(int(v >> 16), int(v >> 8 & 255), int(v & 255)) for v in packed}


def _alone(spec: shapes.ClipSpec, i: int) -> np.ndarray:
    """Pixels of object `i` rendered without the other objects."""
    return shapes.render(dataclasses.replace(spec, objects=(spec.objects[i],)))


def _boxes(mask: np.ndarray) -> np.ndarray:
    """Per-frame pixel bounding box (y0, x0, y1, x1) of a boolean (T, H, W) mask present in every frame."""
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x1 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([y0, x0, y1, x1], axis=1)


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_pixels_and_different_seed_differs():
    a_spec, a = shapes.render_seed(11, 32, 33)
    b_spec, b = shapes.render_seed(11, 32, 33)
    assert a_spec == b_spec and np.array_equal(a, b)
    _, c = shapes.render_seed(12, 32, 33)
    assert not np.array_equal(a, c)


def test_pixels_are_pinned_across_machines():
    # Golden values: any change to the world's pixels needs a version bump (shapes-v1 -> shapes-v2).
    spec, video = shapes.render_seed(7, 32, 33)
    assert spec.caption == "a small white square moving up"
    assert hashlib.sha256(video.tobytes()).hexdigest() == \
        "857752b03937693c0e1727cda2759a7d14540c2f2a12b307031f522a6df8a0cb"
    spec, video = shapes.render_seed(12345, 64, 81)
    assert spec.caption == "a small purple triangle moving down and a small white square moving right"
    assert hashlib.sha256(video.tobytes()).hexdigest() == \
        "c614e03a86845dcfa9085aed19aeec335d93a807305f92c99ff700d9ec74df18"
    assert shapes.dataset_clip_seed(0, 0) == 2366139830456662


@pytest.mark.parametrize("size,frames", [(32, 17), (64, 33), (128, 21)])
def test_clip_shape_dtype_and_black_background(size, frames):
    spec, video = shapes.render_seed(3, size, frames)
    assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
    assert (video == 0).all(axis=-1).mean() > 0.5  # mostly black background
    assert spec.world == "shapes-v1" and spec.size == size and spec.frames == frames


@pytest.mark.parametrize("frames", [80, 16, 13, 0, 82])
def test_frames_must_be_1_plus_4k_and_at_least_17(frames):
    with pytest.raises(InputError):
        shapes.render_seed(0, 32, frames)


@pytest.mark.parametrize("size", [16, 19, 0])
def test_too_small_canvas_rejected(size):
    with pytest.raises(InputError):
        shapes.sample_clip(0, size, 17)


def test_negative_seed_rejected():
    with pytest.raises(InputError):
        shapes.sample_clip(-1, 32, 17)


# --------------------------------------------------------------------------------------------- the world
def test_sizes_and_object_counts():
    assert (shapes.side_pixels("small", 64), shapes.side_pixels("big", 64)) == (13, 20)
    assert (shapes.side_pixels("small", 32), shapes.side_pixels("big", 32)) == (6, 10)
    counts = [len(shapes.sample_clip(s, 32, 33).objects) for s in range(400)]
    assert set(counts) == {1, 2}
    assert 0.4 < counts.count(1) / len(counts) < 0.6


@pytest.mark.parametrize("side", [6, 10, 13, 20, 26, 41])
def test_shape_masks_fill_their_box(side):
    expected_fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for shape, fill in expected_fill.items():
        mask = shapes.shape_mask(shape, side)
        assert mask.shape == (side, side)
        assert mask.any(axis=0).all() and mask.any(axis=1).all()  # the box is exactly side x side
        others = [abs(mask.mean() - f) for s, f in expected_fill.items() if s != shape]
        assert abs(mask.mean() - fill) < min(others)  # the nearest reference fill ratio is its own
    tri = shapes.shape_mask("triangle", side)
    assert tri[0].sum() <= 2 and tri[-1].all()  # apex up, full base
    assert np.array_equal(tri, tri[:, ::-1])    # isosceles


def test_object_colors_are_exactly_the_palette():
    for seed in SEEDS:
        spec, video = shapes.render_seed(seed, 32, 33)
        wanted = {(0, 0, 0)} | {shapes.COLORS[a.color] for a in spec.attrs}
        assert _colors_in(video) == wanted
        assert _colors_in(video) <= PALETTE


def test_two_objects_have_distinct_colors_and_later_is_on_top():
    specs = [shapes.sample_clip(s, 32, 33) for s in SEEDS]
    pairs = [s for s in specs if len(s.objects) == 2]
    assert pairs
    for spec in pairs:
        assert spec.objects[0].attrs.color != spec.objects[1].attrs.color
        video = shapes.render(spec)
        second = (_alone(spec, 1) != 0).any(axis=-1)
        assert (video[second] == shapes.COLORS[spec.objects[1].attrs.color]).all()


def test_objects_stay_whole_on_the_canvas():
    # Bouncing keeps the full shape visible: a lone object's pixel count never changes.
    for seed in SEEDS:
        spec = shapes.sample_clip(seed, 32, 81)
        for i in range(len(spec.objects)):
            area = (_alone(spec, i) != 0).any(axis=-1).sum(axis=(1, 2))
            assert (area == area[0]).all()


def test_no_bounce_in_first_16_frames_but_bounces_later():
    reversals_later = 0
    for seed in range(200):
        spec = shapes.sample_clip(seed, 64, 81)
        for i, obj in enumerate(spec.objects):
            box = _boxes((_alone(spec, i) != 0).any(axis=-1))
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
                      "still": (0, 0)}[obj.attrs.motion]
            for axis, d in ((1, dx), (0, dy)):
                steps = np.diff(box[:, axis])
                early = steps[:shapes.NO_BOUNCE_FRAMES - 1]
                if d == 0:
                    assert (steps == 0).all()
                else:
                    assert (early * d >= 0).all() and (early * d).sum() > 0
                    reversals_later += bool((steps * d < 0).any())
    assert reversals_later > 20  # objects do bounce off the walls after frame 16


def test_two_object_boxes_overlap_in_at_most_10_percent_of_frames():
    n_pairs = 0
    for seed in range(200):
        spec = shapes.sample_clip(seed, 64, 81)
        if len(spec.objects) < 2:
            continue
        n_pairs += 1
        a = _boxes((_alone(spec, 0) != 0).any(axis=-1))
        b = _boxes((_alone(spec, 1) != 0).any(axis=-1))
        overlap = (a[:, 0] < b[:, 2]) & (b[:, 0] < a[:, 2]) & (a[:, 1] < b[:, 3]) & (b[:, 1] < a[:, 3])
        assert overlap.mean() <= 0.10
    assert n_pairs > 50


def test_speeds_in_range_and_clip_for_caption_follows_the_caption():
    for seed in SEEDS:
        for obj in shapes.sample_clip(seed, 32, 33).objects:
            if obj.attrs.motion == "still":
                assert obj.speed == 0.0
            else:
                assert 0.015 <= obj.speed <= 0.03
    caption = "a big purple triangle moving left and a small white circle standing still"
    spec = shapes.clip_for_caption(caption, 5, 32, 33)
    assert spec.caption == caption
    assert spec == shapes.clip_for_caption(caption, 5, 32, 33)


# ----------------------------------------------------------------------------------------------- captions
def test_canonical_caption_format():
    caption = "a small red circle moving right and a big blue square standing still"
    attrs = shapes.parse_caption(caption)
    assert attrs == (shapes.ObjectAttrs("small", "red", "circle", "right"),
                     shapes.ObjectAttrs("big", "blue", "square", "still"))
    assert shapes.canonical_caption(attrs) == caption


def test_every_paraphrase_maps_back_to_its_canonical_caption():
    rng = np.random.default_rng(0)
    singles = [shapes.ObjectAttrs(s, c, sh, m) for s in shapes.SIZES for c in shapes.COLORS
               for sh in shapes.SHAPES for m in shapes.MOTIONS]
    assert len(singles) == 180
    seen_variants = set()
    for attrs in singles:
        canonical = shapes.canonical_caption([attrs])
        for k in range(6):
            text = shapes.paraphrase([attrs], np.random.Generator(np.random.PCG64(k * 1000 + len(seen_variants))))
            seen_variants.add(text)
            assert shapes.canonicalize(text) == canonical
    assert len(seen_variants) > 500  # paraphrases really vary
    for _ in range(200):
        i, j = rng.integers(0, len(singles), 2)
        if singles[i].color == singles[j].color:
            continue
        pair = [singles[i], singles[j]]
        text = shapes.paraphrase(pair, np.random.Generator(np.random.PCG64(int(i * 997 + j))))
        assert shapes.canonicalize(text) == shapes.canonical_caption(pair)


def test_examples_of_paraphrases():
    assert shapes.canonicalize("A tiny red disc sliding to the right.") == "a small red circle moving right"
    assert shapes.canonicalize("one large blue block at rest, and a little green triangle rising") == \
        "a big blue square standing still and a small green triangle moving up"


@pytest.mark.parametrize("bad", ["", "a red circle moving right", "a small red circle moving diagonally",
                                 "a small red circle moving right and a big red square standing still",
                                 "a small red circle moving right and a big blue square standing still and "
                                 "a big green square standing still", "a small orange circle standing still"])
def test_bad_captions_rejected(bad):
    with pytest.raises(InputError):
        shapes.parse_caption(bad)


def test_training_captions_mix_paraphrases_and_keep_pixels():
    specs = [shapes.sample_clip(s, 32, 17) for s in range(200)]
    captions = [shapes.training_caption(s) for s in specs]
    paraphrased = sum(c != s.caption for c, s in zip(captions, specs))
    assert 60 < paraphrased < 140
    assert all(shapes.canonicalize(c) == s.caption for c, s in zip(captions, specs))
    assert all(shapes.training_caption(s, 0.0) == s.caption for s in specs)


# ------------------------------------------------------------------------------------------------ held-out
def test_held_out_combinations():
    assert shapes.caption_is_held_out("a big yellow triangle standing still")
    assert shapes.caption_is_held_out("a small red circle moving left and a small purple square moving up")
    assert not shapes.caption_is_held_out("a small purple square moving down and a big yellow circle moving up")


def test_held_out_never_in_training_data(tmp_path):
    for seed in range(3000):
        spec = shapes.sample_clip(seed, 32, 17)
        for a in spec.attrs:
            assert not (a.color == "yellow" and a.shape == "triangle")
            assert not (a.color == "purple" and a.motion == "up")
    manifest = shapes_io.write_training_set(tmp_path, num=60, seed=3, size=32, frames=17)
    for rec in shapes_io.read_manifest(manifest):
        assert not rec["held_out"]
        assert not shapes.caption_is_held_out(rec["caption"])
        assert not shapes.caption_is_held_out(rec["train_caption"])


# ---------------------------------------------------------------------------------------------- eval set
def test_standard_eval_set():
    prompts = shapes.standard_eval_prompts()
    assert len(prompts) == 200
    assert sum(p.held_out for p in prompts) == 20
    assert len({p.caption for p in prompts}) == 200
    assert len({p.seed for p in prompts}) == 200
    for p in prompts:
        assert shapes.canonicalize(p.caption) == p.caption
        assert shapes.caption_is_held_out(p.caption) == p.held_out
    digest = hashlib.sha256("\n".join(f"{p.caption}|{p.seed}|{p.held_out}" for p in prompts).encode()).hexdigest()
    assert digest == "fd5bf5b03b6c2858ace15fcd214687fe2d00f504adc21bcdccb588b2cb5cf536"


# ------------------------------------------------------------------------------------------------- output
def test_training_set_files_manifest_and_workers(tmp_path):
    one = shapes_io.write_training_set(tmp_path / "one", num=12, seed=5, size=32, frames=17, workers=1)
    two = shapes_io.write_training_set(tmp_path / "two", num=12, seed=5, size=32, frames=17, workers=2)
    recs_one, recs_two = shapes_io.read_manifest(one), shapes_io.read_manifest(two)
    assert recs_one == recs_two and len(recs_one) == 12
    for i, rec in enumerate(recs_one):
        assert rec["file"] == f"clip_{i:06d}.npz"
        assert {"caption", "train_caption", "objects", "world", "seed", "size", "frames"} <= set(rec)
        assert rec["world"] == "shapes-v1" and (rec["size"], rec["frames"]) == (32, 17)
        a = shapes_io.load_clip(tmp_path / "one" / rec["file"])
        b = shapes_io.load_clip(tmp_path / "two" / rec["file"])
        spec = shapes.ClipSpec(objects=tuple(shapes.ObjectParams.from_dict(o) for o in rec["objects"]),
                               size=rec["size"], frames=rec["frames"], seed=rec["seed"])
        assert np.array_equal(a, b) and np.array_equal(a, shapes.render(spec))  # params reproduce the pixels
        assert np.array_equal(a, shapes.render_seed(rec["seed"], 32, 17)[1])   # the seed alone does too
        assert spec.caption == rec["caption"]
    leftovers = [p for p in os.listdir(tmp_path / "one") if p.startswith(".")]
    assert leftovers == []
    assert oct(os.stat(tmp_path / "one" / "clip_000000.npz").st_mode & 0o777) != "0o600"


def test_eval_set_output(tmp_path):
    manifest = shapes_io.write_eval_set(tmp_path, size=32, frames=17, workers=2)
    recs = shapes_io.read_manifest(manifest)
    prompts = shapes.standard_eval_prompts()
    assert [r["caption"] for r in recs] == [p.caption for p in prompts]
    assert [r["seed"] for r in recs] == [p.seed for p in prompts]
    assert sum(r["held_out"] for r in recs) == 20
    assert len(list(Path(tmp_path).glob("eval_*.npz"))) == 200


def test_atomic_open_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with shapes_io.atomic_open(target, "w") as f:
        json.dump({"v": 1}, f)
    with pytest.raises(RuntimeError):
        with shapes_io.atomic_open(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_bad_generation_arguments(tmp_path):
    with pytest.raises(InputError):
        shapes_io.write_training_set(tmp_path, num=0, seed=0, size=32, frames=17)
    with pytest.raises(InputError):
        shapes_io.write_training_set(tmp_path, num=2, seed=0, size=32, frames=17, workers=0)
    with pytest.raises(InputError):
        shapes_io.write_training_set(tmp_path, num=2, seed=0, size=32, frames=17, paraphrase_prob=1.5)
