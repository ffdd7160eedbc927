"""ShapesWorld (`shapes-v1`): a procedural text-to-video world with a known ground truth.

The contract is `/work/shared/shapes_world.md` (§1); `docs/shapes_world.md` documents the choices this module
makes where the contract is silent. In short:

* Positions are the top-left corner of an object's bounding box in canvas units (fraction of the canvas side).
  The position at frame ``t`` is the linear path ``p0 + v t`` mirrored at the walls (an elastic bounce), and
  the drawn box is the nearest integer pixel position, so boxes never leave the canvas.
* Every random draw is ``Generator.random()`` (uniform doubles) of a ``PCG64`` generator seeded through a
  ``SeedSequence`` that mixes the world tag; choices are ``floor(u * n)``. Both are stable across machines
  and numpy versions, so a clip is a pure function of (world version, size, frames, seed).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError

WORLD_VERSION = "shapes-v1"
FPS = 16

# Palette in a fixed order (the order is part of the world: it indexes color draws).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 70, 220),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.20, "big": 0.32}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = DIRECTIONS + ("still",)
SPEED_RANGE: tuple[float, float] = (0.015, 0.03)  # canvas units per frame
NO_BOUNCE_FRAMES = 16
MAX_OVERLAP_FRACTION = 0.10
MAX_OBJECTS = 2

# A small circle must stay distinguishable from a square: at 16 px the small side is 3 px and a 3-px disc is a
# full square. From 20 px on (small side >= 4 px) every shape/size is told apart by the judge.
MIN_SIZE = 20
MIN_FRAMES = 17
DEFAULT_SIZE = 64
DEFAULT_FRAMES = 81

# Held-out combinations (only in evaluation prompts).
EVAL_SET_SIZE = 200
EVAL_SET_HELD_OUT_FRACTION = 0.10
EVAL_SET_SEED = 20_250_601

_MAX_LAYOUT_TRIES = 2000
_MAX_ATTRIBUTE_TRIES = 100
# SeedSequence stream tags: the world version and the purpose of the generator are mixed into the entropy.
_WORLD_TAG = 0x53485031  # "SHP1"
_STREAM_CLIP = 1
_STREAM_CAPTION = 2
_STREAM_DATASET = 3
_STREAM_EVAL = 4

_DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}


# --------------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class ObjectAttrs:
    """What a caption says about one object."""

    size: str
    color: str
    shape: str
    motion: str  # one of MOTIONS

    def __post_init__(self) -> None:
        if self.size not in SIZES or self.color not in COLORS or self.shape not in SHAPES \
                or self.motion not in MOTIONS:
            raise InputError(f"invalid object attributes: {self.size!r} {self.color!r} {self.shape!r} "
                             f"{self.motion!r}")

    @property
    def phrase(self) -> str:
        """Canonical caption phrase of this object."""
        base = f"a {self.size} {self.color} {self.shape}"
        return f"{base} standing still" if self.motion == "still" else f"{base} moving {self.motion}"

    @property
    def held_out(self) -> bool:
        """True for the held-out combinations: any yellow triangle, any purple object moving up."""
        return (self.color == "yellow" and self.shape == "triangle") or \
            (self.color == "purple" and self.motion == "up")


@dataclass(frozen=True)
class ObjectParams:
    """Full parameters of one object: attributes plus start position (bounding-box top-left, canvas units)
    and speed (canvas units per frame, 0 for still objects)."""

    attrs: ObjectAttrs
    x0: float
    y0: float
    speed: float

    def to_dict(self) -> dict:
        """JSON-ready dict (attributes flattened)."""
        return {**asdict(self.attrs), "x0": self.x0, "y0": self.y0, "speed": self.speed}

    @staticmethod
    def from_dict(d: dict) -> "ObjectParams":
        """Inverse of `to_dict`."""
        attrs = ObjectAttrs(size=d["size"], color=d["color"], shape=d["shape"], motion=d["motion"])
        return ObjectParams(attrs=attrs, x0=float(d["x0"]), y0=float(d["y0"]), speed=float(d["speed"]))


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip's pixels."""

    objects: tuple[ObjectParams, ...]
    size: int
    frames: int
    seed: int
    world: str = WORLD_VERSION

    @property
    def attrs(self) -> tuple[ObjectAttrs, ...]:
        return tuple(o.attrs for o in self.objects)

    @property
    def caption(self) -> str:
        """Canonical caption."""
        return canonical_caption(self.attrs)

    @property
    def held_out(self) -> bool:
        return any(a.held_out for a in self.attrs)


