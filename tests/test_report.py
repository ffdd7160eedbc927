"""The recipe's results report: seed statistics, the key comparison's verdict, plots and the sample grid."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from causal_forcing.errors import InputError
from causal_forcing.recipes import report


def seed_report(total: float, all_correct: float = 0.5) -> dict:
    split = {key: total for key in report.COLUMNS} | {"all_correct": all_correct}
    return {"in_distribution": split, "held_out": {key: total / 2 for key in report.COLUMNS}, "all": split}


def write_summary(out: Path, name: str, totals: list[float], *, kind: str = "causal", steps: int | None = 4,
                  replica_of: str | None = None, train_seed: int = 0, block_size: int = 1) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"model": name, "kind": kind, "block_size": block_size,
                                                     "steps": steps, "replica_of": replica_of, "train_seed": train_seed,
                                                     "seeds": [seed_report(t) for t in totals]}))


@pytest.mark.parametrize(("causal", "baseline", "verdict"), [
    ([0.80, 0.82, 0.84], [0.60, 0.62, 0.64], "reproduced"),
    ([0.80, 0.82, 0.84], [0.79, 0.83, 0.81], "inconclusive"),
    ([0.50, 0.52, 0.54], [0.80, 0.82, 0.84], "reversed"),
])
def test_key_comparison_verdict(tmp_path: Path, causal: list[float], baseline: list[float], verdict: str) -> None:
    write_summary(tmp_path, "dmd_causal_ode_framewise", causal)
    write_summary(tmp_path, "dmd_causal_cd_framewise", [c - 0.1 for c in causal])   # the weaker causal init
    write_summary(tmp_path, report.SELF_FORCING_INIT, baseline)
    result = report.key_comparison(report.collect(tmp_path))
    assert result is not None
    assert result["verdict"] == verdict and result["causal_model"] == "dmd_causal_ode_framewise"
    assert result["causal_total"] == pytest.approx([np.mean(causal), np.std(causal, ddof=1)])
    assert result["self_forcing_total"] == pytest.approx([np.mean(baseline), np.std(baseline, ddof=1)])


def test_key_comparison_over_training_seeds(tmp_path: Path) -> None:
    """With DMD replicas on both sides, the statistics are over training runs (each: mean over its sampling
    seeds), which can overturn a verdict drawn from one run's sampling seeds alone."""
    write_summary(tmp_path, "dmd_causal_ode_framewise", [0.80, 0.81, 0.82])
    write_summary(tmp_path, report.SELF_FORCING_INIT, [0.60, 0.61, 0.62])
    assert report.key_comparison(report.collect(tmp_path))["verdict"] == "reproduced"   # sampling seeds only
    for seed, (c, b) in enumerate([(0.55, 0.75), (0.60, 0.70)], start=1):
        write_summary(tmp_path, f"dmd_causal_ode_framewise_train{seed}", [c], replica_of="dmd_causal_ode_framewise",
                      train_seed=seed)
        write_summary(tmp_path, f"dmd_self_forcing_ode_framewise_train{seed}", [b],
                      replica_of=report.SELF_FORCING_INIT, train_seed=seed)
    result = report.key_comparison(report.collect(tmp_path))
    assert result["over"] == "training seeds" and result["seeds"] == 3
    assert result["causal_runs"] == pytest.approx([0.81, 0.55, 0.60])
    assert result["self_forcing_runs"] == pytest.approx([0.61, 0.75, 0.70])
    assert result["causal_total"] == pytest.approx([np.mean([0.81, 0.55, 0.60]), np.std([0.81, 0.55, 0.60], ddof=1)])
    assert result["verdict"] == "inconclusive"
    text = (report.write_report(tmp_path) / "scores.md").read_text()
    assert "over 3 training seeds" in text and "Per training seed: causal 0.810, 0.550, 0.600" in text


def test_key_comparison_needs_both_sides(tmp_path: Path) -> None:
    write_summary(tmp_path, "dmd_causal_ode_framewise", [0.8, 0.9])
    assert report.key_comparison(report.collect(tmp_path)) is None


