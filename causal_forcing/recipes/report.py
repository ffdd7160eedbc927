"""The ShapesWorld recipe's results: score tables, the key comparison, plots and a sample grid.

Reads what the recipe's evaluation steps wrote (``eval/<model>/summary.json``: one ShapesBench report per seed)
and the runs' ``metrics.jsonl``, and writes into ``report/``:

* ``scores.md``   — one table per split (in-distribution, held-out) with mean ± std over seeds, and the key
                    comparison (causal init vs Self Forcing init, frame-wise, after DMD) with its verdict;
* ``scores.json`` — the same numbers, machine-readable;
* ``scores.png``  — in-distribution Total and all_correct per model, with the seed std as error bars;
* ``curves.png``  — training loss curves of every run;
* ``samples.gif`` — the first evaluation clips of chosen models side by side.

Every file is written atomically; ``write_report`` can run again at any time (it reflects what exists).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.models import mean_std

SPLITS = ("in_distribution", "held_out")
COLUMNS = ("total", "semantic", "quality", "all_correct", "color", "shape", "size", "motion")
#: The key comparison of the paper: the same DMD stage from a causal init vs from Self Forcing's init.
CAUSAL_INITS = ("dmd_causal_ode_framewise", "dmd_causal_cd_framewise")
SELF_FORCING_INIT = "dmd_self_forcing_ode_framewise"


@dataclass
class ModelScores:
    """One evaluated model: its name, how it was sampled, and per-split, per-metric values over seeds."""

    name: str
    kind: str
    block_size: int
    steps: int | None
    values: dict[str, dict[str, list[float]]]   # split -> metric -> one value per seed
    replica_of: str | None = None               # another training seed of this model (DMD run)
    train_seed: int = 0

    def stat(self, split: str, metric: str) -> tuple[float, float]:
        return mean_std(self.values[split][metric])

    @property
    def seeds(self) -> int:
        return len(self.values[SPLITS[0]][COLUMNS[0]])


def collect(out: str | Path) -> list[ModelScores]:
    """Every ``eval/*/summary.json`` under the recipe folder ``out``, in name order."""
    models = []
    for path in sorted(Path(out, "eval").glob("*/summary.json")):
        data = json.loads(path.read_text())
        values = {split: {metric: [float(seed[split][metric]) for seed in data["seeds"]] for metric in COLUMNS}
                  for split in SPLITS}
        models.append(ModelScores(name=data["model"], kind=data["kind"], block_size=int(data["block_size"]),
                                  steps=data.get("steps"), values=values, replica_of=data.get("replica_of"),
                                  train_seed=int(data.get("train_seed") or 0)))
    return models


def choose_shipped(models: Sequence[ModelScores]) -> ModelScores:
    """The model to ship among candidates of one block size: the best mean in-distribution Total, except that
    every model whose mean is within seed noise of the best one (the larger of the two models' standard deviations
    over sampling seeds; an exact tie with one seed each) counts as level with it, and among those the best mean
    held-out Total wins. A lead smaller than the spread between sampling seeds is not evidence, and then the
    prompts no model trained on are the better judge of which one generalises."""
    if not models:
        raise ValueError("choose_shipped needs at least one model")
    total = {id(m): m.stat("in_distribution", "total") for m in models}   # (mean, std) per model
    top, top_std = max(total.values())
    level = [m for m in models if top - total[id(m)][0] <= max(top_std, total[id(m)][1])]
    return max(level, key=lambda m: (m.stat("held_out", "total")[0], total[id(m)][0]))


def _cell(model: ModelScores, split: str, metric: str) -> str:
    mean, std = model.stat(split, metric)
    return f"{mean:.3f} ± {std:.3f}" if model.seeds > 1 else f"{mean:.3f}"


def _sampler(model: ModelScores) -> str:
    if model.kind == "causal":
        return f"{model.steps or 4}-step streaming"
    return f"{model.kind} teacher, many steps"


