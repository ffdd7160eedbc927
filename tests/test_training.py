"""The shared trainer: strict configs, exact resume (also after SIGKILL), export, stage losses."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from causal_forcing.cli import main as cli_main
from causal_forcing.data.latents import BatchStream, LatentDataset, write_dataset
from causal_forcing.errors import ConfigError
from causal_forcing.training import load_stage_config, run_stage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "latents"
    g = torch.Generator().manual_seed(0)
    samples = ((torch.randn(4, 16, 8, 8, generator=g), {"id": str(i), "caption": f"c{i}"},
                torch.randn(8, 32, generator=g)) for i in range(10))
    write_dataset(folder, samples, shard_size=4)
    return folder


def _args(data, out, steps, **extra):
    args = [f"data.path={data}", f"train.out_dir={out}", f"train.max_steps={steps}", "optim.lr=1e-3",
            "train.progress=false", "train.save_every=1", "data.batch_size=2", "stage.cond_dropout=0.2",
            "ema.decay=0.9", "ema.start_step=1", "train.log_every=1"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def _weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def test_unknown_or_mistyped_key_is_a_one_line_error(dataset, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_stage_config("ar-diffusion", None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_stage_config("ar-diffusion", None, ["train.max_steps=ten"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage:\n  block_size: 0\n")
    rc = cli_main(["train", "ar-diffusion", "--config", str(cfg), f"train.out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "block_size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # no work before validation


def test_max_frames_trains_on_the_first_frames(dataset, tmp_path):
    """Truth: the same run on a dataset that stores only the first 2 latent frames of every sample."""
    from causal_forcing.data.latents import LatentDataset
    source = LatentDataset(dataset)
    cropped = tmp_path / "cropped"
    write_dataset(cropped, ((it["latents"][:2], it["record"], it["context"]) for it in
                            (source[i] for i in range(len(source)))), shard_size=4)
    run_stage("bidirectional", None, _args(dataset, tmp_path / "a", 3, **{"data.max_frames": 2}))
    run_stage("bidirectional", None, _args(cropped, tmp_path / "b", 3))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untouched = _weights_after(dataset, tmp_path / "c")
    assert any(not torch.equal(a[k], untouched[k]) for k in a)   # the crop changed what was learned
    with pytest.raises(ConfigError, match="data.max_frames must be >= 0"):
        load_stage_config("bidirectional", None, ["data.max_frames=-1"])


def _weights_after(data, out):
    run_stage("bidirectional", None, _args(data, out, 3))
    return _weights(out)


@pytest.mark.parametrize("stage", ["ar-diffusion", "bidirectional"])
def test_resume_is_exact(dataset, tmp_path, stage):
    """Truth: an uninterrupted run. Stopping after 2 steps and resuming gives bitwise-identical weights."""
    full = tmp_path / "full"
    run_stage(stage, None, _args(dataset, full, 4))
    part = tmp_path / "part"
    run_stage(stage, None, _args(dataset, part, 2))
    with pytest.raises(ConfigError, match="--resume"):
        run_stage(stage, None, _args(dataset, part, 4))
    run_stage(stage, None, _args(dataset, part, 4), resume=True)
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(full / "final_ema" / "model.safetensors"))
    eb = load_file(str(part / "final_ema" / "model.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    la = (full / "metrics.jsonl").read_text().splitlines()
    lb = (part / "metrics.jsonl").read_text().splitlines()
    assert len(la) == len(lb) == 4


def test_resume_after_sigkill_is_exact(dataset, tmp_path):
    """Kill -9 a run at an arbitrary moment (mid-step or mid-save), resume, compare with an uninterrupted run."""
    steps = 40  # long enough that the kill lands before the end even on an idle machine
    env = dict(os.environ, PYTHONHASHSEED="0")
    full = tmp_path / "full"  # the reference runs in a subprocess too, so both use the same thread settings
    subprocess.run([sys.executable, "-m", "causal_forcing", "train", "ar-diffusion", *_args(dataset, full, steps)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "causal_forcing", "train", "ar-diffusion", *_args(dataset, killed, steps)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").exists()
    assert not (killed / "final").exists()
    subprocess.run(cmd + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL)
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_exports_released_layout(tmp_path):
    """On data with one repeated clip, the flow loss at fixed (noise, t) falls well below the untrained
    model's (whose zero-initialised head predicts 0: loss = E|eps - x0|^2)."""
    g = torch.Generator().manual_seed(0)
    clip, ctx = torch.randn(4, 16, 8, 8, generator=g), torch.randn(8, 32, generator=g)
    data = tmp_path / "data"
    write_dataset(data, ((clip, {"id": str(i)}, ctx) for i in range(4)))
    out = tmp_path / "run"
    run_stage("ar-diffusion", None, [f"data.path={data}", f"train.out_dir={out}", "train.max_steps=150",
                                     "optim.lr=3e-3", "optim.betas=[0.9,0.99]", "train.progress=false",
                                     "train.save_every=150", "ema.decay=0.5", "stage.shift=1.0",
                                     "stage.loss_weighting=none"])
    from causal_forcing.checkpoints import load_dit_weights, load_into
    from causal_forcing.config import model_preset
    from causal_forcing.models.attention import TeacherForcing
    from causal_forcing.models.wan import WanDiT
    raw, cfg = load_dit_weights(out / "final")
    model = WanDiT(cfg).eval()
    load_into(model, raw)
    x0, eps = clip[None], torch.randn(1, 4, 16, 8, 8, generator=g)
    t = torch.full((1, 4), 500.0)
    xt = 0.5 * x0 + 0.5 * eps
    with torch.no_grad():
        flow = model(xt, t, ctx[None], layout=TeacherForcing(1), clean_x=x0)
    trained = (flow - (eps - x0)).pow(2).mean().item()
    untrained = (eps - x0).pow(2).mean().item()
    assert trained < 0.8 * untrained
    pt_raw, _ = load_dit_weights(out / "final" / "model.pt", ema=False)
    pt_ema, _ = load_dit_weights(out / "final" / "model.pt", ema=True)
    ema, _ = load_dit_weights(out / "final_ema")
    assert all(torch.equal(raw[k], pt_raw[k]) and torch.equal(ema[k], pt_ema[k]) for k in raw)
    assert cfg.dim == model_preset("tiny").dim


