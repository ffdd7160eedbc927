"""Loss curves from a run's metrics.jsonl, drawn to PNG (matplotlib, headless)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import InputError


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(f"no metrics file at {path}") from None
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            raise InputError(f"{path}:{i} is not valid JSON") from None
    if not rows:
        raise InputError(f"{path} has no metrics")
    return rows


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs: Sequence[str | Path], out: str | Path, *, keys: Sequence[str] | None = None,
              smooth: int = 1, logy: bool = False) -> Path:
    """One panel per metric key (default: every key containing 'loss'), one line per run. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {str(r): read_metrics(r) for r in runs}
    all_keys = sorted({k for rows in data.values() for row in rows for k in row if k != "step"})
    keys = list(keys) if keys else [k for k in all_keys if "loss" in k]
    missing = [k for k in keys if k not in all_keys]
    if missing or not keys:
        raise InputError(f"metric {missing[0] if missing else 'loss'!r} not found (available: {', '.join(all_keys)})")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for name, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, _smooth(list(ys), smooth), label=Path(name).name or name, linewidth=1.2)
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
