"""`layout` stage: train the layout model (`models.layout`) that says where the objects of an assembled frame 0
start (`pipelines.first_frame`, `first_frame.layout_path`).

Data (built once, to `out_dir/data.pt`; a pure function of `train.seed` and the stage config): the scene
annotations of `stage.clips` ShapesWorld training clips (never a held-out combination; nothing is rendered): each
object's canonical clause and the centre of its box at frame 0. Clips of two objects give the pairs the classifier
learns from; every object's centre goes into the proposal pool. Each distinct clause is encoded once with
`stage.text_encoder` and mean-pooled over its tokens (`models.layout.pooled_text`; the encoder must be what the
first-frame model reads, since the pipeline encodes the clauses with it). The last `stage.val_pairs` pairs are not
trained on.

Training: binary cross-entropy between each real pair (its clauses, its centres) and the same clauses with two
centres drawn from the pool. The batch of step `s` is a pure function of (`train.seed`, `s`), and checkpoints
(`training.loop`) make `--resume` continue exactly. At the end the model goes to `out_dir/final` (and
`stage.export`), with `eval.json`: the validation loss, and how often sampled layouts for the validation pairs'
clauses are starts the world itself could have drawn (`shapes.valid_start`, with a random speed per object),
next to the same rate for the pool's independent draws and for the real starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..checkpoints import atomic_path
from ..data import shapes
from ..errors import ConfigError
from ..models.layout import LayoutModel, pooled_text, save_layout_model
from .loop import final_copy, resumable, start, train_loop, write_text

DATA_FILE = "data.pt"
DATA_SEED_BASE = 5_555_555
"""Dataset seed of the layout annotations (plus `train.seed`), apart from the other stages' clips."""


@dataclass
class Config:
    """The `stage:` section of `configs/shapes/layout.yaml`."""

    size: int = 64                   # canvas side (pixels): object sizes in canvas units depend on it
    frames: int = 81                 # clip length the world draws starts for (the overlap rule spans it)
    text_encoder: str = "minilm"     # the first-frame model's text encoder (models/text.py kinds)
    text_len: int = 32
    clips: int = 200000              # clips whose annotations are read (about half have two objects)
    val_pairs: int = 2000
    hidden: int = 256
    text_proj: int = 64
    pool: int = 8192                 # proposal centres kept in the model
    candidates: int = 1024           # proposals per layout when eval.json samples (as in the pipeline)
    sharpness: float = 4.0           # as the pipeline's first_frame.layout_sharpness
    threads: int = 2                 # torch intra-op threads (CPU)
    max_minutes: float = 0.0         # stop with a checkpoint after this much wall time; 0 = no limit
    export: str = ""                 # also write the final layout model folder here

    def validate(self) -> None:
        shapes.validate_canvas(self.size, self.frames)
        checks = [
            (self.clips >= 2 * self.val_pairs + 8, "stage.clips must be well above 2 * stage.val_pairs"),
            (self.val_pairs >= 1, "stage.val_pairs must be >= 1"),
            (min(self.hidden, self.text_proj, self.pool, self.candidates) >= 1,
             "stage.hidden, text_proj, pool and candidates must be >= 1"),
            (self.sharpness >= 0.0, "stage.sharpness must be >= 0"),
            (self.threads >= 1, "stage.threads must be >= 1"),
            (self.max_minutes >= 0, "stage.max_minutes must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def centre(obj: shapes.ObjectParams, canvas: int) -> tuple[float, float]:
    """The centre (x, y) of ``obj``'s box at frame 0, in canvas units."""
    half = shapes.side_pixels(obj.attrs.size, canvas) / canvas / 2
    return obj.x0 + half, obj.y0 + half


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def read_annotations(stage: Config, seed: int) -> dict:
    """``{"clauses": [str], "pairs": [[i, j]], "pair_centres": [[xa, ya, xb, yb]], "centres": [[x, y]],
    "objects": [[attrs dicts]]}`` of ``stage.clips`` training clips (pairs in clip order)."""
    clauses: dict[str, int] = {}
    pairs, pair_centres, centres, objects = [], [], [], []
    index = 0
    while index < stage.clips:
        spec = shapes.sample_clip(shapes.dataset_clip_seed(DATA_SEED_BASE + seed, index), stage.size, stage.frames)
        index += 1
        points = [centre(o, stage.size) for o in spec.objects]
        centres += points
        if len(spec.objects) == 2:
            ids = [clauses.setdefault(shapes.canonical_caption([o.attrs]), len(clauses)) for o in spec.objects]
            pairs.append(ids)
            pair_centres.append([*points[0], *points[1]])
            objects.append([o.to_dict() for o in spec.objects])
    return {"clauses": list(clauses), "pairs": pairs, "pair_centres": pair_centres, "centres": centres,
            "objects": objects}


def load_or_build_dataset(cfg: Any, out: Path) -> dict:
    """``out/data.pt`` when it exists (written atomically), else built and written there: the annotations with
    the clauses' pooled embeddings ``text`` [clauses, D] and tensors ``pairs`` [P, 2], ``pair_centres`` [P, 4],
    ``centres`` [N, 2]."""
    path = out / DATA_FILE
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from ..models.text import build_text_encoder
    stage = cfg.stage
    notes = read_annotations(stage, cfg.train.seed)
    encoder = build_text_encoder(stage.text_encoder, text_len=stage.text_len, device="cpu", cache_size=0)
    text = torch.cat([pooled_text(encoder, notes["clauses"][i:i + 256]) for i in range(0, len(notes["clauses"]), 256)])
    data = {"clauses": notes["clauses"], "text": text, "pairs": torch.tensor(notes["pairs"]),
            "pair_centres": torch.tensor(notes["pair_centres"]), "centres": torch.tensor(notes["centres"]),
            "objects": json.dumps(notes["objects"][-stage.val_pairs:])}
    if len(data["pairs"]) <= stage.val_pairs:
        raise ConfigError(f"{len(data['pairs'])} two-object clips among {stage.clips}: not more than "
                          f"stage.val_pairs ({stage.val_pairs})")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return data


def pair_loss(model: LayoutModel, data: dict, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The classifier's loss on pairs ``idx``: real centres against centres drawn from the pool."""
    ids, real = data["pairs"][idx], data["pair_centres"][idx].float()
    ta, tb = data["text"][ids[:, 0]].float(), data["text"][ids[:, 1]].float()
    drawn = model.propose((2, len(idx)), gen)
    pos = model.pair_logit(ta, tb, real[:, :2], real[:, 2:])
    neg = model.pair_logit(ta, tb, drawn[0], drawn[1])
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))) / 2


