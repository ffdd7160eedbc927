"""Fast flow-matching training on one GPU: the whole step captured once as a CUDA graph and replayed.

At ShapesWorld size the DiT is so small that the trainer's steps on a GPU are bound by Python and kernel
launches (about 45 ms per step whatever the batch, docs/benchmarks.md), so an hour of GPU gives fewer optimiser
steps than the CPU recipe. This loop keeps the whole latent dataset on the GPU and captures one training step
(batch sampling, noising, forward, backward, gradient clipping, AdamW) as a CUDA graph; each step is then one
graph replay plus one EMA update. On a CPU (tests) the same step runs eagerly.

The objective is the one of the ``bidirectional`` and ``ar-diffusion`` stages (``ar_diffusion.DiffusionStage``):
timesteps from the shifted 1000-step training grid, one per sample (bidirectional) or one per block (teacher
forcing, ``--block-size N``: noisy blocks attend to the clean previous blocks), flow target ε − x0, unweighted
MSE, classifier-free-guidance dropout to zero context. It runs for a wall-clock budget (``--seconds``) and/or a
step count, with a linear warm-up and a cosine decay of the learning rate over that budget, and writes the
trainer's run layout: ``final/`` and ``final_ema/`` model folders (config.json + model.safetensors),
``metrics.jsonl`` and ``settings.json``. Every ``--save-every`` seconds it writes ``checkpoint.pt`` (weights, EMA,
optimiser, step, elapsed time, random state; atomically), and ``--resume`` continues from it: on a CPU exactly; on a
GPU after the few eager steps that precede the graph capture, which are then counted as training steps.

    python -m causal_forcing.training.graphed --data LATENTS --out RUN --seconds 300 [--frames 9]
        [--block-size 0] [--init MODEL_FOLDER] [--batch 64] [--lr 1e-3] [--min-lr 1e-4] [--ema-start 2000]
        [--save-every 300] [--resume]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoints import atomic_path, load_dit_weights, load_into, save_model_folder
from ..config import ModelConfig, model_preset
from ..data.latents import LatentDataset, _shards
from ..errors import InputError
from ..models.attention import Bidirectional, TeacherForcing
from ..models.wan import WanDiT
from ..schedulers.flow import add_noise, training_grid
from .common import early_frame_weights

CHECKPOINT = "checkpoint.pt"
ADDED = tuple(ModelConfig.ADDED)   # the ModelConfig options beyond Wan (this trainer can add each)


@dataclass
class Settings:
    data: str
    out: str
    seconds: float = 0.0           # wall-clock budget of the training loop (0: none; then max_steps)
    max_steps: int = 0             # 0: no step limit (then seconds)
    frames: int = 0                # keep the first N latent frames of every clip (0: all)
    block_size: int = 0            # 0: bidirectional; N >= 1: teacher forcing with blocks of N latent frames
    init: str | None = None        # model folder to start from (else the preset, randomly initialised)
    preset: str = "shapes"
    abs_pos_freqs: int = 0         # > 0: the model gets the absolute position embedding (added to an init without it)
    abs_time_frames: int = 0       # > 0: the model gets the frame-index embedding (likewise)
    early_frames: int = 0          # the loss of the first N latent frames counts early_weight times (mean-1 weights)
    early_weight: float = 1.0
    batch: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4           # the cosine ends here
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    ema_start: int = 2000
    shift: float = 3.0
    cond_dropout: float = 0.1
    seed: int = 0
    log_every: int = 200
    save_every: float = 300.0      # seconds between checkpoints (0: only at the end)
    resume: bool = False           # continue from OUT/checkpoint.pt when it exists
    graph: bool = True             # capture the step as a CUDA graph (CUDA only)
    device: str = "auto"

    def validate(self) -> None:
        if self.seconds <= 0 and self.max_steps <= 0:
            raise InputError("give --seconds or --max-steps")
        if self.batch < 1 or self.block_size < 0 or self.frames < 0:
            raise InputError("--batch must be >= 1, --block-size and --frames >= 0")
        if not 0 <= self.cond_dropout < 1:
            raise InputError("--cond-dropout must be in [0, 1)")
        if not 0 <= self.min_lr <= self.lr:
            raise InputError("need 0 <= --min-lr <= --lr")
        if min(self.abs_pos_freqs, self.abs_time_frames, self.early_frames) < 0 or not self.early_weight > 0:
            raise InputError("need --abs-pos-freqs, --abs-time-frames, --early-frames >= 0 and --early-weight > 0")


def settings_from_stage_config(stage: str, cfg) -> Settings:
    """Graphed-trainer settings equal to a ``bidirectional`` / ``ar-diffusion`` stage config (the recipe's
    ``--graphed-teachers``): same data, init, batch, optimiser, EMA, timestep shift and CFG dropout; the run stops
    at ``train.time_limit`` seconds or ``train.max_steps``, whichever comes first. What this trainer does not do
    (timestep loss weighting, context noise, a linear or delayed decay, a non-dataset text encoder, model overrides
    other than the added embeddings ``abs_pos_freqs``, ``abs_time_frames``) is an error."""
    s, o, t, d = cfg.stage, cfg.optim, cfg.train, cfg.data
    if stage not in ("bidirectional", "ar-diffusion"):
        raise InputError(f"the graphed trainer runs the bidirectional and ar-diffusion stages, not {stage!r}")
    unsupported = [(s.loss_weighting != "none", f"stage.loss_weighting={s.loss_weighting}"),
                   (s.context_noise_max_t > 0, "stage.context_noise_max_t > 0"),
                   (o.schedule == "linear" or o.decay_start > 0, "a linear or delayed learning-rate decay"),
                   (d.text_encoder != "dataset", f"data.text_encoder={d.text_encoder}"),
                   (t.distributed != "none", f"train.distributed={t.distributed}"),
                   (bool(set(cfg.model.overrides) - set(ADDED)),
                    "model.overrides other than abs_pos_freqs / abs_time_frames (use a preset)")]
    bad = [what for cond, what in unsupported if cond]
    if bad:
        raise InputError(f"the graphed trainer does not support {bad[0]}")
    return Settings(data=d.path, out=t.out_dir, seconds=t.time_limit, max_steps=t.max_steps, frames=d.max_frames,
                    block_size=s.block_size if stage == "ar-diffusion" else 0, init=t.init or None,
                    preset=cfg.model.preset, abs_pos_freqs=int(cfg.model.overrides.get("abs_pos_freqs", 0)),
                    abs_time_frames=int(cfg.model.overrides.get("abs_time_frames", 0)),
                    early_frames=s.early_frames, early_weight=s.early_weight, batch=d.batch_size, lr=o.lr,
                    min_lr=o.lr * o.min_lr_ratio if o.schedule == "cosine" else o.lr, warmup=o.warmup_steps,
                    betas=tuple(o.betas), weight_decay=o.weight_decay, grad_clip=o.grad_clip, ema=cfg.ema.decay,
                    ema_start=cfg.ema.start_step, shift=s.shift, cond_dropout=s.cond_dropout, seed=t.seed,
                    log_every=t.log_every, device=t.device)


def load_latents(folder: str | Path, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip's latents [N, F, C, H, W] and stored text embeddings [N, L, D] of a latent dataset, on device
    (in their stored dtype)."""
    ds = LatentDataset(folder, max_frames=frames)   # validates the folder and its format
    if ds.kind != "latents":
        raise InputError(f"{folder}: a {ds.kind!r} dataset, not clean latents")
    lats, ctxs = [], []
    for path in _shards(Path(folder)):
        with safe_open(str(path), "pt") as h:
            if "context" not in h.keys():
                raise InputError(f"{path}: no stored text embeddings (encode the dataset with a text encoder)")
            lat = h.get_tensor("latents")
            lats.append(lat[:, :frames] if frames else lat)
            ctxs.append(h.get_tensor("context"))
    lat = torch.cat(lats)
    if frames and lat.shape[1] < frames:
        raise InputError(f"{folder}: clips have {lat.shape[1]} latent frames, fewer than --frames {frames}")
    return lat.to(device), torch.cat(ctxs).to(device)


