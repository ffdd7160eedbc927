"""ShapesBench (`shapesbench-v1`): an analytic judge of ShapesWorld videos.

The contract is §2 of `/work/shared/shapes_world.md`; `docs/shapes_world.md` lists the choices made where it is
silent. Pipeline for one clip (frames uint8 (T, H, W, 3), a square canvas, T >= 17) and its caption:

1. Every pixel gets the nearest of black + the 6 palette colors; farther than 60 from all of them: artifact.
2. Per color, 4-connected components inside each frame (one `scipy.ndimage.label` call over the whole clip);
   components smaller than 25% of a small triangle's area are noise. The largest remaining component of a
   color in a frame is that color's *track* in that frame.
3. Each expected object is matched to its color's track when that track is present in >= 90% of the frames;
   otherwise (color wrong) to the largest not-mentioned color track present in >= 90% of the frames, so that a
   wrong color costs `color` only. A frame where a track's box overlaps (or touches) another matched track's
   box and its area is below its median area is occluded; occluded frames are skipped for shape, size,
   motion, consistency, smoothness and speed.
4. Per object: shape from the mean fill ratio, size from the median box side, motion from a least-squares
   centroid velocity over the first 16 frames; per clip: scores as in the contract (see `score_clip`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..data import shapes
from ..data.shapes_io import MANIFEST_NAME, VIDEO_EXTENSIONS, load_clip, read_manifest
from ..errors import InputError

JUDGE_VERSION = "shapesbench-v1"

ARTIFACT_DISTANCE = 60.0
NOISE_FRACTION = 0.25          # of the smallest object's area (a small triangle: half its box)
PRESENT_FRACTION = 0.90
UNEXPECTED_FRACTION = 0.50
STILL_SPEED = 0.004            # canvas units per frame
MOTION_FRAMES = 16
CLEANLINESS_ZERO_AT = 0.05     # artifact-pixel fraction that scores 0
SMOOTH_STENCIL = 4             # frames between the three centroids of one acceleration sample
FILL_RATIOS: dict[str, float] = {"circle": math.pi / 4.0, "square": 1.0, "triangle": 0.5}
SPEED_LOW, SPEED_HIGH = shapes.SPEED_RANGE
SPEED_MID = (SPEED_LOW + SPEED_HIGH) / 2.0

SEMANTIC_KEYS = ("color", "shape", "size", "motion")
QUALITY_KEYS = ("cleanliness", "consistency", "smoothness")

COLOR_NAMES: tuple[str, ...] = tuple(shapes.COLORS)
# Class 0 is the black background, class k >= 1 is COLOR_NAMES[k - 1]; -1 marks artifact pixels.
_PALETTE = np.array([(0, 0, 0)] + [shapes.COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity inside a frame, nothing across frames
_STRUCTURE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


# ------------------------------------------------------------------------------------------------ pixels
# Per palette entry, channel and value: squared difference, so that squared distances are three gathers.
_SQUARES = ((np.arange(256, dtype=np.int32)[None, None, :] - _PALETTE.astype(np.int32)[:, :, None]) ** 2)
# A pixel whose channels are all <= 34 is within 34*sqrt(3) < 60 of black and >= 156 from every palette
# color (each has a channel >= 190), so it is background without computing distances.
_SURELY_BLACK = 34


def classify(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest-palette class per pixel, int8 (T, H, W) (0 black, k palette color, -1 artifact), and the
    artifact-pixel fraction. Distances are exact integer RGB distances."""
    flat = frames.reshape(-1, 3)
    brightest = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])
    idx = np.flatnonzero(brightest > _SURELY_BLACK)
    cls = np.zeros(flat.shape[0], dtype=np.int8)
    n_artifact = 0
    if idx.size:
        sub = flat[idx]
        d2 = _SQUARES[:, 0, sub[:, 0]] + _SQUARES[:, 1, sub[:, 1]] + _SQUARES[:, 2, sub[:, 2]]  # (7, M)
        nearest = np.argmin(d2, axis=0)
        artifact = d2[nearest, np.arange(idx.size)] > ARTIFACT_DISTANCE ** 2
        sub_cls = nearest.astype(np.int8)
        sub_cls[artifact] = -1
        cls[idx] = sub_cls
        n_artifact = int(artifact.sum())
    return cls.reshape(frames.shape[:3]), n_artifact / max(1, flat.shape[0])


