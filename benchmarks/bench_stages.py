"""Training throughput of every stage on the ShapesWorld presets: seconds per step and steps per second.

    python benchmarks/bench_stages.py [--steps 4] [--ode-samples 8] [--threads N] [--stages STAGE ...]

In a temporary folder: a random latent dataset at ShapesWorld size (21 latent frames of 16×8×8 with 32×384
MiniLM-sized text embeddings) and tiny random teachers at the ``shapes`` model preset. Each stage then runs
through ``run_stage`` with its ``configs/shapes/*.yaml`` preset (batch sizes, precision, optimiser as shipped;
EMA switched on from step 0 so its cost is included) for a few steps; each step's wall time is measured around
the stage's ``step`` (the first step left out as warm-up). The best step and the mean are reported, rates from
the best: on a shared machine the best is the least disturbed measurement. ``ode-data`` is timed as one batch of
``--ode-samples`` trajectories (48 Euler steps with CFG, teacher loading included). DMD runs 7 steps of the
preset's 1:5 update ratio and reports a generator+critic step, a critic-only step and the mean over a cycle.
The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_forcing.checkpoints import save_model_folder  # noqa: E402
from causal_forcing.config import model_preset  # noqa: E402
from causal_forcing.data.latents import write_dataset  # noqa: E402
from causal_forcing.models.wan import WanDiT  # noqa: E402
from causal_forcing.recipes.shapes import CONFIGS  # noqa: E402
from causal_forcing.training import load_stage_config, run_stage, stage_module  # noqa: E402
from causal_forcing.training.trainer import Trainer  # noqa: E402

LATENT_FRAMES, LATENT_CHANNELS, LATENT_HW = 21, 16, 8
TEXT_LEN, TEXT_DIM = 32, 384
STAGES = ("bidirectional", "ar-framewise", "ar-chunkwise", "ode-data", "causal-ode", "causal-cd", "dmd")


def random_teacher(folder: Path, seed: int) -> Path:
    """A ``shapes``-preset network with random weights (Wan's init, plus a non-zero output head)."""
    torch.manual_seed(seed)
    model = WanDiT(model_preset("shapes"))
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return save_model_folder(model, model.config, folder)


def latent_dataset(folder: Path, num: int) -> Path:
    """``num`` random clips at ShapesWorld latent size with MiniLM-sized text embeddings."""
    g = torch.Generator().manual_seed(0)
    return write_dataset(folder, ((torch.randn(LATENT_FRAMES, LATENT_CHANNELS, LATENT_HW, LATENT_HW, generator=g),
                                   {"id": str(i), "caption": f"clip {i}"},
                                   torch.randn(TEXT_LEN, TEXT_DIM, generator=g)) for i in range(num)))


def train(root: Path, name: str, stage: str, config: str, steps: int, *overrides: str) -> tuple[list[float], int]:
    """Run a stage with its ShapesWorld preset for ``steps`` steps: the wall time of each step, the batch size."""
    cfg = load_stage_config(stage, CONFIGS / config, [
        f"train.out_dir={root / 'runs' / name}", f"train.max_steps={steps}", f"train.save_every={steps}",
        "train.progress=false", "ema.start_step=0", *overrides])
    runner = stage_module(stage).Stage()
    step, timings = runner.step, []

    def timed_step(trainer: Trainer) -> dict[str, float]:
        start = time.perf_counter()
        metrics = step(trainer)
        timings.append(time.perf_counter() - start)
        return metrics

    runner.step = timed_step
    Trainer(cfg, runner).run()
    return timings, cfg.data.batch_size


def row(stage: str, batch: int, timings: list[float], unit: str = "step") -> dict:
    """Best and mean wall seconds per step (or per ``unit``) over ``timings``; rates from the best."""
    best = min(timings)
    return {"stage": stage, "batch": batch, "unit": unit, "best_s_per_step": best,
            "mean_s_per_step": statistics.mean(timings), "steps_per_s": 1.0 / best, "samples_per_s": batch / best}


def steady(stage: str, result: tuple[list[float], int]) -> dict:
    """Over the steps after the warm-up step."""
    timings, batch = result
    return row(stage, batch, timings[1:])


def run(root: Path, stages: list[str], steps: int, ode_samples: int) -> list[dict]:
    data = latent_dataset(root / "latents", 16)
    teacher = random_teacher(root / "teacher_ar", 1)
    bidir = random_teacher(root / "teacher_bidir", 2)
    lat, init = f"data.path={data}", f"train.init={teacher}"
    rows = []
    if "bidirectional" in stages:
        rows.append(steady("bidirectional", train(root, "bidir", "bidirectional", "bidirectional.yaml", steps + 1,
                                                  lat)))
    for name, block in (("ar-framewise", 1), ("ar-chunkwise", 3)):
        if name in stages:
            rows.append(steady(f"ar-diffusion (block {block})",
                               train(root, name, "ar-diffusion", "ar_diffusion.yaml", steps + 1, lat, init,
                                     f"stage.block_size={block}")))
    ode = root / "ode"
    if {"ode-data", "causal-ode"} & set(stages):
        start = time.perf_counter()
        run_stage("ode-data", CONFIGS / "ode_data.yaml",
                  [lat, f"train.out_dir={root / 'runs' / 'ode'}", f"stage.teacher={teacher}", f"stage.out={ode}",
                   f"stage.num_samples={ode_samples}", f"stage.batch_size={ode_samples}", "train.progress=false"])
        if "ode-data" in stages:
            elapsed = time.perf_counter() - start
            rows.append(row("ode-data (causal, 48 steps, CFG)", ode_samples, [elapsed], unit="batch"))
    if "causal-ode" in stages:
        rows.append(steady("causal-ode", train(root, "causal-ode", "causal-ode", "causal_ode.yaml", steps + 1,
                                               f"data.path={ode}", init)))
    if "causal-cd" in stages:
        rows.append(steady("causal-cd", train(root, "causal-cd", "causal-cd", "causal_cd.yaml", steps + 1, lat, init)))
    if "dmd" in stages:
        timings, batch = train(root, "dmd", "dmd", "dmd.yaml", 7, lat, init, f"stage.real_score={bidir}")
        generator, critic = timings[5], timings[1:5] + timings[6:]   # generator updates at steps 0 and 5
        rows.append(row("dmd (generator+critic step)", batch, [generator]))
        rows.append(row("dmd (critic-only step)", batch, critic))
        rows.append(row("dmd (1:5 cycle, per step)", batch, [(generator + 4 * min(critic)) / 5]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage (after one warm-up step)")
    parser.add_argument("--ode-samples", type=int, default=8,
                        help="ODE trajectories generated (one batch; causal-ode trains on them with batch 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp), args.stages, args.steps, args.ode_samples)
    print(f"{'stage':36s} {'batch':>5s} {'best s/step':>11s} {'mean s/step':>11s} {'steps/s':>8s} {'samples/s':>9s}")
    for r in rows:
        note = "   (one batch, teacher loading included)" if r["unit"] == "batch" else ""
        print(f"{r['stage']:36s} {r['batch']:5d} {r['best_s_per_step']:11.3f} {r['mean_s_per_step']:11.3f} "
              f"{r['steps_per_s']:8.3f} {r['samples_per_s']:9.2f}{note}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average_1m_before": load_before,
               "load_average_1m_after": os.getloadavg()[0],
               "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    print(json.dumps({"machine": machine, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