def build_model(s: Settings, device: torch.device) -> WanDiT:
    if s.init:
        state, config = load_dit_weights(s.init)
        config = config or model_preset(s.preset)
        config = config.replace(**{k: getattr(s, k) for k in ADDED if getattr(s, k)})
        model = WanDiT(config)
        load_into(model, model.added_state(state))
    else:
        model = WanDiT(model_preset(s.preset).replace(**{k: getattr(s, k) for k in ADDED}))
        model.init_weights()
    model.attn_backend = "sdpa"   # plain SDPA calls capture into a graph; FlexAttention would compile inside it
    return model.to(device).train()


class GraphedTrainer:
    """One training step as a function of nothing but the GPU state (data, weights, RNG): capturable."""

    def __init__(self, s: Settings, device: torch.device):
        self.s, self.device = s, device
        self.latents, self.context = load_latents(s.data, s.frames, device)
        self.model = build_model(s, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        cuda = device.type == "cuda"
        self.use_graph = s.graph and cuda
        # A tensor learning rate lets the captured AdamW step read a new value on every replay.
        self.lr = torch.tensor(s.lr, device=device) if cuda else s.lr
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, betas=s.betas, weight_decay=s.weight_decay,
                                     capturable=cuda, foreach=cuda or None)
        grid_t, grid_s = training_grid(s.shift)
        self.grid_t, self.grid_s = grid_t.to(device), grid_s.to(device)
        self.loss_sum = torch.zeros((), device=device)
        self.gnorm_sum = torch.zeros((), device=device)
        self.ema: list[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    # ---- the step -------------------------------------------------------------------------------------
    def _loss(self) -> torch.Tensor:
        s, dev = self.s, self.device
        n = self.latents.shape[0]
        idx = torch.randint(0, n, (s.batch,), device=dev)
        x0 = self.latents[idx].float()
        ctx = self.context[idx].float()
        if s.cond_dropout > 0:
            drop = torch.rand(s.batch, device=dev) < s.cond_dropout
            ctx = torch.where(drop[:, None, None], torch.zeros_like(ctx), ctx)
        B, F = x0.shape[:2]
        if s.block_size:
            blocks = -(-F // s.block_size)
            k = torch.randint(0, 1000, (B, blocks), device=dev).repeat_interleave(s.block_size, dim=1)[:, :F]
        else:
            k = torch.randint(0, 1000, (B, 1), device=dev).expand(B, F)
        t, sigma = self.grid_t[k], self.grid_s[k]
        eps = torch.randn_like(x0)
        xt = add_noise(x0, eps, sigma)
        if s.block_size:
            flow = self.model(xt, t, ctx, layout=TeacherForcing(s.block_size), clean_x=x0)
        else:
            flow = self.model(xt, t, ctx, layout=Bidirectional())
        per_frame = (flow.float() - (eps - x0)).pow(2).mean(dim=(2, 3, 4))
        return (per_frame * early_frame_weights(F, s.early_frames, s.early_weight, per_frame)).mean()

    def _step(self) -> None:
        loss = self._loss()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip,
                                               foreach=self.device.type == "cuda" or None)
        self.opt.step()
        self.loss_sum += loss.detach()
        self.gnorm_sum += gnorm.detach()

    def _eager_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._step()

    def capture(self) -> None:
        """A few eager steps on a side stream (AdamW state, cuBLAS workspaces), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    def set_lr(self, lr: float) -> None:
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        if step < self.s.ema_start or self.s.ema <= 0:
            return
        if self.ema is None:
            self.ema = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.s.ema)

    def lr_at(self, step: int, frac: float) -> float:
        s = self.s
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self, log=print) -> dict:
        s = self.s
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(asdict(s), indent=1))
        step, done_seconds = 0, 0.0
        if s.resume and (out / CHECKPOINT).exists():
            step, done_seconds = self.load_checkpoint(out / CHECKPOINT)
            log(f"graphed: resumed at step {step} ({done_seconds:.0f} s done)")
        metrics = open(out / "metrics.jsonl", "a" if step else "w")
        log(f"graphed: {self.latents.shape[0]} clips {list(self.latents.shape[1:])}, batch {s.batch}, "
            f"{'teacher forcing, block ' + str(s.block_size) if s.block_size else 'bidirectional'}, "
            f"device {self.device}")
        t0 = time.perf_counter() - done_seconds
        mode = "eager"
        if self.use_graph:
            try:
                self.set_lr(self.lr_at(step, done_seconds / s.seconds if s.seconds > 0 else 0.0))
                self.capture()
                step, mode = step + 3, "graph"
            except Exception as e:  # noqa: BLE001 - a capture failure costs speed, not the run
                log(f"graphed: CUDA graph capture failed, training eagerly ({type(e).__name__}: {e})")
                self.graph = None
                torch.cuda.synchronize()
        self.loss_sum.zero_()
        self.gnorm_sum.zero_()
        last_t, last_step = time.perf_counter(), step
        last_save = last_t
        while True:
            elapsed = time.perf_counter() - t0
            if (s.seconds > 0 and elapsed >= s.seconds) or (s.max_steps > 0 and step >= s.max_steps):
                break
            frac = max(elapsed / s.seconds if s.seconds > 0 else 0.0,
                       step / s.max_steps if s.max_steps > 0 else 0.0)
            self.set_lr(self.lr_at(step, frac))
            if self.graph is not None:
                self.graph.replay()
            else:
                self._eager_step()
            step += 1
            self.update_ema(step)
            if step % s.log_every == 0:
                now = time.perf_counter()
                n = step - last_step
                row = {"step": step, "loss": self.loss_sum.item() / n, "grad_norm": self.gnorm_sum.item() / n,
                       "lr": self.lr_at(step, frac), "elapsed": round(now - t0, 2),
                       "steps_per_s": round(n / (now - last_t), 2), "mode": mode}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                log(json.dumps(row))
                self.loss_sum.zero_()
                self.gnorm_sum.zero_()
                last_t, last_step = now, step
            if s.save_every > 0 and time.perf_counter() - last_save >= s.save_every:
                self.save_checkpoint(out / CHECKPOINT, step, time.perf_counter() - t0)
                last_save = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        metrics.close()
        seconds = time.perf_counter() - t0
        self.save_checkpoint(out / CHECKPOINT, step, seconds)
        self._export(out)
        summary = {"steps": step, "seconds": round(seconds, 1), "mode": mode, "ema": self.ema is not None}
        (out / "summary.json").write_text(json.dumps(summary))
        log(f"graphed: done {json.dumps(summary)}")
        return summary

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, step: int, seconds: float) -> None:
        state = {
            "step": step, "seconds": seconds, "settings": asdict(self.s),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": [e.cpu() for e in self.ema] if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: Path) -> tuple[int, float]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keep = ("data", "frames", "block_size", "batch", "preset", *ADDED)
        old = {**{k: 0 for k in ADDED}, **state["settings"]}   # checkpoints from before an option existed: 0
        changed = [k for k in keep if old.get(k) != getattr(self.s, k)]
        if changed:
            raise InputError(f"{path}: written with other {changed[0]!r} ({old.get(changed[0])!r}); "
                             "resume with the same settings or use another --out")
        self.model.load_state_dict(state["model"])
        if state["ema"] is not None:
            self.ema = [e.to(self.device) for e in state["ema"]]
        self.opt.load_state_dict(state["optimizer"])
        for g in self.opt.param_groups:   # the optimiser must keep reading our (capturable) learning-rate tensor
            g["lr"] = self.lr
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        return int(state["step"]), float(state["seconds"])

    def _export(self, out: Path) -> None:
        config = self.model.config
        raw = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        ema = dict(raw)
        if self.ema is not None:
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            ema.update({n: e.float().cpu() for n, e in zip(names, self.ema)})
        for name, state in (("final", raw), ("final_ema", ema)):
            tmp = out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_folder(state, config, tmp)
            shutil.rmtree(out / name, ignore_errors=True)
            tmp.rename(out / name)


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m causal_forcing.training.graphed",
                                description=__doc__.split("\n\n")[0])
    d = Settings(data="", out="")
    p.add_argument("--data", required=True, help="latent dataset folder (with stored text embeddings)")
    p.add_argument("--out", required=True, help="run folder to write")
    for name in ("seconds", "lr", "min_lr", "weight_decay", "grad_clip", "ema", "shift", "cond_dropout",
                 "save_every"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("max_steps", "frames", "block_size", "batch", "warmup", "ema_start", "seed", "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--init", default=None, help="model folder to start from")
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--abs-pos-freqs", type=int, default=d.abs_pos_freqs,
                   help="add the absolute position embedding (not in Wan) with this many frequencies per axis")
    p.add_argument("--abs-time-frames", type=int, default=d.abs_time_frames,
                   help="add the frame-index embedding (not in Wan) with this many entries (later frames: the last)")
    p.add_argument("--early-frames", type=int, default=d.early_frames)
    p.add_argument("--early-weight", type=float, default=d.early_weight)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="train eagerly on CUDA too")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a = p.parse_args(argv)
    return Settings(**vars(a))


def train(s: Settings) -> dict:
    """Validate the settings, pick the device (``auto``: CUDA when available), seed, and run; returns the summary."""
    s.validate()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
    torch.manual_seed(s.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return GraphedTrainer(s, dev).run()


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
