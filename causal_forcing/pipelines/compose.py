"""Frame 0 of a multi-object caption, assembled object by object (scenes of flat objects on a dark background).

A first-frame model asked for two objects places them well (where they start decides where they go, and the
pair has to fit together), but on ShapesWorld it draws them worse than one object alone: rounded blobs that read
as the wrong shape (docs/results.md, "Run 12"). Asked for one object, it draws it right far more often. So frame 0
can be put together from both (docs/results.md, "Run 13"):

1. the model's sample for the whole caption is the *layout*: where each object is;
2. each clause ("a small red circle moving right") is sampled alone: the *drawing* of its object;
3. every drawing is moved so that its object sits where the layout has the object of the same colour, and the
   moved objects are painted on the background in clause order.

The same layers can carry on past frame 0 (``first_frame.compose_prefix``, pipelines/first_frame.py): each object
alone on the background (its layer, :func:`place_layers`) is continued by the prefix model with its own clause,
and the per-object clips are painted together frame by frame (:func:`paint`).

A learned layout model (models/layout.py) may give the places instead (:func:`place_at`: each drawing centred on a
given point, on the layout frame's background; docs/results.md, "Run 16").

No attribute is read from the caption (the clause samples carry colour, shape and size; the layout carries
place), and nothing is learned here. It assumes what ShapesWorld scenes are: objects of distinct, bright colours
on a dark, flat background, not overlapping at frame 0. Where that does not hold for a frame (a colour of the
layout is missing, a drawing is empty, two moved objects would touch), :func:`place_objects` returns None and the
layout frame is kept as it is, so the step can only replace a frame by one it could assemble.

Pixels here are ``[3, H, W]`` in [-1, 1], as the VAE decodes them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

OBJECT_LEVEL = 100.0
"""A pixel belongs to an object when its brightest channel exceeds this (0-255); the background is dark."""
COLOUR_RADIUS = 80.0
"""A layout pixel is the same object as a drawing when their RGB colours are closer than this (0-255)."""
MIN_GAP = 1
"""At least this many empty pixels must separate the moved objects' bounding boxes."""

Box = tuple[int, int, int, int]   # top, bottom, left, right (inclusive pixel rows / columns)


def _rgb(pixels: Tensor) -> Tensor:
    return (pixels.float() + 1.0) * 127.5


