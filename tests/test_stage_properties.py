"""Per-stage properties of the training pipeline, on tiny models and tiny structured data.

For every trained stage: a short run lowers the stage's loss at a fixed draw (same data, noise and timesteps)
below the initial model's, and the exported weights drive the library's sampler exactly like the trained
module. Then each stage's defining property, checked against quantities recomputed here from the spec
(§4–7) rather than taken from the stage: the stage-1 loss is the weighted flow MSE with ground-truth clean
context; ODE data is the teacher's Euler solution for the ground-truth history; ODE regression targets the
ODE solution from stored trajectory points; the CD target is the EMA network and the teacher step one CFG
Euler step; DMD's generator gradient flows through each block's exit step only, the critic loss is the flow
loss on detached samples, and the update ratio holds. Last, periodic samples + ShapesBench scores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fan_in_init
from safetensors.torch import load_file

from causal_forcing.checkpoints import load_dit_weights, load_into, save_model_folder
from causal_forcing.config import model_preset
from causal_forcing.data.latents import LatentDataset, write_dataset
from causal_forcing.models.attention import BlockCausal, TeacherForcing
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines.streaming import CausalStream, StreamConfig
from causal_forcing.pipelines.teacher import (
    ode_trajectory_bidirectional,
    ode_trajectory_teacher_forcing,
    sample_autoregressive,
    sample_bidirectional,
)
from causal_forcing.schedulers.flow import FewStepSchedule
from causal_forcing.training import load_stage_config, run_stage, stage_module
from causal_forcing.training.ode_data import sample_seed
from causal_forcing.training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


F, C, HW = 3, 16, 8
TINY = model_preset("tiny")
COMMON = ["train.progress=false", "train.save_every=1000", "train.log_every=1000"]
ODE_STEPS = 8                  # the 8-step grid at 0, 2, 4, 6 is the warped 4-step list, like 48 at 0/12/24/36
ODE_KEEP = [0, 2, 4, 6, -2, -1]


# ---------------------------------------------------------------------------------------------------------
# Independent references (spec §2), written out here rather than imported from the library
# ---------------------------------------------------------------------------------------------------------
def shift(s: torch.Tensor | float, k: float) -> torch.Tensor | float:
    return k * s / (1 + (k - 1) * s)


def training_grid_t(k: float) -> torch.Tensor:
    """The 1000-step training grid's timesteps: 1000·shift(linspace(1, 0, 1001)[:-1])."""
    return 1000.0 * shift(torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1], k)


def bsmntw(t: torch.Tensor, k: float) -> torch.Tensor:
    """Stage-1 weights w(t): exp(−2((t − 500)/1000)²) over the grid, minimum shifted to 0, summing to 1000."""
    grid = training_grid_t(k)
    y = torch.exp(-2 * ((grid - 500) / 1000) ** 2)
    y = (y - y.min()) * 1000 / (y - y.min()).sum()
    return y[(t.double()[..., None] - grid).abs().argmin(-1)]


def euler_grid_sigma(steps: int, k: float) -> torch.Tensor:
    """σ of an N-step shifted Euler grid: shift(linspace(1, 0, N + 1)[:-1])."""
    return shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1], k)


WARPED_4STEP = [1000.0 * shift(s / 1000.0, 5.0) for s in (1000.0, 750.0, 500.0, 250.0)]


# ---------------------------------------------------------------------------------------------------------
# Fixtures: structured data (two clips, each repeated) and tiny random teachers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage_props")


@pytest.fixture(scope="module")
def clean(root) -> Path:
    """Six samples = two clips × three copies; values exact in float16 (the dataset's storage type)."""
    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(F, C, HW, HW, generator=g).half().float() for _ in range(2)]
    ctxs = [torch.randn(TINY.text_len, TINY.text_dim, generator=g).half().float() for _ in range(2)]
    return write_dataset(root / "clean", ((clips[i % 2], {"id": f"s{i}", "caption": f"clip {i % 2}"}, ctxs[i % 2])
                                          for i in range(6)), shard_size=4)


