"""Latent datasets: clean latent videos, ODE trajectories or prompt lists, stored in self-contained shards.

A dataset is a folder of ``shard-NNNNN.safetensors`` files plus ``meta.json``. Each shard holds a batch of
samples: tensor ``latents`` [n, ...] (clean videos [n, F, C, H, W], or ODE trajectories
[n, K, F, C, H, W]), optionally ``context`` [n, L, D] (precomputed text embeddings), and in its metadata the
JSON list of per-sample records (caption, canonical caption, source id ...). Shards are written atomically
(temp file + fsync + rename), so an interrupted writer leaves only complete shards, and ``LatentWriter``
reopened on the same folder continues after the samples already written (``done_ids``).

``BatchStream`` is the deterministic, resumable order in which a trainer reads a dataset: a permutation per
epoch from (seed, epoch), split across ranks, with a position that is saved in checkpoints.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import atomic_path
from ..errors import InputError

FORMAT = "cf-latents-v1"
_SHARD_RE = re.compile(r"^shard-(?:r(\d+)-)?(\d{5,})\.safetensors$")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class LatentWriter:
    """Append samples to a dataset folder, one atomic shard every ``shard_size`` samples.

    Reopening a folder continues it: ``done_ids`` holds the ``id`` of every sample already stored, so a
    producer can skip work that an interrupted run finished.
    """

    def __init__(self, folder: str | Path, *, kind: str = "latents", shard_size: int = 64,
                 dtype: torch.dtype = torch.float16, meta: dict[str, Any] | None = None,
                 writer_id: int | None = None):
        """``writer_id`` names this writer's shards (``shard-r{id}-NNNNN``) so several processes can fill one
        folder at once; ``done_ids`` always covers every writer's shards."""
        self.folder = Path(folder)
        self.writer_id = writer_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.shard_size = shard_size
        self.dtype = dtype
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            existing = json.loads(meta_path.read_text())
            if existing.get("kind") != kind:
                raise InputError(f"{self.folder} holds a {existing.get('kind')!r} dataset, not {kind!r}")
        else:
            _atomic_write_text(meta_path, json.dumps({"format": FORMAT, "kind": kind, **(meta or {})}, indent=2))
        self.done_ids: set[str] = set()
        self._next_shard = 0
        for path in _shards(self.folder):
            for rec in _read_records(path):
                self.done_ids.add(str(rec.get("id")))
            m = _SHARD_RE.match(path.name)
            if (None if m.group(1) is None else int(m.group(1))) == writer_id:
                self._next_shard = max(self._next_shard, int(m.group(2)) + 1)
        self._buf: list[tuple[torch.Tensor, torch.Tensor | None, dict]] = []

    def add(self, latents: torch.Tensor, record: dict[str, Any], context: torch.Tensor | None = None) -> None:
        """Queue one sample (``record`` must have a unique ``id``); writes a shard when the buffer is full."""
        if "id" not in record:
            raise ValueError("every record needs an 'id'")
        self._buf.append((latents.detach().cpu(), None if context is None else context.detach().cpu(), record))
        self.done_ids.add(str(record["id"]))
        if len(self._buf) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        lat = torch.stack([b[0] for b in self._buf]).to(self.dtype)
        tensors = {"latents": lat}
        if all(b[1] is not None for b in self._buf):
            tensors["context"] = torch.stack([b[1] for b in self._buf]).to(self.dtype)
        records = [b[2] for b in self._buf]
        tag = "" if self.writer_id is None else f"r{self.writer_id}-"
        path = self.folder / f"shard-{tag}{self._next_shard:05d}.safetensors"
        _atomic_save(tensors, path, {"format": FORMAT, "records": json.dumps(records)})
        self._next_shard += 1
        self._buf.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "LatentWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # buffered samples are complete; keep them even when the producer is interrupted


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name))


def _read_records(path: Path) -> list[dict]:
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("records", "[]"))
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a bad input
        raise InputError(f"dataset shard {path} is unreadable: {str(e).splitlines()[0]}") from None


class LatentDataset:
    """Random access to a dataset folder written by ``LatentWriter``. Items are dicts with ``latents``
    (float32), ``context`` (float32 or absent) and ``record``.

    ``max_frames`` > 0 keeps only the first ``max_frames`` latent frames of every sample (the frame axis is the
    fourth from the end for clean videos [F, C, H, W] and ODE trajectories [K, F, C, H, W] alike): with a
    causal VAE these are exactly the latents of the clip's first 1 + 4·(max_frames − 1) pixel frames.
    """

    def __init__(self, folder: str | Path, *, max_frames: int = 0):
        if max_frames < 0:
            raise InputError(f"max_frames must be >= 0, got {max_frames}")
        self.max_frames = max_frames
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise InputError(f"{self.folder} is not a latent dataset (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{self.folder}: unknown dataset format {self.meta.get('format')!r}")
        self.kind = self.meta.get("kind", "latents")
        self._index: list[tuple[Path, int]] = []
        self.records: list[dict] = []
        for path in _shards(self.folder):
            recs = _read_records(path)
            self._index += [(path, i) for i in range(len(recs))]
            self.records += recs
        if not self._index:
            raise InputError(f"dataset {self.folder} is empty")
        self._handles: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _handle(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), "pt")
        return h

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, row = self._index[i]
        h = self._handle(path)
        lat = h.get_slice("latents")[row]
        if self.max_frames:
            if lat.dim() < 4 or lat.shape[-4] < self.max_frames:
                raise InputError(f"dataset {self.folder}: sample {i} has {lat.shape[-4] if lat.dim() >= 4 else 0} "
                                 f"latent frames, fewer than max_frames={self.max_frames}")
            lat = lat[..., :self.max_frames, :, :, :]
        item: dict[str, Any] = {"latents": lat.float(), "record": self.records[i]}
        if "context" in h.keys():
            item["context"] = h.get_slice("context")[row].float()
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"latents": torch.stack([it["latents"] for it in items]),
                           "records": [it["record"] for it in items]}
    if all("context" in it for it in items):
        out["context"] = torch.stack([it["context"] for it in items])
    return out


class BatchStream:
    """Deterministic, resumable batches: per-epoch permutations from (seed, epoch), sharded by rank.

    ``state_dict()`` / ``load_state_dict()`` capture the position, so a resumed run reads exactly the batches
    the uninterrupted run would have read.
    """

    def __init__(self, dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if len(dataset) < batch_size * world_size:
            raise InputError(f"dataset has {len(dataset)} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = n // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def next(self) -> dict[str, Any]:
        if self.position + self.batch_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


class PromptDataset:
    """A text file with one prompt per line (blank lines skipped), for the prompt-only DMD stage."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"prompt file not found: {path}") from None
        self.prompts = [ln.strip() for ln in lines if ln.strip()]
        if not self.prompts:
            raise InputError(f"prompt file {path} has no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latents": torch.zeros(0), "record": {"caption": self.prompts[i], "id": str(i)}}


def write_dataset(folder: str | Path, samples: Iterable[tuple[torch.Tensor, dict, torch.Tensor | None]], *,
                  kind: str = "latents", shard_size: int = 64, dtype: torch.dtype = torch.float16) -> Path:
    """Convenience: write an iterable of (latents, record, context) into a new or resumed dataset."""
    with LatentWriter(folder, kind=kind, shard_size=shard_size, dtype=dtype) as w:
        for lat, rec, ctx in samples:
            if str(rec["id"]) not in w.done_ids:
                w.add(lat, rec, ctx)
    return Path(folder)