def score_tables(models: Sequence[ModelScores]) -> str:
    """Markdown: one table per split, one row per model."""
    lines = []
    for split in SPLITS:
        lines += [f"### {split.replace('_', '-')}", "",
                  "| model | block | sampler | seeds | " + " | ".join(COLUMNS) + " |",
                  "|---|---|---|---|" + "---|" * len(COLUMNS)]
        for m in models:
            cells = " | ".join(_cell(m, split, c) for c in COLUMNS)
            lines.append(f"| {m.name} | {m.block_size} | {_sampler(m)} | {m.seeds} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _run_totals(models: Sequence[ModelScores], name: str) -> list[float]:
    """In-distribution Total of each training run of `name` (itself, then its replicas by training seed), each
    the mean over that run's sampling seeds."""
    runs = [m for m in models if m.name == name] + sorted((m for m in models if m.replica_of == name),
                                                          key=lambda m: m.train_seed)
    return [float(np.mean(m.values["in_distribution"]["total"])) for m in runs]


def key_comparison(models: Sequence[ModelScores]) -> dict[str, Any] | None:
    """Causal init vs Self Forcing init (frame-wise, after DMD, 4 steps), in-distribution: means, stds, verdict.

    When both sides have more than one training run (the recipe's ``--train-seeds``), the statistics are over
    training runs (each run: the mean over its sampling seeds); otherwise over the sampling seeds of the one run.
    The verdict says the paper's ordering is reproduced when the best causal init's mean Total exceeds the Self
    Forcing init's by more than both stds combined, not reproduced ("reversed") when it is below by as much,
    and inconclusive otherwise. None when the Self Forcing model or every causal one is missing.
    """
    by_name = {m.name: m for m in models}
    if SELF_FORCING_INIT not in by_name:
        return None
    causal = [by_name[n] for n in CAUSAL_INITS if n in by_name]
    if not causal:
        return None
    runs = {m.name: _run_totals(models, m.name) for m in [*causal, by_name[SELF_FORCING_INIT]]}
    over_runs = len(runs[SELF_FORCING_INIT]) > 1 and any(len(runs[m.name]) > 1 for m in causal)
    if over_runs:
        causal = [m for m in causal if len(runs[m.name]) > 1]
        samples = runs
    else:
        samples = {m.name: m.values["in_distribution"]["total"] for m in [*causal, by_name[SELF_FORCING_INIT]]}
    best = max(causal, key=lambda m: mean_std(samples[m.name])[0])
    (b_mean, b_std), (c_mean, c_std) = mean_std(samples[SELF_FORCING_INIT]), mean_std(samples[best.name])
    margin = b_std + c_std
    if c_mean - b_mean > margin:
        verdict = "reproduced"
    elif b_mean - c_mean > margin:
        verdict = "reversed"
    else:
        verdict = "inconclusive"
    return {"causal_model": best.name, "causal_total": [c_mean, c_std], "self_forcing_total": [b_mean, b_std],
            "causal_runs": samples[best.name], "self_forcing_runs": samples[SELF_FORCING_INIT],
            "over": "training seeds" if over_runs else "sampling seeds",
            "seeds": min(len(samples[best.name]), len(samples[SELF_FORCING_INIT])),
            "difference": c_mean - b_mean, "verdict": verdict}


def _atomic_write(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def plot_scores(models: Sequence[ModelScores], path: str | Path) -> Path:
    """Bar chart: in-distribution Total and all_correct per model, seed std as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in models]
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(models) + 2), 4.2))
    for offset, metric in ((-0.2, "total"), (0.2, "all_correct")):
        stats = [m.stat("in_distribution", metric) for m in models]
        ax.bar(x + offset, [s[0] for s in stats], 0.4, yerr=[s[1] for s in stats], capsize=2, label=metric)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ShapesBench, in-distribution")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
    return _atomic_write(Path(path), save)


def sample_grid(clip_rows: Sequence[Sequence[np.ndarray]], path: str | Path, *, fps: int = 16,
                gap: int = 2) -> Path:
    """A GIF with one row per model and one column per clip (uint8 ``[T, H, W, 3]`` each, cut to the shortest)."""
    from PIL import Image

    frames = min(len(c) for row in clip_rows for c in row)
    height, width = clip_rows[0][0].shape[1:3]
    cols = max(len(row) for row in clip_rows)
    grid = np.full((frames, len(clip_rows) * (height + gap) - gap, cols * (width + gap) - gap, 3), 40, np.uint8)
    for r, row in enumerate(clip_rows):
        for c, clip in enumerate(row):
            grid[:, r * (height + gap):r * (height + gap) + height,
                 c * (width + gap):c * (width + gap) + width] = clip[:frames]
    images = [Image.fromarray(frame) for frame in grid]

    def save(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=0, optimize=False, disposal=1)
    return _atomic_write(Path(path), save)


def write_report(out: str | Path, *, sample_models: Sequence[str] = (), samples: int = 6) -> Path:
    """Write ``report/`` for the recipe folder ``out`` (see the module docstring); returns the folder."""
    from ..data.shapes_io import load_clip
    from ..training.plotting import plot_runs

    out = Path(out)
    report = out / "report"
    models = collect(out)
    comparison = key_comparison(models)
    text = ["# ShapesBench scores", "", score_tables(models)]
    if comparison is not None:
        c, b = comparison["causal_total"], comparison["self_forcing_total"]
        summary = (f"{comparison['causal_model']}: {c[0]:.3f} ± {c[1]:.3f}; {SELF_FORCING_INIT}: "
                   f"{b[0]:.3f} ± {b[1]:.3f} over {comparison['seeds']} {comparison['over']}; difference "
                   f"{comparison['difference']:+.3f} → **{comparison['verdict']}**.")
        per_run = (f"Per {comparison['over'][:-1]}: causal {', '.join(f'{v:.3f}' for v in comparison['causal_runs'])}"
                   f"; Self Forcing {', '.join(f'{v:.3f}' for v in comparison['self_forcing_runs'])}.")
        text += ["### Causal init vs Self Forcing init (frame-wise, after DMD, in-distribution Total)", "",
                 summary, "", per_run, ""]
    _atomic_write(report / "scores.md", lambda tmp: tmp.write_text("\n".join(text)))
    data = {"models": [{"name": m.name, "kind": m.kind, "block_size": m.block_size, "steps": m.steps,
                        "seeds": m.seeds, **{split: {c: list(m.stat(split, c)) for c in COLUMNS} for split in SPLITS}}
                       for m in models], "key_comparison": comparison}
    _atomic_write(report / "scores.json", lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
    if models:
        plot_scores(models, report / "scores.png")
    runs = sorted(p.parent for p in out.glob("runs/*/metrics.jsonl"))
    if runs:
        plot_runs(runs, report / "curves.png", smooth=10)
    rows = []
    for name in sample_models:
        clips = sorted(Path(out, "eval", name).glob("seed0/*.mp4"))[:samples]
        if clips:
            rows.append([load_clip(c) for c in clips])
    if rows:
        sample_grid(rows, report / "samples.gif")
    return report