def test_write_report_tables_and_plots(tmp_path: Path) -> None:
    write_summary(tmp_path, "bidirectional", [0.9], kind="bidirectional", steps=None)
    write_summary(tmp_path, "dmd_causal_ode_framewise", [0.7, 0.8, 0.9])
    write_summary(tmp_path, report.SELF_FORCING_INIT, [0.4, 0.5, 0.6])
    run = tmp_path / "runs" / "bidirectional"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 30)))
    folder = report.write_report(tmp_path)
    text = (folder / "scores.md").read_text()
    assert "| dmd_causal_ode_framewise | 1 | 4-step streaming | 3 | 0.800 ± 0.100 |" in text
    assert "| bidirectional | 1 | bidirectional teacher, many steps | 1 | 0.900 |" in text
    assert "**reproduced**" in text
    data = json.loads((folder / "scores.json").read_text())
    assert data["key_comparison"]["difference"] == pytest.approx(0.3)
    for png in ("scores.png", "curves.png"):
        with Image.open(folder / png) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(folder.glob(".*tmp*"))


def test_sample_grid_tiles_clips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # flat-coloured clips (GIF palettes keep a few flat colours exactly), one colour per clip and frame
    clips = [[np.broadcast_to(rng.integers(0, 256, (t, 1, 1, 3), dtype=np.uint8), (t, 8, 8, 3)).copy()
              for t in (5, 6)] for _ in range(2)]
    path = report.sample_grid(clips, tmp_path / "grid.gif", gap=2)
    with Image.open(path) as image:
        gif = np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
    assert gif.shape[:3] == (5, 2 * 8 + 2, 2 * 8 + 2)   # cut to the shortest clip; 2 x 2 tiles with a gap
    for r in range(2):
        for c in range(2):
            tile = gif[:, r * 10:r * 10 + 8, c * 10:c * 10 + 8, :3]
            np.testing.assert_allclose(tile.astype(int), clips[r][c][:5].astype(int), atol=8)


