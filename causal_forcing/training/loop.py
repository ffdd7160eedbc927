"""Checkpoints of the self-contained training loops (the stages that do not use ``trainer.Trainer``: ``vae``,
``matcher``): one network, its EMA shadow, the optimizer, the step and a noise generator.

Every ``train.save_every`` steps the state is written atomically to ``out_dir/checkpoints/step-N/state.pt`` and
``checkpoints/latest`` points at it; the ``train.keep_checkpoints`` newest are kept. A loop whose batch at step
``s`` is a pure function of (``train.seed``, ``s``) resumes exactly where it stopped.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import atomic_path
from ..errors import CheckpointError
from .config import to_dict
from .trainer import EMA, lr_factor

CKPT_DIR = "checkpoints"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names under ``out``, if it holds a complete state."""
    pointer = out / CKPT_DIR / "latest"
    if not pointer.exists():
        return None
    folder = out / CKPT_DIR / pointer.read_text().strip()
    return folder if (folder / "state.pt").is_file() else None


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: EMA | None,
                    optimizer: torch.optim.Optimizer, gen: torch.Generator, cfg: Any) -> None:
    folder = out / CKPT_DIR / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "gen": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "config": to_dict(cfg)}
    with atomic_path(folder / "state.pt") as tmp:
        torch.save(state, tmp)
    write_text(out / CKPT_DIR / "latest", folder.name + "\n")
    keep = max(1, cfg.train.keep_checkpoints)
    for old in sorted(p for p in (out / CKPT_DIR).glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: torch.nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
                    gen: torch.Generator) -> int:
    """Restore a :func:`save_checkpoint` state; returns its step."""
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is a bad input
        raise CheckpointError(f"checkpoint {folder} is unreadable: {str(error).splitlines()[0]}") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if state["ema"] is None:
            raise CheckpointError(f"checkpoint {folder} has no EMA state but ema.decay > 0")
        ema.load_state_dict(state["ema"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def learning_rate(cfg: Any, step: int) -> float:
    """The rate at optimizer step `step`: the shared trainer's curve (warm-up, then optim.schedule)."""
    return cfg.optim.lr * lr_factor(cfg.optim, cfg.train.max_steps, step)
