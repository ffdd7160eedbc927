"""The self-contained training loop of the stages that train one network that is not a DiT (``vae``, ``matcher``,
``layout``; the DiT stages use ``trainer.Trainer``): :func:`train_loop`, its checkpoints (the network, its EMA
shadow, the optimizer, the step and a noise generator), :func:`resumable` and :func:`start` to set a run up, and
:func:`final_copy` of the trained weights.

Every ``train.save_every`` steps the state is written atomically to ``out_dir/checkpoints/step-N/state.pt`` and
``checkpoints/latest`` points at it; the ``train.keep_checkpoints`` newest are kept. A loop whose batch at step
``s`` is a pure function of (``train.seed``, ``s``) resumes exactly where it stopped.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoints import atomic_path
from ..errors import CheckpointError, ConfigError
from .config import to_dict
from .trainer import EMA, MetricsLog, lr_factor

CKPT_DIR = "checkpoints"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def resumable(out: Path, resume: bool) -> Path | None:
    """The checkpoint a run in ``out`` continues from (None: a fresh run); a ConfigError when ``out`` has one and
    ``resume`` is off."""
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ConfigError(f"{out} already has checkpoints; pass --resume to continue or choose another train.out_dir")
    return latest


def start(cfg: Any, model: torch.nn.Module, out: Path, latest: Path | None
          ) -> tuple[torch.optim.Optimizer, EMA | None, torch.Generator, int]:
    """AdamW over ``model``'s trainable parameters (``optim``), its EMA (``ema.decay`` > 0), the run's noise
    generator and the step, all restored from ``latest`` when given; ``out/config.yaml`` is written."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    ema = EMA(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.train.seed)
    step = load_checkpoint(latest, model, ema, optimizer, gen) if latest is not None else 0
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return optimizer, ema, gen, step


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


def train_loop(cfg: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
               gen: torch.Generator, out: Path, step: int, losses: Callable[[int], dict[str, torch.Tensor]], *,
               desc: str, max_minutes: float = 0.0) -> bool:
    """Train from ``step`` to ``train.max_steps``: ``losses(step)`` gives the step's terms (``"loss"`` is
    minimised, all are logged); learning-rate curve, gradient clipping, EMA, metrics, progress bar and
    checkpoints as the config says. Returns False when ``max_minutes`` (> 0) ran out first (a checkpoint is
    written; ``--resume`` goes on), True when it reached ``train.max_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(out / "metrics.jsonl", step)
    bar = None
    if cfg.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.max_steps, initial=step, desc=desc, dynamic_ncols=True)
    started = time.monotonic()
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = losses(step)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            if ema is not None and step >= cfg.ema.start_step:
                ema.update(model)
            step += 1
            metrics = {k: float(v.detach()) for k, v in terms.items()}
            metrics.update(lr=lr, grad_norm=float(grad_norm), step_time=time.perf_counter() - t0)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                log.write(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            out_of_time = max_minutes and time.monotonic() - started > 60.0 * max_minutes
            if step % cfg.train.save_every == 0 or step == cfg.train.max_steps or out_of_time:
                save_checkpoint(out, step, model, ema, optimizer, gen, cfg)
            if out_of_time and step < cfg.train.max_steps:
                print(f"paused at step {step}/{cfg.train.max_steps} after {max_minutes:g} min; "
                      f"rerun with --resume to continue")
                return False
    finally:
        if bar is not None:
            bar.close()
    return True


def final_copy(model: torch.nn.Module, ema: EMA | None, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A frozen copy of the trained ``model`` (a fresh ``make()`` of the same architecture) holding its EMA
    weights when EMA is on."""
    final = make()
    final.load_state_dict(model.state_dict())
    if ema is not None:
        with torch.no_grad():
            for name, param in final.named_parameters():
                param.copy_(ema.shadow[name])
    return final.eval().requires_grad_(False)
