"""Run 14 prototype: of the whole prompt's samples that the clause drawings fit, use the one that moves the
drawings least (each clause sample alone puts its object where its own caption implies; a layout that agrees
with them binds each object's place to the right clause).

Same arguments as `causal-forcing eval model`; the sampler's layout choice is patched for this process only.
"""
import sys

import torch

from causal_forcing.cli import main
from causal_forcing.pipelines import compose
from causal_forcing.pipelines import first_frame as ff

def place_with_cost(layout, drawings):
    """place_objects, and the summed distance (pixels) each drawing's box centre was moved (read off the shifts
    it hands torch.roll, patched for the call)."""
    moved = []
    original_roll = torch.roll

    def roll(x, shifts, dims):
        moved.append((shifts[0] ** 2 + shifts[1] ** 2) ** 0.5)
        return original_roll(x, shifts=shifts, dims=dims)

    compose.torch.roll = roll
    try:
        frame = compose.place_objects(layout, drawings)
    finally:
        compose.torch.roll = original_roll
    return frame, sum(moved)


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
        tries = [place_with_cost(layout, drawings) for layout in [chosen[n], *others[n * extra:(n + 1) * extra]]]
        tries = [t for t in tries if t[0] is not None]
        if tries:
            made.append((row, min(tries, key=lambda t: t[1])[0]))
    if made:
        encoded = self._encode(torch.stack([frame for _, frame in made]))
        for (row, _), latent in zip(made, encoded):
            first[row] = latent.to(first)


ff.FirstFrameSampler._assemble = assemble
sys.exit(main(["eval", "model", *sys.argv[1:]]))
