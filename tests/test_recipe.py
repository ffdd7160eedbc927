"""The ShapesWorld recipe's wiring end to end: every step with tiny step counts (slow: a few minutes)."""
import json

import pytest

from causal_forcing.recipes.shapes import ShapesRecipe


@pytest.mark.slow
def test_recipe_runs_every_step_and_skips_finished_ones(tmp_path):
    from causal_forcing.models.small_vae import SmallVAE
    SmallVAE().save_folder(tmp_path / "vae")          # a random VAE stands in for the shipped one
    recipe = ShapesRecipe(tmp_path, num_clips=24, workers=1, seeds=2, train_seeds=2, quick=True)
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
    replica = json.loads((tmp_path / "eval" / "dmd_self_forcing_ode_framewise_train1" / "summary.json").read_text())
    assert replica["replica_of"] == "dmd_self_forcing_ode_framewise" and replica["train_seed"] == 1
    comparison = json.loads((report / "scores.json").read_text())["key_comparison"]
    assert comparison["over"] == "training seeds" and comparison["seeds"] == 2
    assert all((report / f).stat().st_size > 0 for f in ("scores.json", "scores.png", "curves.png", "samples.gif"))
    logs.clear()
    recipe.run(log=logs.append)                       # everything done: every step is skipped
    assert all(line.startswith("[skip]") for line in logs)


def test_recipe_cli_lists_replicas_and_rejects_bad_counts(tmp_path, capsys):
    from causal_forcing import cli
    assert cli.main(["recipe", "shapes", "--out", str(tmp_path / "r"), "--train-seeds", "3", "--list"]) == 0
    steps = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    replicas = [s for s in steps if "-train" in s]
    assert replicas == [f"{prefix}dmd_{init}-train{k}" for k in (1, 2)
                        for init in ("causal_ode_framewise", "self_forcing_ode_framewise") for prefix in ("", "eval-")]
    assert steps.index("eval-dmd_self_forcing_ode_framewise-train2") < steps.index("ship")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())   # --list runs nothing
    for flag in ("--train-seeds", "--seeds"):
        assert cli.main(["recipe", "shapes", "--out", str(tmp_path / "r"), flag, "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--train-seeds" in err[0]
