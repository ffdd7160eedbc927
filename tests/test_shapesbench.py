"""ShapesBench (`shapesbench-v1`): the judge against clips with a known answer, file handling and the CLIs."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from causal_forcing.cli import main
from causal_forcing.data import shapes, shapes_io
from causal_forcing.errors import InputError
from causal_forcing.eval import shapesbench as sb

SEMANTIC = ("color", "shape", "size", "motion")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
N_CLIPS = 40


@pytest.fixture(scope="module")
def gt_specs() -> list[shapes.ClipSpec]:
    """Ground truth for the first 40 standard prompts plus all 20 held-out ones, at 32 px / 33 frames."""
    prompts = shapes.standard_eval_prompts()
    chosen = list(prompts[:N_CLIPS]) + [p for p in prompts[N_CLIPS:] if p.held_out]
    return [shapes.clip_for_caption(p.caption, p.seed, 32, 33) for p in chosen]


def _with_object(spec: shapes.ClipSpec, i: int, obj: shapes.ObjectParams) -> shapes.ClipSpec:
    objects = list(spec.objects)
    objects[i] = obj
    return dataclasses.replace(spec, objects=tuple(objects))


# --------------------------------------------------------------------------------------- known answers
def test_ground_truth_scores_at_least_098_on_every_semantic_metric(gt_specs):
    results = [sb.score_clip(shapes.render(s), s.caption) for s in gt_specs]
    rep = sb.report(results)
    n_held_in_first = sum(s.held_out for s in gt_specs[:N_CLIPS])
    assert rep["held_out"]["n"] == 20 and rep["in_distribution"]["n"] == N_CLIPS - n_held_in_first
    for split in ("in_distribution", "held_out"):
        for key in SEMANTIC + ("all_correct",):
            assert rep[split][key] >= 0.98, (split, key)
        assert rep[split]["quality"] >= 0.98
        assert 0.8 < rep[split]["speed_ratio"] < 1.2
        assert rep[split]["motion_axis"] >= 0.98
    # Totals follow the contract's formulas.
    t = rep["all"]
    assert t["semantic"] == pytest.approx(np.mean([t[k] for k in SEMANTIC]))
    assert t["quality"] == pytest.approx(np.mean([t["cleanliness"], t["consistency"], t["smoothness"]]))
    assert t["total"] == pytest.approx((4 * t["quality"] + t["semantic"]) / 5)


def test_ground_truth_at_64px_81_frames():
    prompts = shapes.standard_eval_prompts()[100:112]
    results = [sb.score_clip(shapes.render(shapes.clip_for_caption(p.caption, p.seed)), p.caption) for p in prompts]
    assert all(r["all_correct"] == 1.0 for r in results)


def test_black_and_noise_score_near_zero(gt_specs):
    rng = np.random.default_rng(0)
    black = np.zeros((33, 32, 32, 3), np.uint8)
    noise = rng.integers(0, 256, (33, 32, 32, 3), dtype=np.uint8)
    for video in (black, noise):
        rep = sb.summarize(sb.score_clip(video, s.caption) for s in gt_specs[:20])
        for key in SEMANTIC + ("all_correct", "consistency", "smoothness"):
            assert rep[key] <= 0.02, key
        assert rep["speed_ratio"] <= 0.02
    noise_rep = sb.summarize(sb.score_clip(noise, s.caption) for s in gt_specs[:20])
    assert noise_rep["cleanliness"] == 0.0 and noise_rep["total"] <= 0.02
    black_rep = sb.summarize(sb.score_clip(black, s.caption) for s in gt_specs[:20])
    assert black_rep["cleanliness"] == 1.0 and black_rep["total"] <= 0.27  # clean, but nothing is there


def test_swapping_one_color_loses_exactly_color(gt_specs):
    for spec in gt_specs[:20]:
        used = {a.color for a in spec.attrs}
        new_color = next(c for c in shapes.COLORS if c not in used)
        obj = spec.objects[0]
        swapped = _with_object(spec, 0, dataclasses.replace(obj, attrs=dataclasses.replace(obj.attrs,
                                                                                           color=new_color)))
        before = sb.score_clip(shapes.render(spec), spec.caption)
        after = sb.score_clip(shapes.render(swapped), spec.caption)
        assert after["color"] == pytest.approx(before["color"] - 1 / len(spec.objects))
        for key in ("shape", "size", "motion"):
            assert after[key] == before[key], (spec.caption, key)
        assert before["all_correct"] == 1.0 and after["all_correct"] == 0.0


def test_reversing_one_motion_loses_exactly_motion(gt_specs):
    checked = 0
    for spec in gt_specs:
        movers = [i for i, a in enumerate(spec.attrs) if a.motion != "still"]
        if not movers:
            continue
        i = movers[0]
        obj = spec.objects[i]
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[obj.attrs.motion]
        travel = obj.speed * (shapes.NO_BOUNCE_FRAMES - 1)  # start where the original is at frame 15
        reversed_obj = dataclasses.replace(
            obj, attrs=dataclasses.replace(obj.attrs, motion=OPPOSITE[obj.attrs.motion]),
            x0=obj.x0 + dx * travel, y0=obj.y0 + dy * travel)
        before = sb.score_clip(shapes.render(spec), spec.caption)
        after = sb.score_clip(shapes.render(_with_object(spec, i, reversed_obj)), spec.caption)
        assert after["objects"][i]["motion"] == 0.0 and before["objects"][i]["motion"] == 1.0
        assert after["motion"] == pytest.approx(before["motion"] - 1 / len(spec.objects))
        # the unscored axis diagnostic cannot see a reversed direction: still on the caption's axis
        assert after["objects"][i]["motion_axis"] == before["objects"][i]["motion_axis"] == 1.0
        assert after["motion_axis"] == before["motion_axis"] == 1.0
        for key in ("color", "shape", "size"):
            assert after[key] == before[key], (spec.caption, key)
        assert after["all_correct"] == 0.0
        checked += 1
    assert checked >= 20


def test_frozen_video_fails_motion_for_moving_captions(gt_specs):
    for spec in gt_specs[:N_CLIPS]:
        video = shapes.render(spec)
        frozen = np.repeat(video[:1], video.shape[0], axis=0)
        result = sb.score_clip(frozen, spec.caption)
        for attrs, obj in zip(spec.attrs, result["objects"]):
            if attrs.motion != "still":
                assert obj["motion"] == 0.0
            elif obj["matched_color"] is not None:
                assert obj["motion"] == 1.0
        if any(a.motion != "still" for a in spec.attrs):
            assert result["all_correct"] == 0.0 and result["speed_ratio"] == 0.0
            assert result["motion_axis"] == 0.0               # still is on no moving axis
        else:
            assert result["motion_axis"] is None and result["speed_ratio"] is None


def test_hand_drawn_clip_is_read_correctly():
    # Independent of the renderer: a 13-px square sliding right 1 px/frame, a 20-px disc standing still.
    t_count, size = 33, 64
    video = np.zeros((t_count, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:20, 0:20] + 0.5
    disc = (yy - 10) ** 2 + (xx - 10) ** 2 <= 100
    for t in range(t_count):
        video[t, 5:18, 3 + t:16 + t] = (220, 40, 40)
        video[t, 40:60, 40:60][disc] = (40, 90, 230)
    result = sb.score_clip(video, "a small red square moving right and a big blue circle standing still")
    assert result["all_correct"] == 1.0
    red = result["objects"][0]["measured"]
    assert red["velocity"][0] == pytest.approx(1 / 64) and red["side"] == pytest.approx(13 / 64)
    assert result["speed_ratio"] == pytest.approx((1 / 64) / 0.0225)
    assert result["smoothness"] == 1.0 and result["consistency"] == 1.0
    wrong = sb.score_clip(video, "a big red triangle moving left and a small blue square standing still")
    assert (wrong["shape"], wrong["size"], wrong["motion"], wrong["color"]) == (0.0, 0.0, 0.5, 1.0)


def test_jitter_and_artifacts_lower_quality_only(gt_specs):
    spec = next(s for s in gt_specs if len(s.objects) == 1 and s.attrs[0].motion != "still")
    video = shapes.render(spec)
    rng = np.random.default_rng(1)
    jittered = np.stack([np.roll(f, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) for f in video])
    assert sb.score_clip(jittered, spec.caption)["smoothness"] < 0.9
    speckled = video.copy()
    hit = rng.random(video.shape[:3]) < 0.02
    speckled[hit] = (128, 128, 128)  # 2% gray pixels: farther than 60 from every palette color and black
    result = sb.score_clip(speckled, spec.caption)
    assert result["cleanliness"] == pytest.approx(1 - hit.mean() / 0.05)
    assert result["semantic"] == 1.0


def test_classification_matches_brute_force():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    frames[0] = rng.integers(0, 70, (24, 24, 3))
    cls, artifact_fraction = sb.classify(frames)
    palette = np.array([(0, 0, 0)] + [shapes.COLORS[c] for c in shapes.COLORS])
    d = np.sqrt(((frames.reshape(-1, 1, 3).astype(float) - palette[None]) ** 2).sum(-1))
    expected = np.where(d.min(axis=1) > 60, -1, d.argmin(axis=1))
    assert np.array_equal(cls.ravel(), expected)
    assert artifact_fraction == pytest.approx((expected == -1).mean())


def test_paraphrased_caption_scores_like_canonical(gt_specs):
    spec = gt_specs[1]
    video = shapes.render(spec)
    para = shapes.paraphrase(spec.attrs, np.random.Generator(np.random.PCG64(3)))
    assert sb.score_clip(video, para)["total"] == sb.score_clip(video, spec.caption)["total"]


@pytest.mark.parametrize("bad", [np.zeros((16, 32, 32, 3), np.uint8), np.zeros((17, 32, 40, 3), np.uint8),
                                 np.zeros((17, 32, 32, 3), np.float32), np.zeros((17, 32, 32), np.uint8)])
def test_bad_frames_rejected(bad):
    with pytest.raises(InputError):
        sb.score_clip(bad, "a small red circle standing still")


# ------------------------------------------------------------------------------------------------ files
def _write_manifest(path: Path, entries: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in entries))


def test_corrupt_truncated_and_missing_files_are_reported_per_clip(tmp_path, gt_specs):
    specs = gt_specs[:3]
    good = shapes.render(specs[0])
    shapes_io.save_clip(tmp_path / "good.npz", good)
    shapes_io.save_clip(tmp_path / "full.npz", shapes.render(specs[1]))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    shapes_io.save_mp4(tmp_path / "whole.mp4", shapes.render(specs[2]), pix_fmt="yuv444p")
    mp4 = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 3])
    shapes_io.save_clip(tmp_path / "short.npz", good[:9])
    np.save(tmp_path / "floats.npy", good.astype(np.float32))
    _write_manifest(tmp_path / "m.jsonl", [
        ("good.npz", specs[0].caption), ("truncated.npz", specs[1].caption), ("garbage.mp4", specs[2].caption),
        ("cut.mp4", specs[2].caption), ("short.npz", specs[0].caption), ("floats.npy", specs[0].caption),
        ("missing.npz", specs[0].caption), ("whole.mp4", "a small red hexagon standing still"),
    ])
    rep = sb.score_videos(tmp_path, tmp_path / "m.jsonl")
    assert [c["file"] for c in rep["clips"]] == ["good.npz"]
    assert rep["clips"][0]["all_correct"] == 1.0
    errors = {e["file"]: e["error"] for e in rep["errors"]}
    assert set(errors) == {"truncated.npz", "garbage.mp4", "cut.mp4", "short.npz", "floats.npy", "missing.npz",
                           "whole.mp4"}
    assert rep["n_errors"] == 7
    assert "not found" in errors["missing.npz"] and "hexagon" in errors["whole.mp4"]
    assert "full.npz" in rep["unmatched_files"]


def test_mp4_videos_match_manifest_by_stem(tmp_path, gt_specs):
    specs = gt_specs[:6]
    entries = []
    for i, spec in enumerate(specs):
        pix_fmt = "rgb24" if i % 2 else "yuv444p"
        shapes_io.save_mp4(tmp_path / f"eval_{i:03d}.mp4", shapes.render(spec), pix_fmt=pix_fmt,
                           crf=0 if pix_fmt == "rgb24" else 18)
        entries.append((f"eval_{i:03d}.npz", spec.caption))  # the manifest of the .npz ground truth
    _write_manifest(tmp_path / shapes_io.MANIFEST_NAME, entries)
    rep = sb.score_videos(tmp_path)
    assert rep["n_errors"] == 0 and rep["all"]["n"] == 6
    for key in SEMANTIC:
        assert rep["all"][key] >= 0.98
    lossless = shapes_io.load_clip(tmp_path / "eval_001.mp4")
    assert np.array_equal(lossless, shapes.render(specs[1]))


def test_missing_manifest_is_a_clear_error(tmp_path):
    shapes_io.save_clip(tmp_path / "a.npz", np.zeros((17, 32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="manifest"):
        sb.score_videos(tmp_path)
    with pytest.raises(InputError, match="not found"):
        sb.score_videos(tmp_path / "nope")
    (tmp_path / "bad.jsonl").write_text('{"file": "a.npz"}\n')
    with pytest.raises(InputError, match="caption"):
        sb.score_videos(tmp_path, tmp_path / "bad.jsonl")


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_generate_and_evaluate(tmp_path, capsys):
    train = tmp_path / "train"
    assert main(["data", "shapes", "--out", str(train), "--num", "6", "--size", "32", "--frames", "17",
                 "--seed", "4", "--workers", "2"]) == 0
    assert len(shapes_io.read_manifest(train / shapes_io.MANIFEST_NAME)) == 6
    evalset = tmp_path / "eval"
    assert main(["data", "shapes", "--out", str(evalset), "--eval-set", "--size", "32", "--frames", "17"]) == 0
    capsys.readouterr()
    report_path = tmp_path / "report.json"
    assert main(["eval", "shapes", "--videos", str(evalset), "--json", str(report_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["judge"] == "shapesbench-v1" and summary["n_errors"] == 0
    assert summary["in_distribution"]["n"] == 180 and summary["held_out"]["n"] == 20
    for split in ("in_distribution", "held_out"):
        for key in ("semantic", "quality", "total", "all_correct") + SEMANTIC + ("speed_ratio",):
            assert key in summary[split]
        assert summary[split]["semantic"] >= 0.98
    assert any(line.startswith("held-out") for line in out)
    full = json.loads(report_path.read_text())
    assert len(full["clips"]) == 200 and math.isclose(full["all"]["total"], summary["in_distribution"]["total"],
                                                      rel_tol=0.05)


@pytest.mark.parametrize("argv", [
    ["data", "shapes", "--out", "{tmp}/x", "--num", "3", "--frames", "80"],
    ["data", "shapes", "--out", "{tmp}/x", "--num", "3", "--size", "16", "--frames", "17"],
    ["data", "shapes", "--out", "{tmp}/x", "--frames", "17"],
    ["data", "shapes", "--out", "{tmp}/x", "--eval-set", "--num", "5"],
    ["data", "shapes", "--out", "{tmp}/x", "--num", "2", "--frames", "17", "--seed", "-3"],
    ["eval", "shapes", "--videos", "{tmp}/missing"],
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("causal-forcing ") and "error:" in err and len(err.splitlines()) == 1


def test_cli_eval_model_scores_a_checkpoint(tmp_path, capsys, monkeypatch):
    """`eval model` generates the manifest's prompts with a DiT folder and reports what the judge says of them."""
    from causal_forcing.checkpoints import save_model_folder
    from causal_forcing.config import model_preset
    from causal_forcing.models.small_vae import SmallVAE, SmallVAEConfig
    from causal_forcing.models.wan import WanDiT

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = model_preset("shapes").replace(dim=32, ffn_dim=64, num_heads=2, num_layers=1)
    save_model_folder(WanDiT(config), config, tmp_path / "dit")
    SmallVAE(SmallVAEConfig(encoder_channels=(4, 4, 4, 8), decoder_channels=(8, 4, 4, 4))).save_folder(tmp_path / "vae")
    manifest = tmp_path / "manifest.jsonl"
    captions = ["a small red circle moving right", "a big blue square standing still",
                "a small green triangle moving up"]
    manifest.write_text("".join(json.dumps({"file": f"eval_{i:03d}.npz", "caption": c}) + "\n"
                                for i, c in enumerate(captions)))
    for kind, extra in (("causal", ["--steps", "2"]), ("bidirectional", ["--teacher-steps", "2"]),
                        ("autoregressive", ["--teacher-steps", "2", "--block-size", "3"])):
        out = tmp_path / kind
        capsys.readouterr()
        assert main(["eval", "model", "--weights", str(tmp_path / "dit"), "--kind", kind, "--manifest",
                     str(manifest), "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out), *extra]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        saved = json.loads((out / "scores.json").read_text())
        assert summary["kind"] == kind and summary["in_distribution"] == saved["in_distribution"]
        assert saved["all"]["n"] == 2 and sorted(os.listdir(out)) == ["eval_000.mp4", "eval_001.mp4", "scores.json"]
        assert 0.0 <= summary["in_distribution"]["total"] <= 1.0
    # A first-frame model (any DiT folder of the same latent/text sizes) makes frame 0: the clips change.
    save_model_folder(WanDiT(config.replace(abs_pos_freqs=2)), config.replace(abs_pos_freqs=2), tmp_path / "ff")
    out = tmp_path / "causal_ff"
    assert main(["eval", "model", "--weights", str(tmp_path / "dit"), "--kind", "causal", "--manifest",
                 str(manifest), "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out), "--steps", "2",
                 "--first-frame", str(tmp_path / "ff"), "--teacher-steps", "2"]) == 0
    assert (out / "eval_000.mp4").read_bytes() != (tmp_path / "causal" / "eval_000.mp4").read_bytes()
    # ... and with --first-frame-frames 2 frames 0-1 (its frame 0 is the same: the sampler is causal).
    out2 = tmp_path / "causal_ff2"
    assert main(["eval", "model", "--weights", str(tmp_path / "dit"), "--kind", "causal", "--manifest",
                 str(manifest), "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out2), "--steps", "2",
                 "--first-frame", str(tmp_path / "ff"), "--teacher-steps", "2", "--first-frame-frames", "2"]) == 0
    assert (out2 / "eval_000.mp4").read_bytes() != (out / "eval_000.mp4").read_bytes()
    # ... and with a prefix model (reading its own clause-wise text) for frame 1 and the student refining it.
    save_model_folder(WanDiT(config.replace(abs_pos_freqs=2)), config.replace(abs_pos_freqs=2), tmp_path / "pm")
    out3 = tmp_path / "causal_ff3"
    assert main(["eval", "model", "--weights", str(tmp_path / "dit"), "--kind", "causal", "--manifest",
                 str(manifest), "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out3), "--steps", "2",
                 "--first-frame", str(tmp_path / "ff"), "--teacher-steps", "2", "--first-frame-frames", "2",
                 "--first-frame-prefix", str(tmp_path / "pm"), "--first-frame-prefix-text", "minilm-clauses",
                 "--first-frame-refine", "1"]) == 0
    assert (out3 / "eval_000.mp4").read_bytes() != (out2 / "eval_000.mp4").read_bytes()
    # --weights a pipeline folder that names the first-frame model: a relative --first-frame-prefix is relative to
    # the working directory, not to the folder, and gives the same clips as the run above.
    from causal_forcing.pipelines.first_frame import FirstFrameSpec
    from causal_forcing.pipelines.loading import PipelineSpec, TextEncoderSpec, VAESpec, save_pipeline_folder
    spec = PipelineSpec(block_size=1, steps=(1000.0, 500.0), latent_hw=(8, 8),
                        text_encoder=TextEncoderSpec(kind="minilm", text_len=config.text_len),
                        vae=VAESpec(kind="small", path=str(tmp_path / "vae")),
                        first_frame=FirstFrameSpec(path=str(tmp_path / "ff"), steps=2, guidance=4.0, frames=2))
    from causal_forcing.eval.models import load_model_folder
    save_pipeline_folder(tmp_path / "pipe", spec, load_model_folder(tmp_path / "dit"))
    monkeypatch.chdir(tmp_path)
    out4 = tmp_path / "causal_ff4"
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out4),
                 "--first-frame-prefix", "pm", "--first-frame-prefix-text", "minilm-clauses",
                 "--first-frame-refine", "1"]) == 0
    a, b = (sb.load_clip(o / "eval_000.mp4").astype(int) for o in (out4, out3))
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.5     # the same clip, up to float rounding in the DiTs
    # The two models' CFG scales override pipeline.json's: the clip changes.
    out5 = tmp_path / "causal_ff5"
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(out5),
                 "--first-frame-prefix", "pm", "--first-frame-prefix-text", "minilm-clauses",
                 "--first-frame-refine", "1", "--first-frame-guidance", "2", "--first-frame-prefix-guidance", "1"]) == 0
    assert (out5 / "eval_000.mp4").read_bytes() != (out4 / "eval_000.mp4").read_bytes()
    # Best-of-3 frame 0 chosen by a matcher: with --first-frame-candidates 1 the same clips as without it.
    from causal_forcing.models.matcher import FrameTextMatcher, MatcherConfig, save_matcher
    torch.manual_seed(0)
    save_matcher(FrameTextMatcher(MatcherConfig(in_dim=config.in_dim, text_len=config.text_len, dim=32, num_heads=2,
                                                num_layers=1, ffn_dim=32)), tmp_path / "matcher")
    for name, n in (("causal_m1", "1"), ("causal_m3", "3")):
        assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest),
                     "--steps", "2", "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(tmp_path / name),
                     "--first-frame-candidates", n, "--first-frame-matcher", "matcher"]) == 0
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(tmp_path / "causal_m0")]) == 0
    plain, one, three = (sb.load_clip(tmp_path / o / "eval_000.mp4").astype(int)
                         for o in ("causal_m0", "causal_m1", "causal_m3"))
    assert np.array_equal(plain, one) and not np.array_equal(one, three)
    # Frame 0 assembled object by object (the first-frame model reading its own MiniLM encoding of each clause).
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(tmp_path / "causal_c"),
                 "--first-frame-compose", "objects", "--first-frame-text", "minilm"]) == 0
    assert (tmp_path / "causal_c" / "scores.json").is_file()
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(tmp_path / "causal_cp"),
                 "--first-frame-compose", "objects", "--first-frame-text", "minilm", "--first-frame-compose-layouts",
                 "2", "--first-frame-compose-candidates", "1", "--first-frame-compose-prefix", "on"]) == 0
    assert (tmp_path / "causal_cp" / "scores.json").is_file()
    # ... with a layout model placing the objects (pooled MiniLM clauses: 384-d)
    from causal_forcing.models.layout import LayoutModel, save_layout_model
    save_layout_model(LayoutModel(text_dim=384, hidden=16, text_proj=4, pool=32), tmp_path / "layout")
    assert main(["eval", "model", "--weights", "pipe", "--kind", "causal", "--manifest", str(manifest), "--steps", "2",
                 "--vae", str(tmp_path / "vae"), "--limit", "2", "--out", str(tmp_path / "causal_cl"),
                 "--first-frame-compose", "objects", "--first-frame-text", "minilm", "--first-frame-layout", "layout",
                 "--first-frame-layout-sharpness", "2"]) == 0
    assert (tmp_path / "causal_cl" / "scores.json").is_file()
    capsys.readouterr()
    bads = [["--weights", str(tmp_path / "missing")], ["--limit", "0"], ["--block-size", "0"], ["--device", "gpu0"],
            ["--first-frame", str(tmp_path / "missing")], ["--first-frame", str(tmp_path / "ff"), "--no-first-frame"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-frames", "0"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-prefix", str(tmp_path / "pm")],   # needs 2+ frames
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-frames", "2", "--first-frame-prefix",
             str(tmp_path / "pm"), "--first-frame-prefix-guidance", "0.5"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-guidance", "0"],
            ["--first-frame-refine", "1", "--no-first-frame"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-candidates", "2"],                  # no matcher
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-candidates", "0", "--first-frame-matcher",
             str(tmp_path / "matcher")],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-candidates", "2", "--first-frame-matcher",
             str(tmp_path / "missing")],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-compose", "objects"],      # no own text encoder
            ["--first-frame-compose", "objects", "--first-frame-text", "minilm", "--no-first-frame"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-compose-prefix", "on"],     # nothing assembled
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-compose", "objects", "--first-frame-text",
             "minilm", "--first-frame-compose-layouts", "0"],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-layout", str(tmp_path / "layout")],   # no compose
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-compose", "objects", "--first-frame-text",
             "minilm", "--first-frame-layout", str(tmp_path / "missing")],
            ["--first-frame", str(tmp_path / "ff"), "--first-frame-compose", "objects", "--first-frame-text",
             "minilm", "--first-frame-layout", str(tmp_path / "layout"), "--first-frame-layout-sharpness", "-1"],
            ["--first-frame-layout", str(tmp_path / "layout"), "--no-first-frame"]]
    if not torch.cuda.is_available():
        bads.append(["--device", "cuda"])
    for bad in bads:
        argv = ["eval", "model", "--weights", str(tmp_path / "dit"), "--kind", "causal", "--manifest", str(manifest),
                "--vae", str(tmp_path / "vae"), *bad]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("causal-forcing ") and len(err.splitlines()) == 1


