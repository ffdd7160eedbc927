"""Writing and reading ShapesWorld clips and their JSONL manifest.

Container: one compressed ``.npz`` per clip holding ``frames``, a uint8 array (T, H, W, 3). It is lossless
(the palette colors stay exact), about 4 KB per 81x64x64 clip, and fast to write and read. MP4 (H.264) is
supported for reading (generated videos) and, through `save_mp4`, for writing previews or test inputs.

Every file is written atomically: to a temporary file in the destination directory, then `os.replace`.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from . import shapes

MANIFEST_NAME = "manifest.jsonl"
CLIP_KEY = "frames"
VIDEO_EXTENSIONS = (".npz", ".npy", ".mp4")


# ------------------------------------------------------------------------------------------------- atomicity
def _default_file_mode() -> int:
    """Permissions a plain `open()` would give a new file (0o666 minus the process umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600 files
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------ clip files
def save_clip(path: str | os.PathLike, frames: np.ndarray) -> None:
    """Write a uint8 (T, H, W, 3) clip as compressed `.npz` (key ``frames``), atomically."""
    _check_frames(frames)
    with atomic_open(path, "wb", fsync=False) as f:
        np.savez_compressed(f, **{CLIP_KEY: frames})


MP4_PIXEL_FORMATS = ("yuv420p", "yuv444p", "rgb24")


def save_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = shapes.FPS, crf: int = 18,
             pix_fmt: str = "yuv420p") -> None:
    """Encode a uint8 (T, H, W, 3) clip as H.264 MP4, atomically.

    `pix_fmt` "yuv420p" is what most generated videos use (chroma at half resolution: edges of small shapes
    bleed); "yuv444p" keeps full-resolution chroma; "rgb24" (libx264rgb) with crf 0 is lossless."""
    import av  # optional dependency, imported on use

    _check_frames(frames)
    if pix_fmt not in MP4_PIXEL_FORMATS:
        raise InputError(f"pix_fmt must be one of {', '.join(MP4_PIXEL_FORMATS)}, got {pix_fmt!r}")
    with atomic_open(path, "wb", fsync=False) as f:
        with av.open(f, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264rgb" if pix_fmt == "rgb24" else "libx264", rate=fps)
            stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
            stream.pix_fmt = pix_fmt
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                                       format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        dtype = getattr(frames, "dtype", type(frames).__name__)
        raise InputError(f"a clip must be a uint8 array (T, H, W, 3), got {dtype} {shape}")


def load_clip(path: str | os.PathLike) -> np.ndarray:
    """Read a clip as uint8 (T, H, W, 3) from `.npz` (key ``frames`` or a single array), `.npy` or `.mp4`.

    Raises InputError for an unknown extension or an unreadable, corrupt or truncated file."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise InputError(f"{path.name}: unsupported video extension {ext!r} (expected {', '.join(VIDEO_EXTENSIONS)})")
    try:
        frames = _load_mp4(path) if ext == ".mp4" else _load_numpy(path)
    except InputError:
        raise
    except Exception as e:  # any decoder / zip / format error is an unreadable file, reported by the caller
        raise InputError(f"{path.name}: unreadable {ext[1:]} file ({type(e).__name__}: {e})") from e
    _check_frames(frames)
    return frames


def _load_numpy(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        if CLIP_KEY in z.files:
            return z[CLIP_KEY]
        if len(z.files) == 1:
            return z[z.files[0]]
        raise InputError(f"{path.name}: npz has no {CLIP_KEY!r} array (arrays: {', '.join(z.files)})")


def _load_mp4(path: Path) -> np.ndarray:
    import av  # optional dependency, imported on use
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()  # one conversion context for all frames (per-frame ones are slow)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path.name}: no video stream")
        frames = [reformatter.reformat(f, format="rgb24").to_ndarray()
                  for f in container.decode(container.streams.video[0])]
    if not frames:
        raise InputError(f"{path.name}: no decodable frames")
    return np.stack(frames)


# -------------------------------------------------------------------------------------------------- manifest
def write_manifest(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL manifest; each needs ``file`` and ``caption``. Raises InputError otherwise."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read manifest {path}: {e.strerror or e}") from e
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str):
            raise InputError(f"{path}:{n}: each manifest line needs string fields 'file' and 'caption'")
        records.append(rec)
    if not records:
        raise InputError(f"manifest {path} is empty")
    return records


# ------------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class _Job:
    """One clip to write (picklable for worker processes)."""

    out_dir: str
    file: str
    seed: int
    size: int
    frames: int
    caption: str | None  # None: training clip drawn from the seed; else the eval caption to render
    paraphrase_prob: float
    extra: tuple[tuple[str, object], ...]


def _clip_record(spec: shapes.ClipSpec, file: str, train_caption: str, extra: dict) -> dict:
    return {
        "file": file,
        "caption": spec.caption,
        "train_caption": train_caption,
        "objects": [o.to_dict() for o in spec.objects],
        "held_out": spec.held_out,
        "world": spec.world,
        "seed": spec.seed,
        "size": spec.size,
        "frames": spec.frames,
        "fps": shapes.FPS,
        **extra,
    }


def _run_job(job: _Job) -> dict:
    if job.caption is None:
        spec = shapes.sample_clip(job.seed, job.size, job.frames)
        train_caption = shapes.training_caption(spec, job.paraphrase_prob)
    else:
        spec = shapes.clip_for_caption(job.caption, job.seed, job.size, job.frames)
        train_caption = spec.caption
    save_clip(Path(job.out_dir) / job.file, shapes.render(spec))
    return _clip_record(spec, job.file, train_caption, dict(job.extra))


def _run_jobs(jobs: list[_Job], workers: int, progress: Callable[[int, int], None] | None) -> list[dict]:
    records: list[dict] = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            records.append(_run_job(job))
            if progress:
                progress(len(records), len(jobs))
        return records
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.Pool(processes=workers) as pool:
        for rec in pool.imap(_run_job, jobs, chunksize=chunk):
            records.append(rec)
            if progress:
                progress(len(records), len(jobs))
    return records


def _prepare_out(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror or e}") from e
    return out


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")


def write_training_set(out_dir: str | os.PathLike, num: int, seed: int, size: int = shapes.DEFAULT_SIZE,
                       frames: int = shapes.DEFAULT_FRAMES, workers: int = 1, paraphrase_prob: float = 0.5,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `num` training clips ``clip_000000.npz ...`` and ``manifest.jsonl``; returns the manifest path.

    Clip i has seed `shapes.dataset_clip_seed(seed, i)`; no clip contains a held-out combination."""
    shapes.validate_canvas(size, frames)
    if num < 1:
        raise InputError(f"num must be >= 1, got {num}")
    if not 0.0 <= paraphrase_prob <= 1.0:
        raise InputError(f"paraphrase probability must be in [0, 1], got {paraphrase_prob}")
    _check_workers(workers)
    shapes.make_rng(seed, 0)  # validates the seed
    out = _prepare_out(out_dir)
    width = max(6, len(str(num - 1)))
    jobs = [_Job(str(out), f"clip_{i:0{width}d}.npz", shapes.dataset_clip_seed(seed, i), size, frames, None,
                 paraphrase_prob, (("index", i), ("split", "train"), ("dataset_seed", seed)))
            for i in range(num)]
    records = _run_jobs(jobs, workers, progress)
    manifest = out / MANIFEST_NAME
    write_manifest(manifest, records)
    return manifest


def write_eval_set(out_dir: str | os.PathLike, size: int = shapes.DEFAULT_SIZE,
                   frames: int = shapes.DEFAULT_FRAMES, workers: int = 1,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the standard evaluation set: ground-truth clips ``eval_000.npz ...`` of the 200 standard prompts
    and ``manifest.jsonl``; returns the manifest path."""
    shapes.validate_canvas(size, frames)
    _check_workers(workers)
    out = _prepare_out(out_dir)
    prompts = shapes.standard_eval_prompts()
    jobs = [_Job(str(out), f"eval_{p.index:03d}.npz", p.seed, size, frames, p.caption, 0.0,
                 (("index", p.index), ("split", "eval")))
            for p in prompts]
    records = _run_jobs(jobs, workers, progress)
    manifest = out / MANIFEST_NAME
    write_manifest(manifest, records)
    return manifest