# -------------------------------------------------------------------------------------------------- checks
def validate_canvas(size: int, frames: int) -> None:
    """Raise InputError unless `size` / `frames` are valid for the world."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise InputError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < MIN_FRAMES \
            or (frames - 1) % 4 != 0:
        raise InputError(f"frames must be 1 + 4k and >= {MIN_FRAMES} (e.g. 17, 33, 81), got {frames!r}")


def _validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def side_pixels(size_name: str, canvas: int) -> int:
    """Bounding-box side in pixels of a `size_name` object on a `canvas`-pixel canvas (round half up)."""
    return int(math.floor(SIZES[size_name] * canvas + 0.5))


# -------------------------------------------------------------------------------------------------- random
def make_rng(seed: int, stream: int) -> np.random.Generator:
    """PCG64 generator for `seed` and a purpose `stream`, with the world tag mixed in."""
    _validate_seed(seed)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_WORLD_TAG, stream, int(seed)])))


def _uniform(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(rng.random())


def _choice(rng: np.random.Generator, options: Sequence):
    return options[min(int(float(rng.random()) * len(options)), len(options) - 1)]


def derived_seed(base_seed: int, index: int, stream: int) -> int:
    """A 53-bit (JSON-safe) seed for item `index` of a set seeded with `base_seed`."""
    _validate_seed(base_seed)
    state = np.random.SeedSequence([_WORLD_TAG, stream, int(base_seed), int(index)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(11))


def dataset_clip_seed(dataset_seed: int, index: int) -> int:
    """Seed of clip `index` of a training set generated with `--seed dataset_seed`."""
    return derived_seed(dataset_seed, index, _STREAM_DATASET)


# ------------------------------------------------------------------------------------------------ sampling
def _sample_attrs(rng: np.random.Generator, taken_colors: Iterable[str], allow_held_out: bool) -> ObjectAttrs:
    colors = [c for c in COLORS if c not in set(taken_colors)]
    for _ in range(_MAX_ATTRIBUTE_TRIES):
        attrs = ObjectAttrs(size=_choice(rng, tuple(SIZES)), color=_choice(rng, colors),
                            shape=_choice(rng, SHAPES), motion=_choice(rng, MOTIONS))
        if allow_held_out or not attrs.held_out:
            return attrs
    raise RuntimeError("could not draw in-distribution attributes")  # probability ~ 0.3**100


def sample_attributes(rng: np.random.Generator, allow_held_out: bool = False) -> tuple[ObjectAttrs, ...]:
    """1 or 2 objects (50/50) with distinct colors; held-out combinations are redrawn unless allowed."""
    n = 1 if rng.random() < 0.5 else 2
    out: list[ObjectAttrs] = []
    for _ in range(n):
        out.append(_sample_attrs(rng, [a.color for a in out], allow_held_out))
    return tuple(out)


def _sample_object_layout(attrs: ObjectAttrs, rng: np.random.Generator, canvas: int) -> ObjectParams:
    """Start position and speed such that no bounce happens in the first NO_BOUNCE_FRAMES frames."""
    free = 1.0 - side_pixels(attrs.size, canvas) / canvas  # range of the top-left coordinate
    dx, dy = _DIRECTION_VECTORS[attrs.motion]
    speed = 0.0 if attrs.motion == "still" else _uniform(rng, *SPEED_RANGE)
    travel = speed * (NO_BOUNCE_FRAMES - 1)  # displacement between frame 0 and frame 15

    def start(direction: int) -> float:
        if direction > 0:
            return _uniform(rng, 0.0, free - travel)
        if direction < 0:
            return _uniform(rng, travel, free)
        return _uniform(rng, 0.0, free)

    x0 = start(dx)
    y0 = start(dy)
    return ObjectParams(attrs=attrs, x0=x0, y0=y0, speed=speed)


def sample_layout(attrs: Sequence[ObjectAttrs], rng: np.random.Generator, canvas: int,
                  frames: int) -> tuple[ObjectParams, ...] | None:
    """Positions and speeds for `attrs`, redrawn until bounding boxes overlap in at most 10% of the frames.

    Returns None when no valid layout was found within the try budget."""
    for _ in range(_MAX_LAYOUT_TRIES):
        objs = tuple(_sample_object_layout(a, rng, canvas) for a in attrs)
        if len(objs) < 2 or overlap_fraction(objs, canvas, frames) <= MAX_OVERLAP_FRACTION:
            return objs
    return None


def sample_clip(seed: int, size: int = DEFAULT_SIZE, frames: int = DEFAULT_FRAMES) -> ClipSpec:
    """A training clip (never contains a held-out combination), a pure function of its arguments."""
    validate_canvas(size, frames)
    rng = make_rng(seed, _STREAM_CLIP)
    for _ in range(_MAX_ATTRIBUTE_TRIES):
        attrs = sample_attributes(rng, allow_held_out=False)
        objs = sample_layout(attrs, rng, size, frames)
        if objs is not None:
            return ClipSpec(objects=objs, size=int(size), frames=int(frames), seed=int(seed))
    raise InputError(f"no valid layout for seed {seed} at {frames} frames")


def clip_for_caption(caption: str, seed: int, size: int = DEFAULT_SIZE,
                     frames: int = DEFAULT_FRAMES) -> ClipSpec:
    """The ground-truth clip for a caption (canonical or paraphrase): positions and speeds drawn from `seed`."""
    validate_canvas(size, frames)
    attrs = parse_caption(caption)
    objs = sample_layout(attrs, make_rng(seed, _STREAM_CLIP), size, frames)
    if objs is None:
        raise InputError(f"no layout with <= {MAX_OVERLAP_FRACTION:.0%} overlapping frames for {caption!r} "
                         f"at {frames} frames")
    return ClipSpec(objects=objs, size=int(size), frames=int(frames), seed=int(seed))


# --------------------------------------------------------------------------------------------- trajectories
def positions(obj: ObjectParams, canvas: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer top-left pixel (x, y) of the object's box in every frame, shape (frames,) each."""
    side = side_pixels(obj.attrs.size, canvas)
    free = 1.0 - side / canvas
    dx, dy = _DIRECTION_VECTORS[obj.attrs.motion]
    t = np.arange(frames, dtype=np.float64)

    def axis(p0: float, direction: int) -> np.ndarray:
        p = p0 + direction * obj.speed * t
        if free > 0:
            u = np.mod(p, 2.0 * free)
            p = np.where(u > free, 2.0 * free - u, u)  # mirror at the walls: elastic bounce
        pix = np.floor(p * canvas + 0.5).astype(np.int64)
        return np.clip(pix, 0, canvas - side)

    return axis(obj.x0, dx), axis(obj.y0, dy)