@dataclass(frozen=True)
class Track:
    """Per-frame largest non-noise component of one color. Pixel units; NaN / 0 where absent."""

    color: str
    present: np.ndarray   # bool (T,)
    area: np.ndarray      # float (T,), 0 where absent
    box: np.ndarray       # float (T, 4): y0, x0, y1, x1 (exclusive ends)
    centroid: np.ndarray  # float (T, 2): y, x (pixel centres at +0.5)

    @property
    def presence(self) -> float:
        return float(self.present.mean())

    @property
    def mean_area(self) -> float:
        return float(self.area[self.present].mean()) if self.present.any() else 0.0


def color_track(mask: np.ndarray, color: str, min_area: float) -> Track | None:
    """Track of one color from its boolean (T, H, W) mask; None if no component reaches `min_area`."""
    t_count, height, width = mask.shape
    labels, n = ndimage.label(mask, structure=_STRUCTURE)
    if n == 0:
        return None
    pix = np.flatnonzero(labels)            # ascending, hence frame-major
    lab = labels.ravel()[pix]
    sizes = np.bincount(lab, minlength=n + 1)
    frame_of = np.zeros(n + 1, dtype=np.int64)
    frame_of[lab] = pix // (height * width)
    kept = np.flatnonzero(sizes >= min_area)
    kept = kept[kept > 0]
    if kept.size == 0:
        return None
    kf, ks = frame_of[kept], sizes[kept]
    order = np.lexsort((ks, kf))  # by frame, then size: the last entry of each frame is its largest
    kept, kf = kept[order], kf[order]
    last = np.r_[kf[1:] != kf[:-1], True]
    chosen = kept[last]

    is_chosen = np.zeros(n + 1, dtype=bool)
    is_chosen[chosen] = True
    pix = pix[is_chosen[lab]]               # pixels of the chosen components, still frame-major
    frame = pix // (height * width)
    ys = (pix // width) % height
    xs = pix % width
    starts = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1]])
    frames_present = frame[starts]
    area = np.zeros(t_count)
    area[frames_present] = np.diff(np.r_[starts, pix.size])
    present = area > 0
    box = np.full((t_count, 4), np.nan)
    box[frames_present] = np.stack([np.minimum.reduceat(ys, starts), np.minimum.reduceat(xs, starts),
                                    np.maximum.reduceat(ys, starts) + 1, np.maximum.reduceat(xs, starts) + 1],
                                   axis=1)
    centroid = np.full((t_count, 2), np.nan)
    centroid[frames_present, 0] = np.add.reduceat(ys, starts) / area[frames_present] + 0.5
    centroid[frames_present, 1] = np.add.reduceat(xs, starts) / area[frames_present] + 0.5
    return Track(color=color, present=present, area=area, box=box, centroid=centroid)


def all_tracks(cls: np.ndarray, min_area: float) -> dict[str, Track]:
    """Tracks of every palette color that has at least one non-noise component."""
    counts = np.bincount((cls.ravel().astype(np.int64) + 1), minlength=len(_PALETTE) + 1)
    tracks = {}
    for k, color in enumerate(COLOR_NAMES, start=1):
        if counts[k + 1] < min_area:
            continue
        track = color_track(cls == k, color, min_area)
        if track is not None:
            tracks[color] = track
    return tracks


# ------------------------------------------------------------------------------------------------ geometry
def _filled_boxes(track: Track) -> np.ndarray:
    """The track's boxes with absent frames linearly interpolated from the present ones (held at the ends)."""
    t = np.arange(track.present.size)
    if not track.present.any():
        return track.box
    return np.stack([np.interp(t, t[track.present], track.box[track.present, i]) for i in range(4)], axis=1)


def _occluded(track: Track, others: Sequence[Track]) -> np.ndarray:
    """Frames where `track` is (partly) hidden: its box overlaps or touches another matched track's box and
    its area is below its median area. Touching counts because a partly covered object's visible box ends
    where the covering box begins; the area condition keeps merely adjacent objects measurable. In frames
    where the track is absent (e.g. fully covered), its box is interpolated from neighbouring frames."""
    near = np.zeros(track.present.shape, dtype=bool)
    a = _filled_boxes(track)
    for other in others:
        b = other.box
        with np.errstate(invalid="ignore"):
            near |= (a[:, 0] <= b[:, 2]) & (b[:, 0] <= a[:, 2]) & (a[:, 1] <= b[:, 3]) & (b[:, 1] <= a[:, 3])
    typical = np.median(track.area[track.present]) if track.present.any() else 0.0
    return near & (track.area < typical)


def _nearest(value: float, refs: dict[str, float]) -> str:
    return min(refs, key=lambda k: abs(refs[k] - value))


