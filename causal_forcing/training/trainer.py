"""The trainer shared by every stage: optimisation, EMA, precision, checkpoints, exact resume, logging and
distributed execution live here and nowhere else.

A stage (see ``stages.py``) declares its networks in ``setup(trainer)`` with ``trainer.add_trainable`` /
``trainer.add_frozen`` and performs one iteration in ``step(trainer)``, drawing data from the batch streams it
registered and all randomness from ``trainer.gen``; it calls ``trainer.optimize(name, loss)`` for each update.

Exact resume: a checkpoint holds the weights, EMA shadows, optimizer and LR-scheduler states, the step, the
state of every random generator (``trainer.gen``, torch's global CPU/CUDA generators) and the position of
every batch stream. Checkpoints are written atomically (temp file, fsync, rename, then the ``latest`` pointer),
so a run killed at any moment resumes from the last complete checkpoint and produces the same weights as an
uninterrupted run.

Distributed: launched with torchrun, the trainer initialises the process group (NCCL on CUDA, gloo on CPU)
and wraps trainable networks for data parallelism (gradients averaged across ranks after each backward) or FSDP2
(``torch.distributed.fsdp.fully_shard``, one unit per transformer block). FSDP checkpoints are per-rank shards
(resume with the same world size); exports gather
full weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoints import (
    atomic_path,
    load_dit_weights,
    load_into,
    save_model_folder,
    save_released_pt,
)
from ..errors import CheckpointError, ConfigError
from .config import to_dict

CKPT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of a module's parameters, kept in float32 (sharded like the params)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _local(t).clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            _local(t).copy_(state[n])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _full(t).detach().cpu() for n, t in self.shadow.items()}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def lr_factor(optim: Any, max_steps: int, step: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up over
    ``optim.warmup_steps``, then constant (``schedule: constant``) or, from ``decay_start`` (at least the end of
    warm-up) to ``max_steps``, a cosine or linear decay to ``min_lr_ratio``. The curve depends only on the config,
    so a resumed run follows it exactly; resuming with a larger ``train.max_steps`` stretches the decay."""
    warm = optim.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if optim.schedule == "constant":
        return 1.0
    start = max(warm, optim.decay_start)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