@pytest.fixture(scope="module")
def teachers(root) -> dict[str, Path]:
    """Random tiny networks with every path active: the AR teacher / student init and the bidirectional one."""
    return {name: save_model_folder(fan_in_init(WanDiT(TINY), seed), TINY, root / name)
            for name, seed in (("ar", 1), ("bidir", 2))}


def _ode(root: Path, clean: Path, teacher: Path, name: str, *extra: str) -> Path:
    out = root / name
    run_stage("ode-data", None, [f"train.out_dir={root / ('run_' + name)}", *COMMON, f"data.path={clean}",
                                 f"stage.teacher={teacher}", f"stage.out={out}", f"stage.steps={ODE_STEPS}",
                                 "stage.shard_size=4", *extra])
    return out


@pytest.fixture(scope="module")
def ode_causal(root, clean, teachers) -> Path:
    return _ode(root, clean, teachers["ar"], "ode_causal", f"stage.keep={ODE_KEEP}")


@pytest.fixture(scope="module")
def ode_bidir(root, clean, teachers) -> Path:
    return _ode(root, clean, teachers["bidir"], "ode_bidir", "stage.kind=bidirectional", "stage.keep=[0,2,4,6,-1]")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def make_trainer(stage: str, out: Path, *overrides: str) -> Trainer:
    cfg = load_stage_config(stage, None, [f"train.out_dir={out}", *COMMON, *overrides])
    return Trainer(cfg, stage_module(stage).Stage())


def load_model(path: Path) -> WanDiT:
    state, cfg = load_dit_weights(path)
    model = WanDiT(cfg)
    load_into(model, state)
    return model.eval()


class Calls:
    """Every forward call of a module: inputs, keyword arguments, output and whether grad was enabled."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[SimpleNamespace] = []
        self._handle = module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        cache = kwargs.get("cache")
        cached_grad = cache is not None and any(t.requires_grad for t in cache.k + cache.v)
        self.calls.append(SimpleNamespace(x=args[0].detach(), t=torch.as_tensor(args[1]).detach(),
                                          ctx=args[2].detach(), kw=kwargs, out=output.detach(),
                                          grad=torch.is_grad_enabled(), cached_grad=cached_grad))

    def remove(self) -> None:
        self._handle.remove()


def capture_step(tr: Trainer, *, update: bool = False) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run one stage step, recording the loss handed to each optimizer update and the batches drawn.
    Without ``update`` the optimizer steps are skipped (weights unchanged)."""
    losses: dict[str, torch.Tensor] = {}
    batches: list[dict] = []

    def optimize(name: str, loss: torch.Tensor) -> dict[str, float]:
        losses[name] = loss.detach()
        return Trainer.optimize(tr, name, loss) if update else {}

    streams = {n: s.next for n, s in tr.streams.items()}
    for n, s in tr.streams.items():
        s.next = lambda nxt=streams[n]: batches.append(nxt()) or batches[-1]
    tr.optimize = optimize
    try:
        tr.stage.step(tr)
    finally:
        del tr.optimize
        for s in tr.streams.values():
            del s.next
    return losses, batches


def losses_at_fixed_draw(tr: Trainer, streams: dict[str, Any], seed: int = 1234) -> dict[str, float]:
    """The stage's losses for the current weights at one fixed draw: the trainer's generator reseeded, data
    streams rewound to ``streams``, step counter 0; nothing is updated and every state is restored."""
    gen, step = tr.gen.get_state(), tr.step
    positions = {n: s.state_dict() for n, s in tr.streams.items()}
    tr.gen.manual_seed(seed)
    tr.step = 0
    for n, s in tr.streams.items():
        s.load_state_dict(streams[n])
    try:
        losses, _ = capture_step(tr)
    finally:
        tr.gen.set_state(gen)
        tr.step = step
        for n, s in tr.streams.items():
            s.load_state_dict(positions[n])
    return {k: v.item() for k, v in losses.items()}


def ground_truth(dataset: Path, records: list[dict]) -> torch.Tensor:
    """The stored latents of ``records`` (looked up by id in the dataset itself)."""
    ds = LatentDataset(dataset)
    index = {r["id"]: i for i, r in enumerate(ds.records)}
    return torch.stack([ds[index[r["id"]]]["latents"] for r in records])