def _velocity(centroid: np.ndarray, frames: np.ndarray, canvas: int) -> np.ndarray | None:
    """Least-squares velocity (vy, vx) in canvas units/frame of the centroid over `frames`; None if < 2."""
    if frames.size < 2:
        return None
    t = frames.astype(np.float64)
    c = centroid[frames] / canvas
    tc = t - t.mean()
    return (tc[:, None] * (c - c.mean(axis=0))).sum(axis=0) / (tc * tc).sum()


#: The axis of each motion word: `motion_axis` (reported, not scored) asks only whether an object moves along the
#: caption's axis, so that a model that moves objects the right way round can be told from one that only gets the
#: axis right (a random sign halves `motion` but leaves `motion_axis` whole).
MOTION_AXES: dict[str, str] = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical",
                               "still": "still"}


def motion_label(velocity: np.ndarray) -> str:
    """'still' below STILL_SPEED, else the direction of the dominant component (image y points down)."""
    vy, vx = float(velocity[0]), float(velocity[1])
    if math.hypot(vx, vy) < STILL_SPEED:
        return "still"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _smoothness(track: Track, valid: np.ndarray, canvas: int) -> float:
    """1 - mean |acceleration| / speed range, from centroids SMOOTH_STENCIL frames apart.

    Per axis: accelerations explained by pixel rounding of positions (<= 2 px / K^2) are not counted, and
    samples whose box is near a wall on that axis (where a bounce can happen inside the stencil) are ignored.
    The penalty is the L1 sum of the two per-axis means."""
    k = SMOOTH_STENCIL
    t_count = valid.size
    if t_count <= 2 * k:
        return 1.0
    c = np.where(valid[:, None], track.centroid, np.nan) / canvas
    acc = (c[2 * k:] - 2.0 * c[k:-k] + c[:-2 * k]) / (k * k)
    excess = np.maximum(np.abs(acc) - 2.0 / (k * k * canvas), 0.0)
    box = track.box[k:-k] / canvas
    margin = k * SPEED_HIGH + 1.0 / canvas
    penalty = 0.0
    for axis in (0, 1):  # 0: y, 1: x
        with np.errstate(invalid="ignore"):
            near_wall = (box[:, axis] <= margin) | (box[:, axis + 2] >= 1.0 - margin)
        ok = np.isfinite(excess[:, axis]) & ~near_wall
        if ok.any():
            penalty += float(excess[ok, axis].mean())
    return float(np.clip(1.0 - penalty / (SPEED_HIGH - SPEED_LOW), 0.0, 1.0))


def _mean_speed(track: Track, valid: np.ndarray, canvas: int) -> float:
    """Mean per-frame centroid displacement (canvas units) over consecutive valid frames; 0 if none."""
    both = valid[1:] & valid[:-1]
    if not both.any():
        return 0.0
    step = np.diff(track.centroid, axis=0)[both] / canvas
    return float(np.hypot(step[:, 0], step[:, 1]).mean())


def _consistency(track: Track, occluded: np.ndarray) -> float:
    """1 - coefficient of variation of the area over non-occluded frames (absent frames count as 0)."""
    area = track.area[~occluded]
    if area.mean() <= 0:
        return 0.0
    return float(max(0.0, 1.0 - area.std() / area.mean()))


# ---------------------------------------------------------------------------------------------- one object
def _measure_object(expected: shapes.ObjectAttrs, track: Track | None, occluded: np.ndarray, color_ok: bool,
                    canvas: int) -> dict:
    """Scores and measurements of one expected object given its matched track (None: nothing matched)."""
    if track is None:
        return {"expected": expected.phrase, "matched_color": None, "color": 0.0, "shape": 0.0, "size": 0.0,
                "motion": 0.0, "motion_axis": 0.0, "consistency": 0.0, "smoothness": 0.0, "speed": 0.0,
                "measured": None}
    if not (track.present & ~occluded).any():  # occluded throughout: measure on every frame instead
        occluded = np.zeros_like(occluded)
    valid = track.present & ~occluded
    box = track.box[valid]
    h, w = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    fill = float((track.area[valid] / (h * w)).mean())
    side = float(np.median(np.maximum(h, w)))
    shape = _nearest(fill, FILL_RATIOS)
    size = _nearest(side, {s: float(shapes.side_pixels(s, canvas)) for s in shapes.SIZES})

    early = np.arange(valid.size) < MOTION_FRAMES
    motion_frames = np.flatnonzero(valid & early)
    if motion_frames.size < 2 or motion_frames[-1] - motion_frames[0] < MOTION_FRAMES // 2:
        motion_frames = np.flatnonzero(track.present & early)  # too little unoccluded time: use all
    velocity = _velocity(track.centroid, motion_frames, canvas)
    motion = motion_label(velocity) if velocity is not None else None
    return {
        "expected": expected.phrase,
        "matched_color": track.color,
        "color": float(color_ok),
        "shape": float(shape == expected.shape),
        "size": float(size == expected.size),
        "motion": float(motion == expected.motion),
        "motion_axis": float(motion is not None and MOTION_AXES[motion] == MOTION_AXES[expected.motion]),
        "consistency": _consistency(track, occluded),
        "smoothness": _smoothness(track, valid, canvas),
        "speed": _mean_speed(track, valid, canvas),
        "measured": {"presence": track.presence, "shape": shape, "fill_ratio": fill, "size": size,
                     "side": side / canvas, "motion": motion,
                     "velocity": None if velocity is None else [float(velocity[1]), float(velocity[0])]},
    }