def overlap_fraction(objs: Sequence[ObjectParams], canvas: int, frames: int) -> float:
    """Fraction of frames in which any two objects' pixel bounding boxes overlap (positive area)."""
    boxes = []
    for o in objs:
        x, y = positions(o, canvas, frames)
        s = side_pixels(o.attrs.size, canvas)
        boxes.append((x, y, x + s, y + s))
    hit = np.zeros(frames, dtype=bool)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            hit |= (a[0] < b[2]) & (b[0] < a[2]) & (a[1] < b[3]) & (b[1] < a[3])
    return float(hit.mean())


def valid_start(attrs: Sequence[ObjectAttrs], centres: Sequence[Sequence[float]], rng: np.random.Generator,
                canvas: int = DEFAULT_SIZE, frames: int = DEFAULT_FRAMES) -> bool:
    """Whether objects ``attrs`` starting with their boxes centred on ``centres`` ((x, y) in canvas units) are a
    start the world could draw (:func:`sample_layout`), each moving object given a random speed from ``rng``:
    inside the canvas, no bounce in the first NO_BOUNCE_FRAMES frames, and boxes overlapping in at most
    MAX_OVERLAP_FRACTION of the frames. For measuring layouts made elsewhere (models/layout.py)."""
    if len(attrs) != len(centres):
        raise InputError(f"{len(centres)} centres for {len(attrs)} objects")
    objs = []
    tolerance = 0.5 / canvas                         # half a pixel: starts are compared after rounding
    for a, (cx, cy) in zip(attrs, centres):
        side = side_pixels(a.size, canvas) / canvas
        speed = 0.0 if a.motion == "still" else float(rng.uniform(*SPEED_RANGE))
        free, travel = 1.0 - side, speed * (NO_BOUNCE_FRAMES - 1)
        x0, y0 = cx - side / 2, cy - side / 2
        for p, d in zip((x0, y0), _DIRECTION_VECTORS[a.motion]):
            low, high = (0.0, free - travel) if d > 0 else (travel, free) if d < 0 else (0.0, free)
            if not low - tolerance <= p <= high + tolerance:
                return False
        objs.append(ObjectParams(attrs=a, x0=x0, y0=y0, speed=speed))
    return len(objs) < 2 or overlap_fraction(objs, canvas, frames) <= MAX_OVERLAP_FRACTION


