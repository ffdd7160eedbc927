"""The CUDA-graph trainer (`causal_forcing.training.graphed`), on the CPU where its step runs eagerly: it
optimises the stages' flow objective, exports the trainer's model folders, and rejects bad input."""
import json
import math

import pytest
import torch

from causal_forcing.checkpoints import load_dit_weights, load_into
from causal_forcing.data.latents import write_dataset
from causal_forcing.models.attention import Bidirectional, TeacherForcing
from causal_forcing.models.wan import WanDiT
from causal_forcing.training.graphed import GraphedTrainer, Settings, main

CPU = torch.device("cpu")


def _one_clip_dataset(folder, frames=4):
    g = torch.Generator().manual_seed(0)
    clip, ctx = torch.randn(frames, 16, 8, 8, generator=g), torch.randn(8, 32, generator=g)
    write_dataset(folder, ((clip, {"id": str(i)}, ctx) for i in range(4)), shard_size=3)
    return clip, ctx


def _flow_error(folder, clip, ctx, block_size):
    """MSE of the model's flow at a fixed (noise, t = 500) against the target ε − x0, and the MSE of the
    untrained model (its head is zero-initialised, so it predicts 0)."""
    state, cfg = load_dit_weights(folder)
    model = WanDiT(cfg).eval()
    load_into(model, state)
    g = torch.Generator().manual_seed(1)
    x0 = clip[None]
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((1, x0.shape[1]), 500.0)
    xt = 0.5 * x0 + 0.5 * eps
    kw = {"layout": TeacherForcing(block_size), "clean_x": x0} if block_size else {"layout": Bidirectional()}
    with torch.no_grad():
        flow = model(xt, t, ctx[None], **kw)
    return (flow - (eps - x0)).pow(2).mean().item(), (eps - x0).pow(2).mean().item()


@pytest.mark.parametrize("block_size", [0, 1])
def test_learns_one_clip_and_exports_model_folders(tmp_path, block_size):
    clip, ctx = _one_clip_dataset(tmp_path / "data")
    s = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=120, preset="tiny", batch=2,
                 lr=3e-3, min_lr=3e-3, warmup=10, ema=0.5, ema_start=60, shift=1.0, cond_dropout=0.0,
                 block_size=block_size, log_every=40)
    torch.manual_seed(0)
    summary = GraphedTrainer(s, CPU).run(log=lambda *_: None)
    assert summary["steps"] == 120 and summary["mode"] == "eager" and summary["ema"]
    run = tmp_path / "run"
    trained, untrained = _flow_error(run / "final", clip, ctx, block_size)
    assert trained < 0.8 * untrained
    raw, _ = load_dit_weights(run / "final")
    ema, cfg = load_dit_weights(run / "final_ema")
    assert cfg.dim == 64 and raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)          # the EMA is its own average
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [40, 80, 120]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_learning_rate_warms_up_then_follows_the_cosine(tmp_path):
    _one_clip_dataset(tmp_path / "data")
    s = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=10, preset="tiny",
                 lr=1e-3, min_lr=1e-4, warmup=4)
    tr = GraphedTrainer(s, CPU)
    assert tr.lr_at(0, 0.0) == pytest.approx(2.5e-4) and tr.lr_at(3, 0.0) == pytest.approx(1e-3)
    assert tr.lr_at(10, 0.5) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert tr.lr_at(10, 1.0) == pytest.approx(1e-4) and tr.lr_at(10, 2.0) == pytest.approx(1e-4)
    tr.set_lr(5e-4)
    assert all(g["lr"] == 5e-4 for g in tr.opt.param_groups)


def test_frames_keeps_the_first_latent_frames(tmp_path):
    clip, _ = _one_clip_dataset(tmp_path / "data", frames=5)
    s = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=1, preset="tiny", frames=3)
    tr = GraphedTrainer(s, CPU)
    assert tr.latents.shape == (4, 3, 16, 8, 8)
    assert torch.equal(tr.latents[0], clip[:3].to(tr.latents.dtype))   # stored in fp16