def object_box(mask: Tensor) -> Box | None:
    """Bounding box (top, bottom, left, right) of the True pixels of ``mask`` [H, W]; None when there are none."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def boxes_touch(a: Box, b: Box, gap: int = MIN_GAP) -> bool:
    """Whether boxes ``a`` and ``b`` overlap, or fewer than ``gap`` empty pixels separate them (gap 1: adjacent
    boxes touch, one empty row or column between them does not)."""
    return not (a[1] + gap < b[0] or b[1] + gap < a[0] or a[3] + gap < b[2] or b[3] + gap < a[2])


class Placement(NamedTuple):
    """Where :func:`place_layers` put the objects: the layout's flat ``background`` [3, H, W] and, per clause in
    order, its drawing shifted to its place (``layers``, each [3, H, W], the drawing's own background moved with it).
    """

    background: Tensor
    layers: list[Tensor]


def paint(background: Tensor, layers: Sequence[Tensor]) -> Tensor:
    """``layers`` painted over ``background`` in order, each pixel taken from the brightest so far (so the dim rims
    around one object do not cut into another). Works on frames [3, H, W] and on clips [T, 3, H, W] alike (the
    background is broadcast)."""
    canvas = background.float().expand_as(layers[0]).clone() if layers else background.float().clone()
    for layer in layers:
        brighter = _rgb(layer).amax(dim=-3, keepdim=True) > _rgb(canvas).amax(dim=-3, keepdim=True)
        canvas = torch.where(brighter, layer.float(), canvas)
    return canvas


def place_objects(layout: Tensor, drawings: Sequence[Iterable[Tensor]]) -> Tensor | None:
    """Frame 0 assembled from ``layout`` [3, H, W] (the sample for the whole caption) and, for each clause in
    order, its candidate drawings (each [3, H, W], the clause sampled alone; an iterable, read only as far as the
    first drawing that has an object); None where it cannot be assembled: :func:`place_layers`, painted."""
    placement = place_layers(layout, drawings)
    return None if placement is None else paint(placement.background, placement.layers)


def _first_object(candidates: Iterable[Tensor]) -> tuple[Tensor, Tensor, Tensor, Box] | None:
    """The first drawing of ``candidates`` that has an object: (drawing, its RGB, object mask, object box)."""
    for candidate in candidates:
        rgb = _rgb(candidate)
        mask = rgb.amax(dim=0) > OBJECT_LEVEL
        box = object_box(mask)
        if box is not None:
            return candidate, rgb, mask, box
    return None


def _background(layout: Tensor) -> Tensor:
    """The flat background [3, H, W] of ``layout`` [3, H, W]: its darkest pixel everywhere."""
    height, width = layout.shape[-2:]
    darkest = _rgb(layout).sum(dim=0).flatten().argmin()
    return layout.float().flatten(1)[:, darkest].view(3, 1, 1).expand(3, height, width)


def _shift(drawing: Tensor, box: Box, centre_y: float, centre_x: float) -> tuple[Tensor, Box]:
    """``drawing`` moved (whole pixels) so that its object's ``box`` is centred on (centre_y, centre_x) in pixel
    coordinates, kept inside the frame: the moved drawing and box."""
    height, width = drawing.shape[-2:]
    dy = round(centre_y - (box[0] + box[1]) / 2)
    dx = round(centre_x - (box[2] + box[3]) / 2)
    dy = max(-box[0], min(height - 1 - box[1], dy))
    dx = max(-box[2], min(width - 1 - box[3], dx))
    moved = (box[0] + dy, box[1] + dy, box[2] + dx, box[3] + dx)
    return torch.roll(drawing.float(), shifts=(dy, dx), dims=(-2, -1)), moved


def _place(layout: Tensor, drawings: Sequence[Iterable[Tensor]],
           target: Callable[[int, tuple[Tensor, Tensor, Tensor, Box]], tuple[float, float] | None]) -> Placement | None:
    """Each clause's first drawing with an object, moved so that its object's box is centred on ``target(clause
    index, (drawing, rgb, mask, box))`` ((y, x) in pixels), on ``layout``'s flat background; None where a clause has
    no such drawing, ``target`` gives None, or two moved objects' boxes would touch."""
    if layout.dim() != 3 or layout.shape[0] != 3:
        raise ValueError(f"layout must be [3, H, W], got {list(layout.shape)}")
    placed: list[Box] = []
    layers: list[Tensor] = []
    for j, candidates in enumerate(drawings):
        found = _first_object(candidates)
        if found is None:
            return None
        centre = target(j, found)
        if centre is None:
            return None
        layer, moved = _shift(found[0], found[3], *centre)
        if any(boxes_touch(moved, other) for other in placed):
            return None
        placed.append(moved)
        layers.append(layer)
    return Placement(_background(layout), layers)


def place_at(layout: Tensor, drawings: Sequence[Iterable[Tensor]], centres: Sequence[tuple[float, float]]) \
        -> Placement | None:
    """Each clause's drawing (arguments as :func:`place_objects`) moved so that its object's box is centred on
    the clause's entry of ``centres`` ((x, y) in canvas units, [0, 1]), on ``layout``'s flat background; None when
    a clause has no drawing with an object or two moved objects' boxes would touch. The places come from a layout
    model (models/layout.py) instead of the layout frame's objects."""
    if len(centres) != len(drawings):
        raise ValueError(f"{len(centres)} centres for {len(drawings)} clauses")
    height, width = layout.shape[-2:]
    return _place(layout, drawings, lambda j, _: (centres[j][1] * height - 0.5, centres[j][0] * width - 0.5))


def place_layers(layout: Tensor, drawings: Sequence[Iterable[Tensor]]) -> Placement | None:
    """Each clause's drawing moved to its place in ``layout`` [3, H, W] (arguments as :func:`place_objects`);
    None where the frame cannot be assembled.

    For each clause the first candidate that has an object is used: the object's mean colour finds the layout's
    pixels of that colour, and the drawing is shifted (whole pixels) so that its object's box is centred on theirs,
    kept inside the frame. The background is the layout's darkest pixel (a flat background). It declines when a
    colour is missing from the layout, a clause has no drawing with an object, or two moved objects' boxes would
    touch."""
    layout_rgb = _rgb(layout)
    layout_objects = layout_rgb.amax(dim=0) > OBJECT_LEVEL

    def where_its_colour_is(_: int, found: tuple[Tensor, Tensor, Tensor, Box]) -> tuple[float, float] | None:
        _, rgb, mask, _ = found
        colour = rgb[:, mask].mean(dim=1)
        box = object_box(layout_objects & ((layout_rgb - colour.view(3, 1, 1)).pow(2).sum(dim=0).sqrt()
                                           < COLOUR_RADIUS))
        return None if box is None else ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2)

    return _place(layout, drawings, where_its_colour_is)