# ------------------------------------------------------------------------------------------------ rendering
@functools.lru_cache(maxsize=64)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Hard-edged (side, side) boolean mask whose bounding box is exactly side x side pixels.

    circle: pixel centres inside the inscribed disc; square: the full box; triangle: isosceles, apex up,
    base = height, pixel centres inside the ideal triangle, with the apex row forced to the 1-2 centre
    pixels so the box keeps its full height."""
    c = np.arange(side, dtype=np.float64) + 0.5 - side / 2.0  # pixel-centre offsets from the box centre
    if shape == "circle":
        mask = c[:, None] ** 2 + c[None, :] ** 2 <= (side / 2.0) ** 2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        rows = np.arange(side, dtype=np.float64)[:, None]
        mask = np.abs(c[None, :]) <= np.maximum((rows + 0.5) / 2.0, 0.5)
    else:
        raise InputError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def render(spec: ClipSpec) -> np.ndarray:
    """Pixels of a clip: uint8 array (frames, size, size, 3), black background, later objects on top."""
    t_count, canvas = spec.frames, spec.size
    video = np.zeros((t_count, canvas, canvas, 3), dtype=np.uint8)
    t_idx = np.arange(t_count)[:, None]
    for obj in spec.objects:
        side = side_pixels(obj.attrs.size, canvas)
        my, mx = np.nonzero(shape_mask(obj.attrs.shape, side))
        x, y = positions(obj, canvas, t_count)
        video[t_idx, y[:, None] + my[None, :], x[:, None] + mx[None, :]] = COLORS[obj.attrs.color]
    return video


def render_seed(seed: int, size: int = DEFAULT_SIZE, frames: int = DEFAULT_FRAMES) -> tuple[ClipSpec, np.ndarray]:
    """Spec and pixels of the training clip with this seed."""
    spec = sample_clip(seed, size, frames)
    return spec, render(spec)


# ------------------------------------------------------------------------------------------------- captions
def canonical_caption(attrs: Sequence[ObjectAttrs]) -> str:
    """One canonical phrase per object joined by ' and '."""
    return " and ".join(a.phrase for a in attrs)


# Paraphrase vocabulary. Every word/phrase maps to exactly one attribute value, so parsing is unambiguous.
_ARTICLES = ("a", "one")
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "big": ("big", "large")}
_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"), "square": ("square", "block"), "triangle": ("triangle",),
}
_MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "moving to the left", "sliding to the left", "going left", "heading left"),
    "right": ("moving right", "moving to the right", "sliding to the right", "going right", "heading right"),
    "up": ("moving up", "moving upward", "going up", "rising", "floating up"),
    "down": ("moving down", "moving downward", "going down", "falling", "sinking"),
    "still": ("standing still", "staying still", "not moving", "at rest", "resting in place"),
}
_JOINERS = (" and ", ", and ", " next to ")
_JOIN_SPLIT = re.compile(r"\s*,\s*and\s+|\s+and\s+|\s+next\s+to\s+")


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_WORD_TO_SIZE = {w: k for k, ws in _SIZE_WORDS.items() for w in ws}
_WORD_TO_SHAPE = {w: k for k, ws in _SHAPE_WORDS.items() for w in ws}
_PHRASE_TO_MOTION = {p: k for k, ps in _MOTION_PHRASES.items() for p in ps}
_PHRASE_RE = re.compile(
    rf"^(?:{_alternation(_ARTICLES)}) (?P<size>{_alternation(_WORD_TO_SIZE)}) (?P<color>{_alternation(COLORS)}) "
    rf"(?P<shape>{_alternation(_WORD_TO_SHAPE)}) (?P<motion>{_alternation(_PHRASE_TO_MOTION)})$"
)


def paraphrase(attrs: Sequence[ObjectAttrs], rng: np.random.Generator) -> str:
    """A random paraphrase of the canonical caption of `attrs` (object order is kept)."""
    phrases = []
    for a in attrs:
        phrases.append(f"{_choice(rng, _ARTICLES)} {_choice(rng, _SIZE_WORDS[a.size])} {a.color} "
                       f"{_choice(rng, _SHAPE_WORDS[a.shape])} {_choice(rng, _MOTION_PHRASES[a.motion])}")
    out = phrases[0]
    for p in phrases[1:]:
        out += _choice(rng, _JOINERS) + p
    return out


def training_caption(spec: ClipSpec, paraphrase_prob: float = 0.5) -> str:
    """Caption used for training a clip: a paraphrase with probability `paraphrase_prob`, else canonical.

    Drawn from its own stream of the clip seed, so it never changes the clip's pixels."""
    rng = make_rng(spec.seed, _STREAM_CAPTION)
    if rng.random() < paraphrase_prob:
        return paraphrase(spec.attrs, rng)
    return spec.caption