def sample_with(model: WanDiT, kind: str, block: int) -> torch.Tensor:
    """A short run of the sampler a stage's output is meant for."""
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)
    neg = torch.zeros_like(ctx)
    with torch.no_grad():
        if kind == "bidirectional":
            return sample_bidirectional(model, ctx, neg, shape=(1, F, C, HW, HW), steps=3, guidance=2.0, generator=0)
        if kind == "autoregressive":
            return sample_autoregressive(model, ctx, neg, num_frames=F, latent_hw=(HW, HW), block_size=block,
                                         steps=3, guidance=2.0, generator=0)
        return CausalStream(model, ctx, latent_hw=(HW, HW), num_frames=F, config=StreamConfig(block_size=block),
                            seed=0).generate()


# ---------------------------------------------------------------------------------------------------------
# Every stage: the loss falls at a fixed draw, and the export drives the sampler
# ---------------------------------------------------------------------------------------------------------
ADAM = ["optim.betas=[0.9,0.99]", "data.batch_size=2"]
RUNS = {  # stage, data fixture, overrides, loss checked, ratio it must fall below, sampler, block size
    "bidirectional": ("bidirectional", "clean", ["optim.lr=3e-3", "train.max_steps=40"], "generator", 0.95,
                      "bidirectional", 1),
    "ar-diffusion": ("ar-diffusion", "clean", ["optim.lr=3e-3", "train.max_steps=40", "stage.block_size=2"],
                     "generator", 0.95, "autoregressive", 2),
    "causal-ode": ("causal-ode", "ode_causal", ["optim.lr=1e-3", "train.max_steps=25", "train.init={ar}"],
                   "generator", 0.5, "causal", 1),
    "causal-ode-self-forcing": ("causal-ode", "ode_bidir", ["optim.lr=1e-3", "train.max_steps=25",
                                                            "train.init={ar}", "stage.mode=self-forcing"],
                                "generator", 0.5, "causal", 1),
    "causal-cd": ("causal-cd", "clean", ["optim.lr=1e-3", "train.max_steps=25", "train.init={ar}",
                                         "stage.grid_steps=8"], "generator", 0.5, "causal", 1),
    "dmd": ("dmd", "clean", ["optim.lr=1e-5", "train.max_steps=25", "train.init={ar}", "stage.real_score={bidir}",
                             "stage.lr_critic=3e-3", "stage.betas_critic=[0.9,0.99]", "stage.steps=[1000,500]"],
            "critic", 0.8, "causal", 1),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_short_run_lowers_the_fixed_draw_loss_and_export_drives_the_sampler(run, root, teachers, request):
    stage, data, overrides, key, ratio, kind, block = RUNS[run]
    path = request.getfixturevalue(data)
    args = [a.format(**{k: str(v) for k, v in teachers.items()}) for a in overrides]
    tr = make_trainer(stage, root / f"run_{run}", f"data.path={path}", *ADAM, *args)
    start = {n: s.state_dict() for n, s in tr.streams.items()}
    before = losses_at_fixed_draw(tr, start)
    final = tr.run()
    after = losses_at_fixed_draw(tr, start)
    assert after[key] < ratio * before[key], (before, after)
    trained = tr.trainables["generator"].raw.eval()
    exported = load_model(final)
    a, b = sample_with(exported, kind, block), sample_with(trained, kind, block)
    assert a.shape == (1, F, C, HW, HW) and torch.isfinite(a).all() and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Stage 1: AR diffusion by teacher forcing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("early", [None, (1, 3.0)])
def test_ar_diffusion_loss_is_weighted_flow_mse_with_ground_truth_clean_context(root, clean, teachers, early):
    extra = [] if early is None else [f"stage.early_frames={early[0]}", f"stage.early_weight={early[1]}"]
    tr = make_trainer("ar-diffusion", root / f"ar_loss_{early is None}", f"data.path={clean}",
                      f"train.init={teachers['ar']}", "data.batch_size=3", "stage.block_size=2", *extra)
    calls = Calls(tr.stage.model)
    losses, batches = capture_step(tr)
    calls.remove()
    (call,), (batch,) = calls.calls, batches
    x0 = ground_truth(clean, batch["records"])
    # The noisy frames attend to the ground-truth clean latents of the batch, at clean timestep 0.
    assert call.kw["layout"] == TeacherForcing(2)
    assert torch.equal(call.kw["clean_x"], x0) and call.kw["clean_t"] is None
    assert torch.equal(call.ctx, batch["context"])
    # Timesteps: points of the shift-5 training grid, one level per block of 2 frames ([0, 1], [2]).
    t = call.t
    assert t.shape == (3, F) and torch.equal(t[:, 0], t[:, 1])
    assert ((t.double()[..., None] - training_grid_t(5.0)).abs().min(-1).values < 1e-3).all()
    # Loss = mean over (B, F) of w(t) · mean_CHW (v̂ − (ε − x0))², with ε − x0 = (x_t − x0) / σ, σ = t / 1000.
    sigma = (t.double() / 1000)[..., None, None, None]
    target = (call.x.double() - x0.double()) / sigma
    per_frame = (call.out.double() - target).pow(2).mean(dim=(2, 3, 4))
    # Optional frame weights: the first frames count early_weight times as much, weights normalised to mean 1.
    frame_w = torch.ones(F, dtype=torch.float64)
    if early is not None:
        frame_w[:early[0]] = early[1]
        frame_w = frame_w * F / frame_w.sum()
    expected = (bsmntw(t, 5.0) * per_frame * frame_w).mean()
    assert losses["generator"].item() == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Stage 2a data: ODE trajectories
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,block", [("blockwise-kv", 1), ("teacher-forcing", 2)])
def test_ode_data_is_the_teachers_ode_solution_for_the_ground_truth_history(root, clean, teachers, method, block):
    out = _ode(root, clean, teachers["ar"], f"ode_{method}", f"stage.keep={ODE_KEEP}", f"stage.method={method}",
               f"stage.block_size={block}", "train.seed=7", "stage.batch_size=2")
    data, source = LatentDataset(out), LatentDataset(clean)
    assert data.meta["timesteps"] == pytest.approx(WARPED_4STEP, abs=1e-3)
    teacher = load_model(teachers["ar"])
    for i, rec in enumerate(data.records):
        stored = data[i]["latents"]
        x0 = ground_truth(clean, [rec])
        ctx = source[source.records.index(rec)]["context"][None]
        noise = torch.randn((F, C, HW, HW), generator=torch.Generator().manual_seed(sample_seed(7, rec["id"])))
        ref = ode_trajectory_teacher_forcing(teacher, ctx, torch.zeros_like(ctx), x0, block_size=block,
                                             steps=ODE_STEPS, shift=5.0, guidance=6.0, keep=ODE_KEEP,
                                             noise=noise[None])[0]
        assert torch.equal(stored[0], noise)          # x at t = 1000 is the sample's own seeded noise
        assert torch.equal(stored[-1], x0[0])         # entry −1 is the ground truth
        assert torch.allclose(stored, ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(stored[-2], x0[0], atol=1e-2)   # the solution is the teacher's, not the data


def test_bidirectional_ode_data_is_the_bidirectional_teachers_solution(ode_bidir, clean, teachers):
    data, source = LatentDataset(ode_bidir), LatentDataset(clean)
    teacher = load_model(teachers["bidir"])
    rec = data.records[0]
    ctx = source[source.records.index(rec)]["context"][None]
    noise = torch.randn((F, C, HW, HW), generator=torch.Generator().manual_seed(sample_seed(0, rec["id"])))
    ref = ode_trajectory_bidirectional(teacher, ctx, torch.zeros_like(ctx), noise=noise[None], steps=ODE_STEPS,
                                       shift=5.0, guidance=6.0, keep=[0, 2, 4, 6, -1])[0]
    assert torch.allclose(data[0]["latents"], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Stage 2a: ODE regression
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,data", [("causal", "ode_causal"), ("self-forcing", "ode_bidir"),
                                       ("self-forcing", "ode_causal")])
def test_causal_ode_regresses_the_ode_solution_from_stored_trajectory_points(root, teachers, request, mode, data):
    path = request.getfixturevalue(data)
    tr = make_trainer("causal-ode", root / f"codd_{mode}_{data}", f"data.path={path}", f"train.init={teachers['ar']}",
                      f"stage.mode={mode}", "data.batch_size=4", "train.seed=3")
    calls = Calls(tr.stage.model)
    losses, batches = capture_step(tr)
    calls.remove()
    (call,), (batch,) = calls.calls, batches
    ds = LatentDataset(path)
    ode = ground_truth(path, batch["records"])                     # [B, K, F, C, H, W]
    keep, times = ds.meta["keep"], ds.meta["timesteps"]
    solution = ode[:, keep.index(-2 if ds.meta["teacher_kind"] == "causal" else -1)]
    # Inputs are stored trajectory points, each at its own stored timestep.
    distance = (call.t.double()[..., None] - torch.tensor(times, dtype=torch.float64)).abs()
    assert (distance.min(-1).values < 1e-3).all()
    k = distance.argmin(-1)
    for b in range(ode.shape[0]):
        for f in range(F):
            assert torch.equal(call.x[b, f], ode[b, k[b, f], f])
    if mode == "causal":
        assert (k == k[:, :1]).all()                               # one step index for every frame
        assert call.kw["layout"] == TeacherForcing(1) and torch.equal(call.kw["clean_x"], ode[:, -1])
    else:
        assert call.kw["layout"] == BlockCausal(1) and call.kw.get("clean_x") is None
        assert (k != k[:, :1]).any()                               # independent step index per block
    x0_pred = call.x.double() - call.t.double()[..., None, None, None] / 1000 * call.out.double()
    expected = (x0_pred - solution.double()).pow(2).mean()
    assert losses["generator"].item() == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Stage 2b: causal consistency distillation
# ---------------------------------------------------------------------------------------------------------
def _cd_trainer(root: Path, name: str, clean: Path, teachers: dict[str, Path], *extra: str) -> Trainer:
    return make_trainer("causal-cd", root / name, f"data.path={clean}", f"train.init={teachers['ar']}",
                        f"stage.teacher={teachers['bidir']}", "stage.grid_steps=8", "data.batch_size=2", *extra)


def test_causal_cd_target_network_is_the_ema_of_the_student(root, clean, teachers):
    tr = _cd_trainer(root, "cd_ema", clean, teachers, "stage.target_decay=0.5", "optim.lr=1e-2",
                     "train.max_steps=3")
    tr.run()
    shadow = tr.trainables["generator"].ema.shadow
    ema_net = WanDiT(TINY)
    ema_net.load_state_dict(shadow)
    assert all(torch.equal(shadow[k], v) for k, v in load_file(str(root / "cd_ema" / "final_ema" /
                                                                    "model.safetensors")).items())
    g = torch.Generator().manual_seed(9)
    x, clean_x = torch.randn(2, F, C, HW, HW, generator=g), torch.randn(2, F, C, HW, HW, generator=g)
    ctx = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    t = torch.full((2, F), 700.0)
    target = tr.stage._target_x0(tr, x, t, ctx, clean_x)
    with torch.no_grad():
        by_ema = x - 0.7 * ema_net(x, t, ctx, layout=TeacherForcing(1), clean_x=clean_x)
        by_student = x - 0.7 * tr.trainables["generator"].raw(x, t, ctx, layout=TeacherForcing(1), clean_x=clean_x)
    assert torch.allclose(target, by_ema, atol=1e-5)
    assert not torch.allclose(target, by_student, atol=1e-3)    # the EMA really differs from the student


def test_causal_cd_teacher_step_is_one_cfg_euler_step(root, clean, teachers):
    tr = _cd_trainer(root, "cd_step", clean, teachers, "stage.guidance=3.0")
    student, teacher = Calls(tr.stage.model), Calls(tr.stage.teacher)
    losses, (batch,) = capture_step(tr)
    student.remove(), teacher.remove()
    x0, ctx = ground_truth(clean, batch["records"]), batch["context"]
    cond, uncond = teacher.calls
    target_call, student_call = student.calls                      # no EMA yet: the target is the student
    assert not target_call.grad and student_call.grad and not cond.grad
    for call in (cond, uncond, target_call, student_call):
        assert call.kw["layout"] == TeacherForcing(1) and torch.equal(call.kw["clean_x"], x0)
    assert torch.equal(cond.ctx, ctx) and torch.equal(uncond.ctx, torch.zeros_like(ctx))
    assert torch.equal(cond.x, uncond.x) and torch.equal(cond.x, student_call.x)
    # t = t_n on the 8-step shift-5 grid (all frames), the target sees t_{n+1}.
    sig = euler_grid_sigma(8, 5.0)
    n = [int((sig * 1000 - row[0]).abs().argmin()) for row in cond.t.tolist()]
    assert all(0 <= m <= 6 for m in n)
    sig_n, sig_next = sig[n][:, None], sig[[m + 1 for m in n]][:, None]
    assert torch.allclose(cond.t.double(), 1000 * sig_n.expand(-1, F), atol=1e-3)
    assert torch.allclose(target_call.t.double(), 1000 * sig_next.expand(-1, F), atol=1e-3)
    # x_{t'} = x_t + (σ_{n+1} − σ_n) · (v_u + 3 (v_c − v_u)).
    v = uncond.out.double() + 3.0 * (cond.out.double() - uncond.out.double())
    expected_next = cond.x.double() + (sig_next - sig_n)[..., None, None, None] * v
    assert torch.allclose(target_call.x.double(), expected_next, atol=1e-5)
    # Loss = MSE between the student's x0 at (x_t, t_n) and the target's x0 at (x_{t'}, t_{n+1}).
    pred = student_call.x.double() - sig_n[..., None, None, None] * student_call.out.double()
    target = target_call.x.double() - sig_next[..., None, None, None] * target_call.out.double()
    assert losses["generator"].item() == pytest.approx((pred - target).pow(2).mean().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Stage 3: DMD
# ---------------------------------------------------------------------------------------------------------
def _dmd_trainer(root: Path, name: str, clean: Path, teachers: dict[str, Path], *extra: str) -> Trainer:
    return make_trainer("dmd", root / name, f"data.path={clean}", f"train.init={teachers['ar']}",
                        f"stage.real_score={teachers['bidir']}", "data.batch_size=2", *extra)


def test_dmd_generator_gradient_flows_only_through_each_blocks_exit_step(root, clean, teachers):
    tr = _dmd_trainer(root, "dmd_grad", clean, teachers, "stage.same_step_across_blocks=false", "train.seed=4")
    stage = tr.stage
    exits: list[dict[int, int]] = []
    draw = stage._exit_steps
    stage._exit_steps = lambda trainer: exits.append(draw(trainer)) or exits[-1]
    calls = Calls(stage.gen_model)
    ctx = torch.randn(2, TINY.text_len, TINY.text_dim)
    x = stage.rollout(tr, ctx, grad=True)
    calls.remove()
    steps = FewStepSchedule.from_config([1000, 750, 500, 250]).steps
    (exit_of,) = exits
    assert len(set(exit_of.values())) > 1                          # blocks really stop at different steps
    assert not any(c.cached_grad for c in calls.calls)             # cached K/V never require grad
    for b in range(F):
        mine = [c for c in calls.calls if c.kw["start_frame"] == b]
        denoise = [c for c in mine if c.t.max() > 0]
        commits = [c for c in mine if c.t.max() == 0]
        assert len(denoise) == exit_of[b] + 1 and len(commits) == (b < F - 1)
        assert [c.grad for c in mine] == [False] * exit_of[b] + [True] + [False] * len(commits)
        assert denoise[-1].t.unique().tolist() == [pytest.approx(steps[exit_of[b]])]
    assert x.requires_grad
    x.square().sum().backward()
    grads = [p.grad for p in stage.gen_model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_dmd_critic_loss_is_flow_loss_on_detached_generator_samples(root, clean, teachers):
    tr = _dmd_trainer(root, "dmd_critic", clean, teachers, "stage.update_ratio=2", "stage.steps=[1000,500]")
    stage = tr.stage
    samples: list[tuple[torch.Tensor, bool]] = []
    rollout = stage.rollout
    stage.rollout = lambda trainer, c, grad: samples.append((rollout(trainer, c, grad), grad)) or samples[-1][0]
    tr.step = 1                                                    # a critic-only step of the 1:2 schedule
    generator_before = {k: v.clone() for k, v in stage.gen_model.state_dict().items()}
    fake = Calls(stage.fake)
    losses, _ = capture_step(tr, update=True)
    fake.remove()
    (x, grad), (call,) = samples[0], fake.calls
    assert set(losses) == {"critic"} and grad is False and not x.requires_grad
    sigma = call.t.double()[:, None, None, None, None] / 1000
    flow_target = (call.x.double() - x.double()) / sigma          # ε − x, recovered from x_t = (1 − σ)x + σε
    expected = (call.out.double() - flow_target).pow(2).mean()
    assert losses["critic"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(torch.equal(v, generator_before[k]) for k, v in stage.gen_model.state_dict().items())
    assert all(p.grad is None for p in stage.gen_model.parameters())
    # Even on samples that carry the generator's graph, the critic loss sends nothing back to the generator.
    stage.rollout = rollout
    x = stage.rollout(tr, torch.randn(2, TINY.text_len, TINY.text_dim), grad=True)
    stage.critic_loss(tr, x, torch.randn(2, TINY.text_len, TINY.text_dim)).backward()
    assert x.requires_grad and all(p.grad is None for p in stage.gen_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.fake.parameters())


def test_dmd_update_ratio_is_respected(root, clean, teachers):
    tr = _dmd_trainer(root, "dmd_ratio", clean, teachers, "stage.update_ratio=3", "stage.steps=[1000]",
                      "train.max_steps=7")
    order: list[tuple[int, str]] = []
    tr.optimize = lambda name, loss: order.append((tr.step, name)) or Trainer.optimize(tr, name, loss)
    tr.run()
    expected = []
    for s in range(7):
        expected += [(s, "generator")] * (s % 3 == 0) + [(s, "critic")]
    assert order == expected
    assert tr.trainables["generator"].updates == 3 and tr.trainables["critic"].updates == 7


# ---------------------------------------------------------------------------------------------------------
# Periodic samples and ShapesBench scores
# ---------------------------------------------------------------------------------------------------------
MINILM = 384


@pytest.fixture(scope="module")
def sampling_setup(root) -> dict[str, Path]:
    """Latents with MiniLM-sized text, a tiny random SmallVAE and a 3-prompt eval manifest (32 px, 17 frames)."""
    from causal_forcing.data import shapes
    from causal_forcing.data.shapes_io import write_manifest
    from causal_forcing.models.small_vae import SmallVAE, SmallVAEConfig
    g = torch.Generator().manual_seed(0)
    latents = write_dataset(root / "latents384", ((torch.randn(5, C, 4, 4, generator=g), {"id": str(i)},
                                                   torch.randn(8, MINILM, generator=g)) for i in range(4)))
    torch.manual_seed(0)
    vae = SmallVAE(SmallVAEConfig(encoder_channels=(4, 4, 4, 8), encoder_blocks=(0, 0),
                                  decoder_channels=(8, 4, 4, 4), decoder_blocks=(0, 0, 0))).save_folder(root / "vae")
    prompts = shapes.standard_eval_prompts()[:3]
    manifest = root / "eval" / "manifest.jsonl"
    manifest.parent.mkdir()
    write_manifest(manifest, [{"file": f"eval_{p.index:03d}.npz", "caption": p.caption, "size": 32, "frames": 17}
                              for p in prompts])
    return {"latents": latents, "vae": vae, "manifest": manifest}


def _sampling_run(out: Path, setup: dict[str, Path], stage: str, kind: str | None, steps: int,
                  resume: bool = False, extra: tuple[str, ...] = ()) -> Trainer:
    """A short run of the tiny model with MiniLM-sized text, sampling every step when ``kind`` is given."""
    from causal_forcing.training.sampling import sample_and_score
    cfg = load_stage_config(stage, None, [f"train.out_dir={out}", "train.progress=false", "train.save_every=1",
                                          f"data.path={setup['latents']}", "data.batch_size=2", "optim.lr=1e-2",
                                          "model.overrides={text_dim: 384}", f"train.max_steps={steps}",
                                          "ema.decay=0.5", "stage.block_size=1",
                                          f"train.sample_every={1 if kind else 0}", *extra])
    cfg.train.sample_manifest, cfg.train.sample_vae, cfg.train.sample_count = (
        str(setup["manifest"]), str(setup["vae"]), 2)
    st = stage_module(stage).Stage()
    if kind:
        st.sample = lambda trainer: sample_and_score(trainer, kind)
    tr = Trainer(cfg, st, resume=resume)
    tr.run()
    return tr


@pytest.mark.parametrize("stage,kind", [("bidirectional", "bidirectional"), ("ar-diffusion", "autoregressive"),
                                        ("ar-diffusion", "causal")])
def test_periodic_samples_write_videos_scores_and_a_log(root, sampling_setup, stage, kind, monkeypatch):
    from causal_forcing.data import shapes
    from causal_forcing.data.shapes_io import load_clip
    from causal_forcing.training import sampling
    seen: list[WanDiT] = []
    evaluate = sampling.evaluate
    monkeypatch.setattr(sampling, "evaluate", lambda model, *a, **k: seen.append(model) or evaluate(model, *a, **k))
    out = root / f"samples_{kind}"
    _sampling_run(out, sampling_setup, stage, kind, steps=2)
    lines = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"], r["weights"]) for r in lines] == [(1, kind, "ema"), (2, kind, "ema")]
    captions = [shapes.canonical_caption(shapes.parse_caption(json.loads(ln)["caption"]))
                for ln in sampling_setup["manifest"].read_text().splitlines()[:2]]
    for step, row in zip((1, 2), lines):
        folder = out / "samples" / f"step-{step:08d}"
        report = json.loads((folder / "scores.json").read_text())
        assert [c["caption"] for c in report["clips"]] == captions and report["n_errors"] == 0
        assert row["all.total"] == pytest.approx(np.mean([c["total"] for c in report["clips"]]))
        videos = sorted(folder.glob("*.mp4"))
        assert [v.stem for v in videos] == ["eval_000", "eval_001"]
        assert load_clip(videos[0]).shape == (17, 32, 32, 3)
    # The samples of the last step come from the EMA weights the run exports, not from the raw weights.
    ema, raw = load_file(str(out / "final_ema" / "model.safetensors")), load_file(str(out / "final" /
                                                                                      "model.safetensors"))
    last = seen[-1].state_dict()
    assert all(torch.equal(last[k], ema[k]) for k in ema) and not all(torch.equal(last[k], raw[k]) for k in raw)


def test_periodic_samples_are_as_long_as_the_training_clips(root, sampling_setup):
    """With data.max_frames=2 the run trains on 2 latent frames, so its samples have 1 + 4 = 5 pixel frames."""
    from causal_forcing.data.shapes_io import load_clip
    out = root / "samples_short"
    _sampling_run(out, sampling_setup, "bidirectional", "bidirectional", steps=1, extra=("data.max_frames=2",))
    videos = sorted((out / "samples" / "step-00000001").glob("*.mp4"))
    assert videos and all(load_clip(v).shape == (5, 32, 32, 3) for v in videos)


def test_sampling_leaves_training_unchanged_and_resume_keeps_one_line_per_step(root, sampling_setup):
    with_samples = _sampling_run(root / "with", sampling_setup, "ar-diffusion", "causal", steps=2)
    without = _sampling_run(root / "without", sampling_setup, "ar-diffusion", None, steps=2)
    a = with_samples.trainables["generator"].raw.state_dict()
    b = without.trainables["generator"].raw.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = root / "with" / "samples.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 3, "stale": True}) + "\n")  # sampled, then killed
    _sampling_run(root / "with", sampling_setup, "ar-diffusion", "causal", steps=3, resume=True)
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "stale" not in rows[-1]
    assert math.isfinite(rows[-1]["seconds"])