def _match(expected: Sequence[shapes.ObjectAttrs], tracks: dict[str, Track]) -> tuple[list[Track | None], list[bool]]:
    """Matched track and color correctness per expected object (see module docstring, step 3)."""
    wanted = {a.color for a in expected}
    spare = sorted((t for c, t in tracks.items() if c not in wanted and t.presence >= PRESENT_FRACTION),
                   key=lambda t: -t.mean_area)
    matched: list[Track | None] = []
    color_ok: list[bool] = []
    for a in expected:
        track = tracks.get(a.color)
        if track is not None and track.presence >= PRESENT_FRACTION:
            matched.append(track)
            color_ok.append(True)
        else:
            matched.append(spare.pop(0) if spare else None)
            color_ok.append(False)
    return matched, color_ok


# ------------------------------------------------------------------------------------------------ one clip
def _check_clip(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be a uint8 array (T, H, W, 3), got {getattr(frames, 'dtype', None)} "
                         f"{getattr(frames, 'shape', None)}")
    t_count, height, width = frames.shape[:3]
    if t_count < shapes.MIN_FRAMES:
        raise InputError(f"a clip needs >= {shapes.MIN_FRAMES} frames, got {t_count}")
    if height != width:
        raise InputError(f"frames must be square, got {height}x{width}")
    if height < shapes.MIN_SIZE:
        raise InputError(f"frames must be >= {shapes.MIN_SIZE} px, got {height}")


def noise_area(canvas: int) -> float:
    """Components smaller than this (pixels) are noise: 25% of a small triangle's area (half its box)."""
    return NOISE_FRACTION * 0.5 * shapes.side_pixels("small", canvas) ** 2


def score_clip(frames: np.ndarray, caption: str) -> dict:
    """ShapesBench scores of one clip for the (canonical or paraphrased) caption it was generated from.

    Returns a dict with the semantic scores (color, shape, size, motion, all_correct), quality scores
    (cleanliness, consistency, smoothness), the unscored diagnostics speed_ratio and motion_axis (both None for
    captions without moving objects),
    the per-clip semantic / quality / total, and per-object measurements. Raises InputError for a caption
    outside the world's grammar or frames that are not a uint8 (T >= 17, square, >= 20 px, RGB) clip."""
    expected = shapes.parse_caption(caption)
    _check_clip(frames)
    canvas = frames.shape[1]
    cls, artifact_fraction = classify(frames)
    tracks = all_tracks(cls, noise_area(canvas))
    matched, color_ok = _match(expected, tracks)

    objects = []
    for i, (attrs, track) in enumerate(zip(expected, matched)):
        others = [t for j, t in enumerate(matched) if j != i and t is not None]
        occluded = _occluded(track, others) if track is not None else np.zeros(frames.shape[0], dtype=bool)
        objects.append(_measure_object(attrs, track, occluded, color_ok[i], canvas))

    wanted = {a.color for a in expected}
    unexpected = sorted(c for c, t in tracks.items() if c not in wanted and t.presence >= UNEXPECTED_FRACTION)
    result: dict = {"caption": shapes.canonical_caption(expected), "held_out": any(a.held_out for a in expected),
                    "frames": int(frames.shape[0]), "canvas": int(canvas)}
    for key in SEMANTIC_KEYS + ("consistency", "smoothness"):
        result[key] = float(np.mean([o[key] for o in objects]))
    result["cleanliness"] = float(max(0.0, 1.0 - artifact_fraction / CLEANLINESS_ZERO_AT))
    result["all_correct"] = float(not unexpected and all(o[k] == 1.0 for o in objects for k in SEMANTIC_KEYS))
    moving = [o for o, a in zip(objects, expected) if a.motion != "still"]
    result["speed_ratio"] = float(np.mean([o["speed"] for o in moving]) / SPEED_MID) if moving else None
    result["motion_axis"] = float(np.mean([o["motion_axis"] for o in moving])) if moving else None
    result["semantic"] = float(np.mean([result[k] for k in SEMANTIC_KEYS]))
    result["quality"] = float(np.mean([result[k] for k in QUALITY_KEYS]))
    result["total"] = (4.0 * result["quality"] + result["semantic"]) / 5.0
    result["artifact_fraction"] = artifact_fraction
    result["unexpected_colors"] = unexpected
    result["objects"] = objects
    return result