def parse_caption(caption: str) -> tuple[ObjectAttrs, ...]:
    """Objects of a canonical caption or paraphrase (case and surrounding whitespace/period ignored).

    Raises InputError for text outside the caption grammar, more than MAX_OBJECTS objects or repeated colors."""
    if not isinstance(caption, str):
        raise InputError(f"caption must be a string, got {type(caption).__name__}")
    text = re.sub(r"\s+", " ", caption.strip().lower()).rstrip(".").strip()
    if not text:
        raise InputError("empty caption")
    out = []
    for part in _JOIN_SPLIT.split(text):
        m = _PHRASE_RE.match(part.strip())
        if m is None:
            raise InputError(f"not a ShapesWorld caption phrase: {part.strip()!r} (in {caption!r})")
        out.append(ObjectAttrs(size=_WORD_TO_SIZE[m["size"]], color=m["color"],
                               shape=_WORD_TO_SHAPE[m["shape"]], motion=_PHRASE_TO_MOTION[m["motion"]]))
    if len(out) > MAX_OBJECTS:
        raise InputError(f"at most {MAX_OBJECTS} objects per caption, got {len(out)}: {caption!r}")
    if len({a.color for a in out}) != len(out):
        raise InputError(f"objects of one caption must have distinct colors: {caption!r}")
    return tuple(out)


def canonicalize(caption: str) -> str:
    """The canonical caption a canonical caption or paraphrase maps to."""
    return canonical_caption(parse_caption(caption))


def caption_is_held_out(caption: str) -> bool:
    """True if any object of the caption is a held-out combination."""
    return any(a.held_out for a in parse_caption(caption))


# --------------------------------------------------------------------------------------------- evaluation set
@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the standard evaluation set."""

    index: int
    caption: str
    seed: int
    held_out: bool


def _sample_held_out_attrs(rng: np.random.Generator) -> tuple[ObjectAttrs, ...]:
    """1 or 2 objects where one (at a random position) is a held-out combination."""
    n = 1 if rng.random() < 0.5 else 2
    if _choice(rng, ("yellow_triangle", "purple_up")) == "yellow_triangle":
        special = ObjectAttrs(size=_choice(rng, tuple(SIZES)), color="yellow", shape="triangle",
                              motion=_choice(rng, MOTIONS))
    else:
        special = ObjectAttrs(size=_choice(rng, tuple(SIZES)), color="purple", shape=_choice(rng, SHAPES),
                              motion="up")
    if n == 1:
        return (special,)
    other = _sample_attrs(rng, [special.color], allow_held_out=True)
    return (special, other) if rng.random() < 0.5 else (other, special)


@functools.lru_cache(maxsize=4)
def standard_eval_prompts(n: int = EVAL_SET_SIZE, seed: int = EVAL_SET_SEED,
                          held_out_fraction: float = EVAL_SET_HELD_OUT_FRACTION) -> tuple[EvalPrompt, ...]:
    """The standard evaluation prompt set: `n` distinct canonical captions, exactly
    round(n * held_out_fraction) of them held-out, each with its own clip seed."""
    rng = make_rng(seed, _STREAM_EVAL)
    n_held = int(round(n * held_out_fraction))
    held_flags = np.zeros(n, dtype=bool)
    held_flags[:n_held] = True
    order = np.argsort(np.array([rng.random() for _ in range(n)]), kind="stable")
    held_flags = held_flags[order]
    seen: set[str] = set()
    prompts = []
    for i in range(n):
        while True:
            attrs = _sample_held_out_attrs(rng) if held_flags[i] else sample_attributes(rng, allow_held_out=False)
            caption = canonical_caption(attrs)
            if caption not in seen:
                break
        seen.add(caption)
        prompts.append(EvalPrompt(index=i, caption=caption, seed=derived_seed(seed, i, _STREAM_EVAL),
                                  held_out=bool(held_flags[i])))
    return tuple(prompts)
