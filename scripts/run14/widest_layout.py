"""Run 14 prototype: among the whole prompt's samples that assemble, use the one whose objects are farthest apart.

Same arguments as `causal-forcing eval model`; the sampler's layout choice is patched (first that assembles ->
widest gap between the two placed objects' boxes) for this process only.
"""
import sys

import torch

from causal_forcing.cli import main
from causal_forcing.pipelines import compose
from causal_forcing.pipelines import first_frame as ff

_place = compose.place_objects


def gap_of(frame):
    """The gap in pixels between the boxes of the two brightest-coloured objects of an assembled frame."""
    rgb = (frame.float() + 1) * 127.5
    mask = rgb.amax(0) > compose.OBJECT_LEVEL
    # label the objects by colour clusters: take the boxes of the pixels closest to each distinct colour
    cols = rgb[:, mask].T
    if len(cols) == 0:
        return -1.0
    first = cols[0]
    far = ((cols - first).pow(2).sum(1).sqrt() > compose.COLOUR_RADIUS)
    if not far.any():
        return -1.0
    second = cols[far][0]
    boxes = []
    for c in (first, second):
        m = mask & ((rgb - c.view(3, 1, 1)).pow(2).sum(0).sqrt() < compose.COLOUR_RADIUS)
        boxes.append(compose.object_box(m))
    a, b = boxes
    dy = max(b[0] - a[1], a[0] - b[1], 0)
    dx = max(b[2] - a[3], a[2] - b[3], 0)
    return float(max(dx, dy))


def assemble(self, first, drawn, plan, extra):
    layouts, heads, at = [], [], 0
    for _, clauses, each in plan:
        layouts += range(at, at + extra)
        heads += [at + extra + j * each for j in range(clauses)]
        at += extra + clauses * each
    rows = [row for row, _, _ in plan]
    decoded = self._decode(torch.cat([first[rows], drawn[layouts], drawn[heads]]))
    chosen, others = decoded[:len(rows)], decoded[len(rows):len(rows) + len(layouts)]
    head_pixels = iter(decoded[len(rows) + len(layouts):])
    made, at = [], 0
    for n, (row, clauses, each) in enumerate(plan):
        drawings = [ff._Drawings(self._decode, next(head_pixels),
                                 drawn[at + extra + j * each + 1:at + extra + (j + 1) * each]) for j in range(clauses)]
        at += extra + clauses * each
        frames = [f for f in (_place(layout, drawings) for layout in [chosen[n], *others[n * extra:(n + 1) * extra]])
                  if f is not None]
        if frames:
            made.append((row, max(frames, key=gap_of)))
    if made:
        encoded = self._encode(torch.stack([frame for _, frame in made]))
        for (row, _), latent in zip(made, encoded):
            first[row] = latent.to(first)


ff.FirstFrameSampler._assemble = assemble
sys.exit(main(["eval", "model", *sys.argv[1:]]))