def test_ship_takes_the_best_evaluated_causal_model_of_each_block_size(tmp_path):
    """Frame-wise and chunk-wise folders each get the init or DMD student with the best mean in-distribution Total,
    and both name the first-frame and prefix models; a folder with no trained and
    evaluated candidate, or no first-frame or prefix model yet, leaves the step unfinished (partial record), not
    faked."""
    from causal_forcing.checkpoints import save_model_folder
    from causal_forcing.config import model_preset
    from causal_forcing.models.small_vae import SmallVAE
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.loading import load_pipeline
    from causal_forcing.recipes.shapes import PREFIX_FRAMES, ShapesRecipe
    SmallVAE().save_folder(tmp_path / "vae")
    dit = WanDiT(model_preset("shapes").replace(dim=32, ffn_dim=64, num_heads=2, num_layers=1))
    recipe = ShapesRecipe(tmp_path, quick=True)
    ship = next(s for s in recipe.steps if s.name == "ship")
    with pytest.raises(InputError, match="no evaluated causal model to ship"):
        ship.run()
    scored = {"causal_cd_framewise": ([0.7, 0.8], 1), "dmd_causal_cd_framewise": ([0.7, 0.7], 1),
              "dmd_causal_ode_framewise": ([0.9, 0.5], 1),
              "self_forcing_ode_framewise": ([0.99], 1)}   # not a causal init: never shipped
    for model, (totals, block) in scored.items():
        write_summary(tmp_path, model, totals, block_size=block)
        save_model_folder(dit, dit.config, recipe.final(model))
    # evaluated, but its weights are gone: not a candidate
    write_summary(tmp_path, "causal_cd_chunkwise", [0.6], block_size=3)
    ship.run()
    assert not ship.output.exists()                              # no chunk-wise model yet: unfinished
    partial = json.loads((tmp_path / "pipelines" / "shipped.partial.json").read_text())
    assert partial["shapes_framewise"]["model"] == "causal_cd_framewise"
    assert partial["not_trained_yet"] == ["shapes_chunkwise", "shapes_first_frame", "shapes_prefix"]
    assert load_pipeline(tmp_path / "pipelines" / "shapes_framewise").first_frame is None
    first = WanDiT(dit.config.replace(abs_pos_freqs=2))
    save_model_folder(first, first.config, recipe.final("first_frame"))
    ship.run()
    assert json.loads((tmp_path / "pipelines" / "shipped.partial.json").read_text())["not_trained_yet"] == [
        "shapes_chunkwise", "shapes_prefix", "shapes_layout"]
    assert load_pipeline(tmp_path / "pipelines" / "shapes_framewise").first_frame.spec.prefix_path is None
    prefix = WanDiT(dit.config.replace(abs_pos_freqs=2))
    save_model_folder(prefix, prefix.config, recipe.final("prefix_tune"))
    from causal_forcing.models.layout import LayoutModel, save_layout_model
    save_layout_model(LayoutModel(text_dim=384, hidden=8, text_proj=4, pool=16), recipe.final("layout", ema=False))
    for model, totals in (("causal_ode_chunkwise", [0.5, 0.5]), ("dmd_causal_ode_chunkwise", [0.55, 0.55])):
        write_summary(tmp_path, model, totals, block_size=3)
        save_model_folder(dit, dit.config, recipe.final(model))
    ship.run()
    shipped = json.loads(ship.output.read_text())
    assert shipped["shapes_framewise"] == {"model": "causal_cd_framewise", "block_size": 1,
                                           "in_distribution_total": pytest.approx(0.75),
                                           "held_out_total": pytest.approx(0.375)}
    assert shipped["shapes_chunkwise"]["model"] == "dmd_causal_ode_chunkwise"
    assert not (tmp_path / "pipelines" / "shipped.partial.json").exists()
    chunkwise = load_pipeline(tmp_path / "pipelines" / "shapes_chunkwise")
    assert chunkwise.stream_config.block_size == 3 and chunkwise.first_frame.model.config.abs_pos_freqs == 2
    framewise = load_pipeline(tmp_path / "pipelines" / "shapes_framewise")
    for pipe in (framewise, chunkwise):                    # both name the prefix model
        spec = pipe.first_frame.spec
        assert (spec.frames, spec.prefix_text_encoder) == (PREFIX_FRAMES, "minilm-clauses")
        assert pipe.first_frame.prefix_model is not None and len(pipe.first_frame.models()) == 2
        assert spec.layout_path == "../shapes_layout" and pipe.first_frame.layout_model.pool.shape == (16, 2)


def scores(name: str, in_dist: list[float], held_out: list[float]) -> report.ModelScores:
    values = {"in_distribution": {c: list(in_dist) for c in report.COLUMNS},
              "held_out": {c: list(held_out) for c in report.COLUMNS}}
    return report.ModelScores(name=name, kind="causal", block_size=3, steps=4, values=values)


def test_choose_shipped_breaks_ties_within_seed_noise_by_held_out_total():
    """A lead in in-distribution Total smaller than the seed spread does not decide: held-out Total does (the
    run-5 chunk-wise case: DMD ahead by 0.001 with std 0.01, but 0.05 lower held out). A lead larger than the
    spread decides whatever the held-out scores, and with one seed each only an exact tie goes to held out."""
    init = scores("causal_cd_chunkwise", [0.680, 0.690, 0.697], [0.64, 0.645, 0.647])
    dmd = scores("dmd_causal_cd_chunkwise", [0.681, 0.690, 0.700], [0.59, 0.592, 0.594])
    assert report.choose_shipped([dmd, init]).name == "causal_cd_chunkwise"
    clear = scores("dmd_causal_cd_chunkwise", [0.75, 0.76, 0.77], [0.50, 0.50, 0.51])
    assert report.choose_shipped([init, clear]).name == "dmd_causal_cd_chunkwise"
    one_a, one_b = scores("a", [0.70], [0.1]), scores("b", [0.69], [0.9])
    assert report.choose_shipped([one_b, one_a]).name == "a"
    assert report.choose_shipped([scores("a", [0.7], [0.1]), scores("b", [0.7], [0.9])]).name == "b"
    with pytest.raises(ValueError):
        report.choose_shipped([])
