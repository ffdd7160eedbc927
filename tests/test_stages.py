"""Every training stage end to end on tiny random data (the recipe's wiring), plus stage-specific truths."""
import json

import pytest
import torch

from causal_forcing.data.latents import LatentDataset, write_dataset
from causal_forcing.errors import ConfigError
from causal_forcing.training import run_stage

F, HW = 3, 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    g = torch.Generator().manual_seed(0)
    write_dataset(root / "clean", ((torch.randn(F, 16, HW, HW, generator=g), {"id": str(i), "caption": f"c{i}"},
                                    torch.randn(8, 32, generator=g)) for i in range(6)), shard_size=4)
    return root


COMMON = ["train.progress=false", "train.save_every=2", "optim.lr=1e-3", "train.log_every=1"]


def _run(stage, out, *extra, resume=False):
    return run_stage(stage, None, [f"train.out_dir={out}", *COMMON, *extra], resume=resume)


@pytest.fixture(scope="module")
def teachers(work):
    bidir = _run("bidirectional", work / "bidir", f"data.path={work / 'clean'}", "train.max_steps=2")
    ar = _run("ar-diffusion", work / "ar", f"data.path={work / 'clean'}", "train.max_steps=2",
              f"train.init={bidir}")
    return bidir, ar


def test_ode_data_causal_and_bidirectional(work, teachers):
    bidir, ar = teachers
    out = work / "ode_causal"
    _run("ode-data", work / "ode_run", f"data.path={work / 'clean'}", f"stage.teacher={ar}", f"stage.out={out}",
         "stage.steps=8", "stage.keep=[0,2,4,6,-2,-1]", "stage.shard_size=2")
    ds = LatentDataset(out)
    assert ds.kind == "ode" and len(ds) == 6 and ds[0]["latents"].shape == (6, F, 16, HW, HW)
    clean = LatentDataset(work / "clean")
    by_id = {clean.records[i]["id"]: clean[i]["latents"] for i in range(len(clean))}
    for i in range(len(ds)):  # entry -1 is the ground truth, stored exactly (float32 dataset)
        assert torch.allclose(ds[i]["latents"][-1], by_id[ds.records[i]["id"]], atol=1e-3)
    assert ds.meta["timesteps"] == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=0.01)  # = warped 4-step list
    bout = work / "ode_bidir"
    _run("ode-data", work / "ode_run_b", f"data.path={work / 'clean'}", f"stage.teacher={bidir}",
         f"stage.out={bout}", "stage.kind=bidirectional", "stage.steps=8", "stage.keep=[0,2,4,6,-1]")
    assert LatentDataset(bout)[0]["latents"].shape == (5, F, 16, HW, HW)


def test_ode_data_resumes_to_identical_data(work, teachers):
    """Interrupted data generation (only 2 of 6 samples done) continues to the same dataset."""
    _, ar = teachers
    args = [f"data.path={work / 'clean'}", f"stage.teacher={ar}", "stage.steps=4", "stage.keep=[0,1,-2,-1]",
            "stage.shard_size=1"]
    full, part = work / "ode_full", work / "ode_part"
    _run("ode-data", work / "r1", *args, f"stage.out={full}")
    _run("ode-data", work / "r2", *args, f"stage.out={part}", "stage.num_samples=2")
    with pytest.raises(ConfigError, match="--resume"):
        _run("ode-data", work / "r2", *args, f"stage.out={part}")
    _run("ode-data", work / "r2", *args, f"stage.out={part}", resume=True)
    a, b = LatentDataset(full), LatentDataset(part)
    ia = {a.records[i]["id"]: a[i]["latents"] for i in range(len(a))}
    ib = {b.records[i]["id"]: b[i]["latents"] for i in range(len(b))}
    assert ia.keys() == ib.keys() and all(torch.equal(ia[k], ib[k]) for k in ia)


@pytest.mark.parametrize("mode,data", [("causal", "ode_causal"), ("self-forcing", "ode_bidir")])
def test_causal_ode_stage(work, teachers, mode, data):
    if not (work / data).exists():
        pytest.skip("needs test_ode_data_causal_and_bidirectional")
    _, ar = teachers
    out = _run("causal-ode", work / f"codd_{mode}", f"data.path={work / data}", f"stage.mode={mode}",
               f"train.init={ar}", "train.max_steps=2")
    assert (out / "model.safetensors").exists()
    if mode == "self-forcing":
        with pytest.raises(ConfigError, match="causal"):
            _run("causal-ode", work / "bad", f"data.path={work / data}", "stage.mode=causal", "train.max_steps=1")