def test_batch_stream_resume(dataset):
    ds = LatentDataset(dataset)
    a = BatchStream(ds, 3, seed=1)
    seq = [a.next()["records"] for _ in range(7)]
    b = BatchStream(ds, 3, seed=1)
    for _ in range(4):
        b.next()
    c = BatchStream(ds, 3, seed=1)
    c.load_state_dict(b.state_dict())
    assert [c.next()["records"] for _ in range(3)] == seq[4:]
    r0 = BatchStream(ds, 2, seed=1, rank=0, world_size=2)
    r1 = BatchStream(ds, 2, seed=1, rank=1, world_size=2)
    ids0 = {r["id"] for r in r0.next()["records"] + r0.next()["records"]}
    ids1 = {r["id"] for r in r1.next()["records"] + r1.next()["records"]}
    assert not ids0 & ids1


STAGE_OF = {"ar_diffusion": "ar-diffusion", "ode_data": "ode-data", "causal_ode": "causal-ode",
            "causal_cd": "causal-cd", "causal_forcing_dmd": "dmd", "dmd": "dmd", "bidirectional": "bidirectional",
            "vae": "vae", "first_frame": "ar-diffusion", "prefix": "ar-diffusion", "matcher": "matcher",
            "layout": "layout"}


@pytest.mark.parametrize("path", sorted(p for p in Path(__file__).parents[1].glob("configs/*/*.yaml")
                                        if not p.name.startswith("_")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_validate(path):
    stage = next(v for k, v in STAGE_OF.items() if path.stem.startswith(k))
    # the paths the recipe fills in
    paths = {"dmd": ["stage.real_score=teacher"],
             "ode-data": ["stage.teacher=teacher", "stage.out=pairs"]}.get(stage, [])
    cfg = load_stage_config(stage, path, paths)
    assert cfg.train.max_steps >= 1


def test_config_include_and_override(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\ntrain:\n  max_steps: 7\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_stage_config("ar-diffusion", tmp_path / "child.yaml", ["train.seed=3"])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.seed) == (0.25, 7, 3)


def test_plot_and_export_commands(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_stage("ar-diffusion", None, _args(dataset, out, 2))
    png = tmp_path / "curves.png"
    assert cli_main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", str(out), "--out", str(png), "--keys", "nope"]) == 2
    ckpt = out / "checkpoints" / "step-00000002"
    assert cli_main(["export", str(ckpt), "--to", "released", "--out", str(tmp_path / "g.pt"), "--ema"]) == 0
    assert cli_main(["export", str(ckpt), "--to", "folder", "--out", str(tmp_path / "f")]) == 0
    from causal_forcing.checkpoints import load_dit_weights
    a, _ = load_dit_weights(tmp_path / "g.pt", ema=True)
    b, _ = load_dit_weights(out / "final_ema")
    c, _ = load_dit_weights(tmp_path / "f")
    d, _ = load_dit_weights(out / "final")
    assert all(torch.equal(a[k], b[k]) and torch.equal(c[k], d[k]) for k in a)


def test_ema_follows_the_reference_schedule(dataset, tmp_path):
    """EMA created at `ema.start_step` from the weights before that step's update, then updated after every
    update (spec §7): with decay d, ema = d^2 w1 + d(1-d) w2 + (1-d) w3 ... checked against the raw weights that
    the per-step checkpoints hold."""
    out = tmp_path / "run"
    run_stage("ar-diffusion", None, _args(dataset, out, 4, **{"ema.start_step": 2, "ema.decay": 0.5,
                                                               "train.keep_checkpoints": 10}))
    raw = [torch.load(out / "checkpoints" / f"step-{n:08d}" / "rank-0.pt", weights_only=True)["nets"]["generator"]
           ["model"] for n in (2, 3, 4)]
    ema = load_file(str(out / "final_ema" / "model.safetensors"))
    assert ema.keys() <= raw[0].keys()
    for key, value in ema.items():
        expected = raw[0][key]                       # created from the weights after 2 updates (steps 0 and 1)
        for later in raw[1:]:
            expected = 0.5 * expected + 0.5 * later[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_lr_schedule_closed_forms():
    """Warm-up then cosine / linear decay to min_lr_ratio, against the closed forms at known points."""
    from causal_forcing.training.config import OptimSection
    from causal_forcing.training.trainer import lr_factor
    cos = OptimSection(warmup_steps=10, schedule="cosine", decay_start=20, min_lr_ratio=0.1)
    assert lr_factor(cos, 120, 0) == pytest.approx(0.1) and lr_factor(cos, 120, 9) == pytest.approx(1.0)
    assert lr_factor(cos, 120, 15) == 1.0 and lr_factor(cos, 120, 20) == pytest.approx(1.0)
    assert lr_factor(cos, 120, 70) == pytest.approx(0.1 + 0.9 * 0.5)          # halfway: cos(pi/2) = 0
    assert lr_factor(cos, 120, 45) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5))  # a quarter: cos(pi/4)
    assert lr_factor(cos, 120, 120) == pytest.approx(0.1) and lr_factor(cos, 120, 500) == pytest.approx(0.1)
    lin = OptimSection(warmup_steps=0, schedule="linear")                   # decay_start 0: from step 0
    assert [lr_factor(lin, 4, n) for n in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimSection(warmup_steps=4)
    assert [lr_factor(const, 100, n) for n in (0, 3, 50, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_stage_config("bidirectional", None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_stage_config("bidirectional", None, ["optim.min_lr_ratio=2"])


def test_lr_schedule_drives_the_optimizer_and_resumes(dataset, tmp_path):
    """The optimizer's learning rate after every step is base * lr_factor(step); a run with a decaying rate
    stopped at step 2 and resumed ends with the same weights as an uninterrupted one (the schedule is not reset).
    (The decay is defined against train.max_steps, so the stopped run decays from step 2 onwards only.)"""
    def lrs(out, steps):
        return [torch.load(out / "checkpoints" / f"step-{n:08d}" / "rank-0.pt", weights_only=True)["nets"]
                ["generator"]["optimizer"]["param_groups"][0]["lr"] for n in steps]

    linear = {"optim.schedule": "linear", "train.keep_checkpoints": 10}
    run_stage("bidirectional", None, _args(dataset, tmp_path / "lin", 4, **linear))
    assert lrs(tmp_path / "lin", (1, 2, 3)) == pytest.approx([1e-3 * 0.75, 1e-3 * 0.5, 1e-3 * 0.25])
    cosine = {"optim.schedule": "cosine", "optim.decay_start": 2, "optim.min_lr_ratio": 0.2,
              "train.keep_checkpoints": 10}
    full, part = tmp_path / "full", tmp_path / "part"
    run_stage("bidirectional", None, _args(dataset, full, 5, **cosine))
    run_stage("bidirectional", None, _args(dataset, part, 2, **cosine))
    run_stage("bidirectional", None, _args(dataset, part, 5, **cosine), resume=True)
    assert lrs(part, (3, 4)) == pytest.approx([1e-3 * (0.2 + 0.8 * 0.75), 1e-3 * (0.2 + 0.8 * 0.25)])
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_logged_metrics_are_window_means(dataset, tmp_path):
    """Truth: the same run logged every step. Logging every 2 steps writes, at steps 2 and 4 (and the last, 5),
    the mean of the per-step values since the previous line, so no step's metrics are lost between lines."""
    import json
    run_stage("bidirectional", None, _args(dataset, tmp_path / "every", 5))
    run_stage("bidirectional", None, _args(dataset, tmp_path / "window", 5, **{"train.log_every": 2}))
    every = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    window = [json.loads(x) for x in (tmp_path / "window" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in window] == [2, 4, 5]
    for row, group in zip(window, ([0, 1], [2, 3], [4])):
        expected = sum(every[i]["loss"] for i in group) / len(group)
        assert row["loss"] == pytest.approx(expected, rel=1e-6)


def test_time_limit_stops_like_max_steps_and_resumes(dataset, tmp_path, monkeypatch):
    """Truth: runs bounded by step count. A run stopped by train.time_limit exports exactly what a run with
    max_steps at that step exports, and --resume without the limit ends where the uninterrupted run ends."""
    import itertools
    import json
    import types

    from causal_forcing.training import trainer as trainer_module
    full = tmp_path / "full"
    run_stage("bidirectional", None, _args(dataset, full, 4))
    clock = itertools.count()   # a fake clock: every reading is one second later
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    part = tmp_path / "part"
    run_stage("bidirectional", None, _args(dataset, part, 4, **{"train.time_limit": 5}))
    stopped = json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 0 < stopped < 4
    bounded = tmp_path / "bounded"
    run_stage("bidirectional", None, _args(dataset, bounded, stopped))
    a, b = _weights(part), _weights(bounded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    run_stage("bidirectional", None, _args(dataset, part, 4), resume=True)
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_adds_the_position_embedding(dataset, tmp_path):
    """Weights trained without ``abs_pos_freqs`` initialise a model with it (the new module zero-initialised, see
    test_abs_pos); the run trains it and exports our folder format, not the released .pt (whose layout has no such
    weights)."""
    run_stage("bidirectional", None, _args(dataset, tmp_path / "base", 2))
    base = tmp_path / "base" / "final"
    run_stage("bidirectional", None, _args(dataset, tmp_path / "pos", 3, **{
        "train.init": base, "model.overrides.abs_pos_freqs": 2, "model.overrides.abs_time_frames": 2}))
    tuned = _weights(tmp_path / "pos")
    assert tuned["pos_embedding.weight"].shape == (64, 8) and tuned["frame_embedding.weight"].shape == (2, 64)
    assert tuned["pos_embedding.weight"].abs().max() > 0           # trained away from its zero init
    assert tuned["frame_embedding.weight"].abs().max() > 0
    assert not (tmp_path / "pos" / "final" / "model.pt").exists()
    assert (tmp_path / "base" / "final" / "model.pt").exists()