# -------------------------------------------------------------------------------------------------- totals
#: Reported, not scored: mean over the clips that have a moving object (None when none has).
DIAGNOSTIC_KEYS = ("speed_ratio", "motion_axis")
TOTAL_KEYS = ("semantic", "quality", "total", "all_correct") + SEMANTIC_KEYS + QUALITY_KEYS + DIAGNOSTIC_KEYS


def summarize(results: Iterable[dict]) -> dict:
    """Totals over scored clips: mean of every metric; Semantic = mean(color, shape, size, motion),
    Quality = mean(cleanliness, consistency, smoothness), Total = (4 Quality + Semantic) / 5."""
    results = list(results)
    out: dict = {"n": len(results)}
    if not results:
        return {**out, **{k: None for k in TOTAL_KEYS}}
    for key in SEMANTIC_KEYS + QUALITY_KEYS + ("all_correct",):
        out[key] = float(np.mean([r[key] for r in results]))
    for key in DIAGNOSTIC_KEYS:
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["semantic"] = float(np.mean([out[k] for k in SEMANTIC_KEYS]))
    out["quality"] = float(np.mean([out[k] for k in QUALITY_KEYS]))
    out["total"] = (4.0 * out["quality"] + out["semantic"]) / 5.0
    return {k: out[k] for k in ("n",) + TOTAL_KEYS}


def report(results: Sequence[dict], errors: Sequence[dict] = (), **meta) -> dict:
    """Full report: in-distribution and held-out totals (and all prompts), per-clip results and errors."""
    return {
        "judge": JUDGE_VERSION,
        "world": shapes.WORLD_VERSION,
        **meta,
        "in_distribution": summarize(r for r in results if not r["held_out"]),
        "held_out": summarize(r for r in results if r["held_out"]),
        "all": summarize(results),
        "n_errors": len(errors),
        "errors": list(errors),
        "clips": list(results),
    }


# ---------------------------------------------------------------------------------------------- directories
def _find_video(videos: Path, manifest_file: str) -> Path | None:
    """The video for a manifest entry: the named file if it exists, else the first of .mp4/.npz/.npy with the
    same path stem (so a manifest of .npz ground truth also indexes generated .mp4 files)."""
    named = videos / manifest_file
    if named.is_file() and named.suffix.lower() in VIDEO_EXTENSIONS:
        return named
    for ext in (".mp4", ".npz", ".npy"):
        candidate = named.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def score_file(path: str | os.PathLike, caption: str) -> dict:
    """Load and score one video file; raises InputError for unreadable files or bad captions."""
    return score_clip(load_clip(path), caption)


def score_videos(videos_dir: str | os.PathLike, manifest: str | os.PathLike | None = None) -> dict:
    """Score every video listed in the manifest (default: `videos_dir/manifest.jsonl`).

    Missing, unreadable, corrupt or truncated files and bad captions become per-clip entries of
    ``report["errors"]``; video files of the directory that no manifest entry names are listed in
    ``report["unmatched_files"]``. Raises InputError when the directory or the manifest is unusable."""
    videos = Path(videos_dir)
    if not videos.is_dir():
        raise InputError(f"videos directory not found: {videos}")
    manifest_path = Path(manifest) if manifest is not None else videos / MANIFEST_NAME
    if manifest is None and not manifest_path.is_file():
        raise InputError(f"no manifest: pass --manifest FILE (JSONL with 'file' and 'caption') or put "
                         f"{MANIFEST_NAME} in {videos}")
    records = read_manifest(manifest_path)
    results, errors, used = [], [], set()
    for rec in records:
        path = _find_video(videos, rec["file"])
        if path is None:
            errors.append({"file": rec["file"], "caption": rec["caption"], "error": "video file not found"})
            continue
        used.add(path.resolve())
        try:
            result = score_file(path, rec["caption"])
        except InputError as e:
            errors.append({"file": path.name, "caption": rec["caption"], "error": str(e)})
            continue
        results.append({"file": path.name, **result})
    unmatched = sorted(str(p.relative_to(videos)) for p in videos.rglob("*")
                       if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and p.resolve() not in used)
    return {**report(results, errors, videos=str(videos), manifest=str(manifest_path)),
            "unmatched_files": unmatched}