@dataclass
class Trainable:
    """A network being trained, with its optimizer, LR schedule and optional EMA."""

    module: nn.Module            # what to call (possibly DDP-wrapped)
    raw: nn.Module               # the underlying module (state dicts, EMA, export)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    ema_decay: float
    ema_start: int
    grad_clip: float
    export: bool
    updates: int = 0


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Any, stage: Any, *, resume: bool = False):
        self.cfg = cfg
        self.stage = stage
        self.dist = DistInfo.from_env()
        self.distributed = cfg.train.distributed
        if self.dist.world_size > 1 and self.distributed == "none":
            self.distributed = "ddp"
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        if self.dist.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
        self.out = Path(cfg.train.out_dir)
        self.step = 0
        seed = cfg.train.seed + 1_000_003 * self.dist.rank
        torch.manual_seed(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.trainables: dict[str, Trainable] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.streams: dict[str, Any] = {}
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
        if self.autocast_dtype is torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        self._scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype is torch.float16 else None
        self._resume = resume
        stage.setup(self)

    # ---- declaring networks and data ----------------------------------------------------------------
    def load_init(self, module: nn.Module, path: str, *, ema: bool = False) -> None:
        """Load weights (any supported format) strictly into ``module``.

        Modules the model has beyond Wan's (the optional embeddings) and the weights lack start from their
        zero initialisation, so a model trained without them can be fine-tuned with them.
        """
        state, _ = load_dit_weights(path, ema=ema)
        if hasattr(module, "added_state"):
            completed = module.added_state(state)
            added = [k for k in completed if k not in state]
            if added and self.dist.is_main:
                print(f"{path} has no {', '.join(added)}: zero-initialised")
            state = completed
        load_into(module, state)

    def add_trainable(self, name: str, module: nn.Module, *, lr: float | None = None,
                      betas: tuple[float, float] | None = None, ema_decay: float | None = None,
                      ema_start: int | None = None, export: bool = True) -> nn.Module:
        """Register a network to train (fp32 master weights). Returns the module to call in ``step``."""
        o = self.cfg.optim
        module = module.to(self.device, torch.float32).train()
        if getattr(self.cfg.train, "grad_checkpointing", False) and hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
        call = self._wrap(module)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr or o.lr,
                                betas=tuple(betas or o.betas), weight_decay=o.weight_decay, eps=o.eps)
        total = self.cfg.train.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: lr_factor(o, total, n))
        decay = self.cfg.ema.decay if ema_decay is None else ema_decay
        start = self.cfg.ema.start_step if ema_start is None else ema_start
        self.trainables[name] = Trainable(call, module, opt, sched, None, decay, start, o.grad_clip, export)
        return call

    def add_frozen(self, name: str, module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        module = module.to(self.device, dtype or torch.float32).eval().requires_grad_(False)
        self.frozen[name] = module
        return module

    def add_stream(self, name: str, stream: Any) -> Any:
        """Register a batch stream (anything with next/state_dict/load_state_dict) for exact resume."""
        self.streams[name] = stream
        return stream

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world_size == 1 or self.distributed == "none":
            return module
        if self.distributed == "ddp":
            # Data parallel by explicit gradient averaging (see ``optimize``) rather than the DDP wrapper: a
            # self-forcing rollout makes several forwards with gradient per update, which DDP's reducer
            # does not allow. Every rank starts from rank 0's weights.
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=0)
            return module
        from torch.distributed.fsdp import fully_shard
        for block in getattr(module, "blocks", []):
            fully_shard(block)
        fully_shard(module)
        return module

    # ---- one update -----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def optimize(self, name: str, loss: torch.Tensor) -> dict[str, float]:
        """Backward, clip, step, schedule and EMA for network ``name``; returns grad norm and lr."""
        tr = self.trainables[name]
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            self._scaler.unscale_(tr.optimizer)
        else:
            loss.backward()
        params = [p for p in tr.raw.parameters() if p.grad is not None]
        if self.distributed == "ddp" and self.dist.world_size > 1:
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.dist.world_size)
        if tr.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_full(p.grad)) for p in params]))
        if tr.ema_decay > 0 and tr.ema is None and self.step >= tr.ema_start:
            tr.ema = EMA(tr.raw, tr.ema_decay)  # from the weights before this update; updated just below
        if self._scaler is not None:
            self._scaler.step(tr.optimizer)
            self._scaler.update()
        else:
            tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        lr = tr.scheduler.get_last_lr()[0]
        tr.scheduler.step()
        tr.updates += 1
        if tr.ema is not None:
            tr.ema.update(tr.raw)
        return {f"{name}/grad_norm": float(_full(gn)), f"{name}/lr": lr}

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=dtype)

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen, device=self.device)

    # ---- checkpoints ----------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / CKPT_DIR

    def _rng_state(self) -> dict[str, Any]:
        state = {"gen": self.gen.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _rank_state(self) -> dict[str, Any]:
        """What differs between data-parallel ranks: random generators and data positions."""
        return {"step": self.step, "rng": self._rng_state(),
                "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def _state(self) -> dict[str, Any]:
        nets = {}
        for name, tr in self.trainables.items():
            nets[name] = {
                "model": {k: _local(v).detach().clone() for k, v in tr.raw.state_dict().items()},
                "optimizer": _localize(tr.optimizer.state_dict()),
                "scheduler": tr.scheduler.state_dict(),
                "ema": tr.ema.state_dict() if tr.ema is not None else None,
                "updates": tr.updates,
            }
        state = {"step": self.step, "nets": nets, "rng": self._rng_state(),
                 "streams": {n: s.state_dict() for n, s in self.streams.items()},
                 "world_size": self.dist.world_size, "config": to_dict(self.cfg)}
        if hasattr(self.stage, "state_dict"):
            state["stage"] = self.stage.state_dict()
        if self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Write the full training state atomically and point ``latest`` at it."""
        sharded = self.distributed == "fsdp" and self.dist.world_size > 1
        folder = self.ckpt_dir / f"step-{self.step:08d}"
        if self.dist.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        self._barrier()
        # rank 0 (or every rank under FSDP) writes the full state; other data-parallel ranks their RNG/data.
        state = self._state() if sharded or self.dist.is_main else self._rank_state()
        _atomic_torch_save(state, folder / f"rank-{self.dist.rank}.pt")
        self._barrier()
        if self.dist.is_main:
            _atomic_text(self.ckpt_dir / "latest", folder.name + "\n")
            self._prune_checkpoints()
        self._barrier()
        return folder

    def _prune_checkpoints(self) -> None:
        keep = max(1, self.cfg.train.keep_checkpoints)
        folders = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        for old in folders[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        folder = self.ckpt_dir / pointer.read_text().strip()
        return folder if folder.is_dir() else None

    def load_checkpoint(self, folder: Path) -> None:
        sharded = self.distributed == "fsdp" and self.dist.world_size > 1
        state = _read_state(folder / f"rank-{self.dist.rank if sharded else 0}.pt")
        if not sharded and self.dist.world_size > 1:
            if state.get("world_size", 1) != self.dist.world_size:
                raise CheckpointError(f"checkpoint was written by {state.get('world_size', 1)} ranks; "
                                      f"resume with the same number")
            state.update(_read_state(folder / f"rank-{self.dist.rank}.pt") if self.dist.rank else {})
        if sharded and state["world_size"] != self.dist.world_size:
            raise CheckpointError(f"checkpoint was written by {state['world_size']} ranks; resume with the same number")
        self.step = int(state["step"])
        for name, tr in self.trainables.items():
            if name not in state["nets"]:
                raise CheckpointError(f"checkpoint {folder} has no state for network {name!r}")
            s = state["nets"][name]
            with torch.no_grad():
                for k, v in tr.raw.state_dict().items():
                    _local(v).copy_(s["model"][k])
            _load_optimizer(tr.optimizer, s["optimizer"])
            tr.scheduler.load_state_dict(s["scheduler"])
            tr.updates = int(s["updates"])
            if s["ema"] is not None:
                tr.ema = EMA(tr.raw, tr.ema_decay)
                tr.ema.load_state_dict(s["ema"])
        for n, st in state["streams"].items():
            self.streams[n].load_state_dict(st)
        self._set_rng_state(state["rng"])
        if "stage" in state and hasattr(self.stage, "load_state_dict"):
            self.stage.load_state_dict(state["stage"])
        if self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])

    def _out_of_time(self, elapsed: float, limit: float) -> bool:
        """Whether the time limit is reached; every rank follows rank 0's clock so they stop at the same step."""
        if not dist.is_initialized():
            return elapsed >= limit
        flag = torch.tensor([1.0 if elapsed >= limit else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ---- export ---------------------------------------------------------------------------------------
    def full_weights(self, name: str, ema: bool = False) -> dict[str, torch.Tensor]:
        tr = self.trainables[name]
        if ema:
            if tr.ema is None:
                raise ValueError(f"network {name!r} has no EMA yet")
            return tr.ema.full_state_dict()
        return {k: _full(v).detach().float().cpu() for k, v in tr.raw.state_dict().items()}

    def export(self) -> Path:
        """Write ``final/`` (raw weights, this project's folder format + released-layout ``model.pt``) and
        ``final_ema/`` when EMA exists, for every exported network (the generator)."""
        final = self.out / "final"
        for name, tr in self.trainables.items():
            if not tr.export:
                continue
            raw = self.full_weights(name)
            ema = self.full_weights(name, ema=True) if tr.ema is not None else None
            if not self.dist.is_main:
                continue
            config = tr.raw.config
            save_model_folder(raw, config, final)
            if not getattr(config, "beyond_wan", ()):   # the released layout has none of the added embeddings
                save_released_pt(final / "model.pt", generator=raw, generator_ema=ema)
            if ema is not None:
                save_model_folder(ema, config, self.out / "final_ema")
        self._barrier()
        return final

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg.train
        latest = self.latest_checkpoint()
        if latest is not None:
            if not self._resume:
                raise ConfigError(f"{self.out} already has checkpoints; pass --resume to continue or choose "
                                  f"another train.out_dir")
            self.load_checkpoint(latest)
        elif self._resume and self.dist.is_main:
            print(f"no checkpoint in {self.ckpt_dir}; starting from step 0")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_text(self.out / "config.yaml", _yaml(to_dict(self.cfg)))
        log = MetricsLog(self.out / "metrics.jsonl", self.step, enabled=self.dist.is_main)
        bar = _progress(cfg.max_steps, self.step, enabled=cfg.progress and self.dist.is_main,
                        desc=getattr(self.stage, "name", "train"))
        # Each logged line holds the mean of every metric over the steps since the previous line, so metrics that
        # only some steps produce (DMD's generator loss, one step in update_ratio) are logged whatever the phase.
        window: dict[str, list[float]] = {}
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            if cfg.time_limit > 0 and self._out_of_time(time.perf_counter() - started, cfg.time_limit):
                if self.dist.is_main:
                    print(f"train.time_limit ({cfg.time_limit:g} s) reached at step {self.step}; exporting")
                if window:
                    log.write(self.step, {k: math.fsum(v) / len(v) for k, v in window.items()})
                self.save_checkpoint()
                break
            t0 = time.perf_counter()
            metrics = self.stage.step(self)
            self.step += 1
            dt = time.perf_counter() - t0
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics.update(step_time=dt, samples_per_s=self.cfg.data.batch_size * self.dist.world_size / dt)
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                log.write(self.step, {k: math.fsum(v) / len(v) for k, v in window.items()})
                window = {}
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k}, refresh=False)
            if cfg.sample_every and self.step % cfg.sample_every == 0 and hasattr(self.stage, "sample"):
                self.stage.sample(self)
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.export()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint shard missing: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0]}") from None


def _localize(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _local(obj).detach().clone()
    if isinstance(obj, dict):
        return {k: _localize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_localize(v) for v in obj]
    return obj


def _load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state saved with local shards, re-wrapping shards as DTensors where params are."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import DTensor
            st = opt.state.get(p, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                    st[k] = DTensor.from_local(v.to(_local(p).device), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride())


class MetricsLog:
    """JSONL metrics; on resume, lines after the resumed step are dropped so the log matches the weights."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            _atomic_text(path, "".join(ln + "\n" for ln in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Into a log file (not a terminal) a bar redrawn every step would be thousands of lines: once a minute there.
    interval = 0.1 if sys.stderr.isatty() else 60.0
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=interval)


def _yaml(data: Any) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)