@pytest.mark.parametrize("argv, message", [
    (["--out", "OUT", "--seconds", "10"], "not a latent dataset"),
    (["--out", "OUT"], "--seconds or --max-steps"),
    (["--out", "OUT", "--max-steps", "5", "--min-lr", "1"], "min-lr"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    argv = ["--data", str(tmp_path / "nothing")] + [str(tmp_path / a) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "OUT").exists()


def test_resume_continues_exactly(tmp_path):
    """6 steps, then --resume to 10, give the weights of 10 steps in one go (eager CPU path: exact)."""
    _one_clip_dataset(tmp_path / "data")

    def run(out, steps, resume=False):
        s = Settings(data=str(tmp_path / "data"), out=str(out), max_steps=steps, preset="tiny", batch=2, lr=1e-3,
                     min_lr=1e-3, warmup=2, ema=0.9, ema_start=3, log_every=2, resume=resume)
        torch.manual_seed(0)
        return GraphedTrainer(s, CPU).run(log=lambda *_: None)

    run(tmp_path / "straight", 10)
    run(tmp_path / "split", 6)
    assert run(tmp_path / "split", 10, resume=True)["steps"] == 10
    for folder in ("final", "final_ema"):
        a, _ = load_dit_weights(tmp_path / "straight" / folder)
        b, _ = load_dit_weights(tmp_path / "split" / folder)
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    with pytest.raises(Exception, match="batch"):
        s = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "split"), max_steps=12, preset="tiny",
                     batch=3, resume=True)
        GraphedTrainer(s, CPU).run(log=lambda *_: None)


def test_settings_follow_the_stage_config():
    from causal_forcing.errors import InputError as Err
    from causal_forcing.training import load_stage_config
    from causal_forcing.training.graphed import settings_from_stage_config
    from causal_forcing.recipes.shapes import CONFIGS
    cfg = load_stage_config("bidirectional", CONFIGS / "bidirectional_short.yaml",
                            ["data.path=LAT", "train.out_dir=RUN", "train.time_limit=30"])
    s = settings_from_stage_config("bidirectional", cfg)
    assert (s.data, s.out, s.frames, s.block_size, s.batch, s.lr, s.min_lr) == ("LAT", "RUN", 9, 0, 8, 1e-3, 1e-3)
    assert (s.seconds, s.max_steps, s.ema, s.ema_start, s.shift, s.cond_dropout) == (30, 20000, 0.999, 2000, 3.0, 0.1)
    cfg = load_stage_config("ar-diffusion", CONFIGS.parent / "shapes_gpu" / "ar_diffusion.yaml",
                            ["stage.block_size=3", "train.init=TEACHER", "optim.schedule=cosine",
                             "optim.min_lr_ratio=0.1"])
    s = settings_from_stage_config("ar-diffusion", cfg)
    assert (s.block_size, s.init, s.batch, s.min_lr) == (3, "TEACHER", cfg.data.batch_size, pytest.approx(3e-5))
    cfg = load_stage_config("ar-diffusion", CONFIGS / "ar_diffusion.yaml",
                            ["model.overrides.abs_pos_freqs=4", "stage.early_frames=5", "stage.early_weight=4",
                             "model.overrides.abs_time_frames=6"])
    s = settings_from_stage_config("ar-diffusion", cfg)
    assert (s.abs_pos_freqs, s.abs_time_frames, s.early_frames, s.early_weight) == (4, 6, 5, 4.0)
    for stage, over, what in (("ar-diffusion", ["stage.loss_weighting=bsmntw"], "loss_weighting"),
                              ("ar-diffusion", ["stage.context_noise_max_t=100"], "context_noise"),
                              ("bidirectional", ["optim.schedule=linear"], "linear"),
                              ("bidirectional", ["model.overrides.dim=32"], "overrides")):
        cfg = load_stage_config(stage, CONFIGS / "ar_diffusion.yaml", over)
        with pytest.raises(Err, match=what):
            settings_from_stage_config(stage, cfg)


def test_recipe_trains_the_teachers_with_the_graphed_trainer(tmp_path):
    """`recipe shapes --graphed-teachers`: the teacher steps write the graphed trainer's run, with the settings of
    the stage configs (here --quick's: 2 steps of batch 2)."""
    from causal_forcing.recipes.shapes import ShapesRecipe
    g = torch.Generator().manual_seed(0)
    write_dataset(tmp_path / "latents", ((torch.randn(10, 16, 8, 8, generator=g), {"id": str(i)},
                                          torch.randn(32, 384, generator=g)) for i in range(3)))
    (tmp_path / "latents" / ".complete").touch()
    recipe = ShapesRecipe(tmp_path, quick=True, graphed_teachers=True)
    recipe.run(["bidirectional-short", "bidirectional", "ar-framewise"], log=lambda *_: None)
    for run, frames, block in (("bidirectional_short", 9, 0), ("bidirectional", 0, 0), ("ar_framewise", 0, 1)):
        settings = json.loads((tmp_path / "runs" / run / "settings.json").read_text())
        assert (settings["frames"], settings["block_size"], settings["batch"]) == (frames, block, 2), run
        assert json.loads((tmp_path / "runs" / run / "summary.json").read_text())["steps"] == 2
        assert (tmp_path / "runs" / run / "final_ema" / "model.safetensors").exists()
    ar = json.loads((tmp_path / "runs" / "ar_framewise" / "settings.json").read_text())
    assert ar["init"] == str(tmp_path / "runs" / "bidirectional" / "final_ema")


def test_early_frame_weights_and_position_embedding(tmp_path):
    """--early-frames/--early-weight: loss = mean over (B, F) of w_f · mean_CHW (v̂ − (ε − x0))², first frames weighted,
    w normalised to mean 1 (truth: recomputed from the model's inputs and output, ε − x0 = (x_t − x0) / σ);
    --abs-pos-freqs adds the position embedding to an init without it and exports it."""
    clip, ctx = _one_clip_dataset(tmp_path / "data")          # every sample is the same clip: x0 is known
    base = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "base"), max_steps=2, preset="tiny", batch=2,
                    log_every=1, save_every=0)
    GraphedTrainer(base, CPU).run(log=lambda *_: None)
    s = Settings(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=3, preset="tiny", batch=3,
                 block_size=1, init=str(tmp_path / "base" / "final"), abs_pos_freqs=2, abs_time_frames=3,
                 early_frames=1, early_weight=3.0, log_every=1, save_every=0)
    tr = GraphedTrainer(s, CPU)
    assert tr.model.pos_embedding is not None and tr.model.frame_embedding is not None
    calls = []
    real = tr.model.forward

    def spy(x, t, c, **kw):
        out = real(x, t, c, **kw)
        calls.append((x.detach(), t.detach(), out.detach()))
        return out

    tr.model.forward = spy
    loss = tr._loss().item()
    (xt, t, out), = calls
    sigma = (t.double() / 1000)[..., None, None, None]
    per_frame = (out.double() - (xt.double() - clip.double()) / sigma).pow(2).mean(dim=(2, 3, 4))
    w = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert loss == pytest.approx((per_frame * w / w.mean()).mean().item(), rel=1e-4)
    tr.model.forward = real
    tr.run(log=lambda *_: None)
    state, cfg = load_dit_weights(tmp_path / "run" / "final")
    assert cfg.abs_pos_freqs == 2 and state["pos_embedding.weight"].abs().max() > 0
    assert cfg.abs_time_frames == 3 and state["frame_embedding.weight"].abs().max() > 0
    assert main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "x"), "--max-steps", "1",
                 "--early-weight", "0"]) == 2