def test_eval_model_reads_the_text_encoder_its_pipeline_names(tmp_path):
    """`eval model --weights PIPELINE` encodes prompts with the text encoder pipeline.json names (MiniLM where a
    folder has no pipeline.json), so a model is judged as `generate` runs it."""
    from causal_forcing.checkpoints import save_model_folder
    from causal_forcing.cli.eval import _student_text_encoder
    torch = pytest.importorskip("torch")
    from causal_forcing.config import model_preset
    from causal_forcing.errors import InputError
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.models.small_vae import SmallVAE, SmallVAEConfig
    from causal_forcing.pipelines.loading import PipelineSpec, TextEncoderSpec, VAESpec, save_pipeline_folder

    SmallVAE(SmallVAEConfig(encoder_channels=(4, 4, 4, 8), decoder_channels=(8, 4, 4, 4))).save_folder(tmp_path / "vae")
    config = model_preset("shapes").replace(dim=32, ffn_dim=64, num_heads=2, num_layers=1)
    model = WanDiT(config)
    save_model_folder(model, config, tmp_path / "dit")
    prompts = ["a small red circle moving right and a big blue square standing still"]
    plain = _student_text_encoder(str(tmp_path / "dit"), config.text_len, "cpu").encode(prompts)
    for kind in ("minilm", "minilm-clauses", "umt5"):
        spec = PipelineSpec(block_size=1, steps=(1000.0,), latent_hw=(8, 8),
                            text_encoder=TextEncoderSpec(kind=kind, text_len=config.text_len,
                                                         path="wan" if kind == "umt5" else None),
                            vae=VAESpec(kind="small", path=str(tmp_path / "vae")))
        save_pipeline_folder(tmp_path / kind, spec, model)
        if kind == "umt5":
            with pytest.raises(InputError, match="umt5"):
                _student_text_encoder(str(tmp_path / kind), config.text_len, "cpu")
            continue
        encoded = _student_text_encoder(str(tmp_path / kind), config.text_len, "cpu").encode(prompts)
        assert torch.equal(encoded, plain) == (kind == "minilm")