def test_causal_cd_stage_target_is_the_ema(work, teachers):
    _, ar = teachers
    out = _run("causal-cd", work / "cd", f"data.path={work / 'clean'}", f"train.init={ar}", "train.max_steps=3",
               "stage.grid_steps=8")
    assert (work / "cd" / "final_ema" / "model.safetensors").exists() and out.exists()
    lines = [json.loads(x) for x in (work / "cd" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] >= 0 for x in lines)


def test_dmd_stage_and_exact_resume(work, teachers):
    bidir, ar = teachers
    args = [f"data.path={work / 'clean'}", f"train.init={ar}", f"stage.real_score={bidir}", "stage.update_ratio=2",
            "stage.steps=[1000,500]", "ema.decay=0.5", "ema.start_step=1"]
    full = _run("dmd", work / "dmd_full", *args, "train.max_steps=4")
    _run("dmd", work / "dmd_part", *args, "train.max_steps=2")
    part = _run("dmd", work / "dmd_part", *args, "train.max_steps=4", resume=True)
    from safetensors.torch import load_file
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (work / "dmd_full" / "metrics.jsonl").read_text().splitlines()]
    assert [("generator_loss" in x) for x in lines] == [True, False, True, False]
    assert all("critic_loss" in x for x in lines)


@pytest.mark.parametrize("score_layout", ["bidirectional", "teacher_forcing"])
def test_dmd_generator_gradient_is_normalised_score_difference(score_layout):
    """Spec §14: ∂loss/∂x = (x0_fake − x0_real) / mean|x − x0_real| / numel. With ``score_layout:
    teacher_forcing`` both scores also get the rollout itself as the clean history (an AR teacher as real score)."""
    from causal_forcing.models.attention import TeacherForcing
    from causal_forcing.training.dmd import Stage

    seen = []

    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x, t, ctx, **kw):
            seen.append(kw)
            return self.v.expand_as(x)

    class Tr:
        gen = torch.Generator().manual_seed(0)
        device = torch.device("cpu")

        class cfg:
            class stage:
                shift, t_min, t_max, guidance, block_size = 5.0, 20.0, 980.0, 3.0, 1

        cfg.stage.score_layout = score_layout

        def randint(self, lo, hi, shape):
            return torch.randint(lo, hi, shape, generator=self.gen)

        def randn(self, shape):
            return torch.randn(shape, generator=self.gen)

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

    st = Stage.__new__(Stage)
    st.fake, st.real = Const(torch.tensor(0.3)), Const(torch.tensor(-0.2))

    class Neg:
        def negative(self, c):
            return c

    st.cond = Neg()
    x = torch.randn(1, 2, 4, 3, 3, requires_grad=True)
    tr = Tr()
    loss = st.generator_loss(tr, x, torch.zeros(1, 1, 1))
    loss.backward()
    # Recompute the expected gradient with the same draws.
    tr.gen.manual_seed(0)
    from causal_forcing.training.common import dmd_timesteps
    t = dmd_timesteps(tr, 1, 5.0)
    sigma = float(t) / 1000
    eps = tr.randn(tuple(x.shape))
    xt = (1 - sigma) * x.detach() + sigma * eps
    x0_fake, x0_c = xt - sigma * 0.3, xt + sigma * 0.2
    x0_real = x0_c + 3.0 * (x0_c - x0_c)
    expected = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean() / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert len(seen) == 3                                          # fake, real conditional, real unconditional
    for kw in seen:
        if score_layout == "bidirectional":
            assert kw == {}
        else:
            assert kw["layout"] == TeacherForcing(1) and torch.equal(kw["clean_x"], x.detach())


def test_ode_data_default_keep_points_are_the_four_step_timesteps():
    """Whatever the grid length, the default kept points are the warped 4-step timesteps (1000, 750, 500, 250
    before the shift-5 warp), which is what the few-step student is trained at."""
    from causal_forcing.errors import ConfigError
    from causal_forcing.schedulers.flow import warp_timesteps
    from causal_forcing.training.ode_data import Config, _kept_timesteps
    expected = [float(t) for t in warp_timesteps([1000.0, 750.0, 500.0, 250.0], 5.0)]
    for steps in (16, 32, 48):
        for kind, tail in (("causal", [-2, -1]), ("bidirectional", [-1])):
            cfg = Config(teacher="t", out="o", steps=steps, kind=kind)
            assert cfg.keep_indices()[4:] == tail
            assert _kept_timesteps(cfg) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ConfigError, match="multiple of 4"):
        Config(teacher="t", out="o", steps=30).validate()