@torch.no_grad()
def evaluate(model: LayoutModel, data: dict, stage: Config, seed: int) -> dict[str, float]:
    """Validation loss, and the share of world-valid starts among sampled layouts (``model``), independent pool
    draws (``pool``) and the real starts (``real``) of the validation pairs, each object with a random speed."""
    val = torch.arange(len(data["pairs"]) - stage.val_pairs, len(data["pairs"]))
    gen = torch.Generator().manual_seed(seed)
    loss = float(pair_loss(model, data, val, gen))
    rng = np.random.default_rng(seed)
    counts = {"model": 0, "pool": 0, "real": 0}
    for n, objects in enumerate(json.loads(data["objects"])):
        attrs = [shapes.ObjectAttrs(**{k: o[k] for k in ("size", "color", "shape", "motion")}) for o in objects]
        texts = data["text"][data["pairs"][val[n]]].float()
        layouts = {"model": model.sample(texts, stage.candidates, stage.sharpness, gen),
                   "pool": model.propose((2,), gen), "real": data["pair_centres"][val[n]].view(2, 2)}
        for name, centres in layouts.items():
            counts[name] += shapes.valid_start(attrs, centres.tolist(), rng, stage.size, stage.frames)
    return {"val_loss": loss, **{f"valid_{k}": v / stage.val_pairs for k, v in counts.items()}}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def run(cfg: Any, resume: bool = False) -> Path:
    """Train (or continue training) the layout model; returns `out_dir/final`, or `out_dir` when paused."""
    stage: Config = cfg.stage
    torch.set_num_threads(stage.threads)
    out = Path(cfg.train.out_dir)
    latest = resumable(out, resume)
    data = load_or_build_dataset(cfg, out)
    torch.manual_seed(cfg.train.seed)
    model = LayoutModel(text_dim=data["text"].shape[1], hidden=stage.hidden, text_proj=stage.text_proj,
                        pool=stage.pool)
    model.set_pool(data["centres"].float(), torch.Generator().manual_seed(cfg.train.seed))
    model.train()
    optimizer, ema, gen, step = start(cfg, model, out, latest)
    trained = len(data["pairs"]) - stage.val_pairs

    def losses(at: int) -> dict[str, torch.Tensor]:
        batch_gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + at)
        idx = torch.randint(trained, (cfg.data.batch_size,), generator=batch_gen)
        return {"loss": pair_loss(model, data, idx, batch_gen)}

    if not train_loop(cfg, model, optimizer, ema, gen, out, step, losses, desc="layout",
                      max_minutes=stage.max_minutes):
        return out
    final = final_copy(model, ema, lambda: LayoutModel(**model.config()))
    folder = save_layout_model(final, out / "final")
    report = {**evaluate(final, data, stage, cfg.train.seed), "val_pairs": stage.val_pairs,
              "candidates": stage.candidates, "sharpness": stage.sharpness}
    write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    if stage.export:
        save_layout_model(final, stage.export)
    print(f"layout: {report['valid_model']:.3f} of sampled layouts are world-valid starts (pool draws "
          f"{report['valid_pool']:.3f}, real starts with a random speed {report['valid_real']:.3f}); saved {folder}")
    return folder
