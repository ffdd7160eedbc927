"""The ShapesWorld recipe's wiring end to end: every step with tiny step counts (slow: a few minutes)."""
import json

import pytest

from causal_forcing.recipes.shapes import ShapesRecipe


@pytest.mark.slow
def test_recipe_runs_every_step_and_skips_finished_ones(tmp_path):
    from causal_forcing.models.small_vae import SmallVAE
    SmallVAE().save_folder(tmp_path / "vae")          # a random VAE stands in for the shipped one
    recipe = ShapesRecipe(tmp_path, num_clips=24, workers=1, seeds=2, quick=True)
    logs = []
    recipe.run(log=logs.append)
    assert all(step.output.exists() for step in recipe.steps)
    summary = json.loads((tmp_path / "eval" / "dmd_causal_ode_framewise" / "summary.json").read_text())
    assert len(summary["seeds"]) == 2 and summary["seeds"][0]["all"]["n"] == 4   # the key comparison: --seeds
    for once in ("causal_ode_framewise", "dmd_causal_ode_framewise_2step", "bidirectional"):
        assert len(json.loads((tmp_path / "eval" / once / "summary.json").read_text())["seeds"]) == 1
    from causal_forcing.pipelines.loading import load_pipeline
    shipped = json.loads((tmp_path / "pipelines" / "shipped.json").read_text())
    assert shipped["shapes_chunkwise"]["model"] == "dmd_causal_ode_chunkwise"
    for name, block in (("shapes_framewise", 1), ("shapes_chunkwise", 3)):
        pipe = load_pipeline(tmp_path / "pipelines" / name)   # loads, with the shared VAE folder next to it
        assert pipe.stream_config.block_size == block
    report = tmp_path / "report"
    assert "dmd_self_forcing_ode_framewise" in (report / "scores.md").read_text()
    assert all((report / f).stat().st_size > 0 for f in ("scores.json", "scores.png", "curves.png", "samples.gif"))
    logs.clear()
    recipe.run(log=logs.append)                       # everything done: every step is skipped
    assert all(line.startswith("[skip]") for line in logs)
