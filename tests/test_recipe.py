"""The ShapesWorld recipe: its wiring end to end with tiny step counts (slow: a few minutes), and the scheduler
that runs independent steps side by side."""
import json
import threading
import time

import pytest

from causal_forcing.errors import InputError
from causal_forcing.recipes.shapes import ShapesRecipe


@pytest.mark.slow
def test_recipe_runs_every_step_and_skips_finished_ones(tmp_path):
    from causal_forcing.models.small_vae import SmallVAE
    SmallVAE().save_folder(tmp_path / "vae")          # a random VAE stands in for the shipped one
    recipe = ShapesRecipe(tmp_path, num_clips=24, workers=1, seeds=2, train_seeds=2, quick=True)
    logs = []
    recipe.run(log=logs.append, jobs=2, poll_s=0.5)     # two steps at a time, each in its own process
    assert all(step.output.exists() for step in recipe.steps), [s.name for s in recipe.steps if not s.output.exists()]
    assert (tmp_path / "logs" / "ship.log").exists()
    summary = json.loads((tmp_path / "eval" / "dmd_causal_ode_framewise" / "summary.json").read_text())
    assert len(summary["seeds"]) == 2 and summary["seeds"][0]["all"]["n"] == 4   # the key comparison: --seeds
    for once in ("self_forcing_ode_framewise", "dmd_causal_ode_framewise_2step", "bidirectional"):
        assert len(json.loads((tmp_path / "eval" / once / "summary.json").read_text())["seeds"]) == 1
    totals = {}
    for init in ("causal_ode_framewise", "causal_cd_framewise", "causal_ode_chunkwise", "causal_cd_chunkwise"):
        for model in (init, f"dmd_{init}"):     # candidates for shipping: over --seeds
            seeds = json.loads((tmp_path / "eval" / model / "summary.json").read_text())["seeds"]
            assert len(seeds) == 2
            totals[model] = sum(s["in_distribution"]["total"] for s in seeds) / 2
    import dataclasses

    from causal_forcing.pipelines.loading import bundled_folder, load_pipeline, read_pipeline_spec
    shipped = json.loads((tmp_path / "pipelines" / "shipped.json").read_text())
    for folder, mode in (("shapes_framewise", "framewise"), ("shapes_chunkwise", "chunkwise")):
        best = max((m for m in totals if m.endswith(mode)), key=totals.get)   # the best of its block size
        assert shipped[folder]["model"] == best
        assert shipped[folder]["in_distribution_total"] == pytest.approx(totals[best])
    for name, block in (("shapes_framewise", 1), ("shapes_chunkwise", 3)):
        pipe = load_pipeline(tmp_path / "pipelines" / name)   # loads, with the shared VAE folder next to it
        assert pipe.stream_config.block_size == block
        assert pipe.first_frame is not None and pipe.first_frame.model.config.abs_pos_freqs > 0   # the shared one
        assert pipe.first_frame.prefix_model is not None                        # and the shared prefix model
        assert pipe.first_frame.layout_model is not None                        # and the shared layout model
        bundled = read_pipeline_spec(bundled_folder(name.replace("_", "-"))).first_frame   # as shipped
        assert dataclasses.replace(pipe.first_frame.spec, steps=bundled.steps) == bundled
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
    for flag in ("--train-seeds", "--seeds", "--jobs"):
        assert cli.main(["recipe", "shapes", "--out", str(tmp_path / "r"), flag, "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--train-seeds" in err[0]


class _FakeStep:
    """Stands in for a step's process: 'runs' for a moment in a thread, then writes the step's output."""

    def __init__(self, step, log, fail):
        self.rc = None
        self.step, self.log, self.fail = step, log, fail
        threading.Thread(target=self._go, daemon=True).start()

    def _go(self):
        self.log.append(("start", self.step.name, time.perf_counter()))
        time.sleep(0.02)
        # "end" is logged before the output appears: the runner may take an existing output as a finished need
        self.log.append(("end", self.step.name, time.perf_counter()))
        if not self.fail:
            self.step.output.parent.mkdir(parents=True, exist_ok=True)
            self.step.output.touch()
        self.rc = 1 if self.fail else 0

    def poll(self):
        return self.rc


def test_parallel_run_respects_needs_and_the_job_limit(tmp_path):
    """Truth: each step's declared needs. No step starts before all of its needs ended, never more than `jobs`
    run at once, independent steps do overlap, and every step runs exactly once."""
    recipe = ShapesRecipe(tmp_path, seeds=1, train_seeds=2, quick=True)
    events = []
    recipe.run(log=lambda m: None, jobs=3, launch=lambda step, slots: _FakeStep(step, events, False),
               poll_s=0.005)
    ended = {name: t for kind, name, t in events if kind == "end"}
    started = {name: t for kind, name, t in events if kind == "start"}
    assert sorted(started) == sorted(s.name for s in recipe.steps) == sorted(ended)
    for step in recipe.steps:
        assert all(ended[n] <= started[step.name] for n in step.needs + step.after), step.name
    live, peak = 0, 0
    for kind, _, _ in sorted(events, key=lambda e: (e[2], e[0] == "start")):
        live += 1 if kind == "start" else -1
        peak = max(peak, live)
    assert 2 <= peak <= 3
    assert set(recipe.steps[-1].after) == {s.name for s in recipe.steps[:-1]}   # the report waits for all


def test_a_step_everything_waits_for_gets_every_core(tmp_path):
    """With --jobs 2 the teachers, which every later step needs, run alone on both shares of the cores; steps that
    can overlap get one share each. Property checked: a two-share step never runs beside another step."""
    recipe = ShapesRecipe(tmp_path, seeds=1, quick=True)
    events, slots = [], {}

    def launch(step, n):
        slots[step.name] = n
        return _FakeStep(step, events, False)
    recipe.run(log=lambda m: None, jobs=2, launch=launch, poll_s=0.005)
    wide = {name for name, n in slots.items() if n == 2}
    assert {"encode", "bidirectional-short", "bidirectional"} <= wide
    assert slots["ar-framewise"] == slots["ar-chunkwise"] == slots["data"] == 1
    spans = {name: [t for kind, n, t in events if n == name] for name in slots}
    for name in wide:
        t0, t1 = spans[name]
        assert not any(o != name and s0 < t1 and s1 > t0 for o, (s0, s1) in spans.items()), name



def test_the_launcher_gives_each_share_its_threads(tmp_path, monkeypatch):
    """`OMP_NUM_THREADS` of a step's process: cores / jobs for one share, all cores for every share."""
    import subprocess

    import causal_forcing.recipes.shapes as shapes_recipe
    seen = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, env, **kw: seen.append((args, env["OMP_NUM_THREADS"])))
    monkeypatch.setattr(shapes_recipe.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    recipe = ShapesRecipe(tmp_path, quick=True)
    launch = recipe._launch(2)
    launch(recipe.steps[0], 1)
    launch(recipe.steps[0], 2)
    assert [threads for _, threads in seen] == ["2", "4"]
    assert seen[0][0][-2:] == ["--only", recipe.steps[0].name]


def test_parallel_run_stops_at_a_failed_step(tmp_path):
    recipe = ShapesRecipe(tmp_path, seeds=1, train_seeds=1, quick=True)
    events = []
    with pytest.raises(InputError, match="recipe steps failed: encode"):
        recipe.run(log=lambda m: None, jobs=2, poll_s=0.005,
                   launch=lambda step, slots: _FakeStep(step, events, step.name == "encode"))
    started = {name for kind, name, _ in events if kind == "start"}
    assert "encode" in started and "bidirectional-short" not in started   # nothing that needs it ran


def test_a_step_whose_needs_are_neither_done_nor_selected_is_refused(tmp_path):
    recipe = ShapesRecipe(tmp_path, quick=True)
    for jobs in (1, 2):
        with pytest.raises(InputError, match="dmd_causal_ode_framewise needs causal_ode_framewise"):
            recipe.run(only=["dmd_causal_ode_framewise"], log=lambda m: None, jobs=jobs)
    assert not (tmp_path / "runs").exists()
    # ship and report wait for the steps before them only when those run too: alone they use what exists
    assert not recipe.steps[-2].needs and recipe.steps[-2].name == "ship"


def test_an_interrupted_evaluation_goes_on_with_the_missing_seeds(tmp_path, monkeypatch):
    """A seed whose scores.json exists is read back, not generated again; the summary has every seed."""
    import causal_forcing.eval.models as em
    import causal_forcing.models.small_vae as sv
    import causal_forcing.models.text as text
    calls = []

    def fake_evaluate(model, vae, encoder, manifest, settings, **kw):
        calls.append(settings.seed)
        return {"in_distribution": {"total": settings.seed}, "held_out": {}, "all": {}}

    monkeypatch.setattr(em, "evaluate", fake_evaluate)
    monkeypatch.setattr(em, "load_model_folder", lambda path: None)
    monkeypatch.setattr(sv.SmallVAE, "from_folder", classmethod(lambda cls, path, **kw: None))
    monkeypatch.setattr(text, "build_text_encoder", lambda *a, **kw: None)
    recipe = ShapesRecipe(tmp_path, seeds=3, quick=True)
    seed0 = tmp_path / "eval" / "dmd_causal_cd_framewise" / "seed0"
    seed0.mkdir(parents=True)
    (seed0 / "scores.json").write_text(json.dumps({"in_distribution": {"total": -1}, "held_out": {}, "all": {}}))
    step = next(s for s in recipe.steps if s.name == "eval-dmd_causal_cd_framewise")
    step.run()
    assert calls == [1000, 2000]
    summary = json.loads(step.output.read_text())
    assert [r["in_distribution"]["total"] for r in summary["seeds"]] == [-1, 1000, 2000]
