"""Run 14 prototype: of the whole prompt's samples that the clause drawings fit, use the one that moves the
drawings least (each clause sample alone puts its object where its own caption implies; a layout that agrees
with them binds each object's place to the right clause).

Same arguments as `causal-forcing eval model`; the sampler's layout choice (`FirstFrameSampler._choose_layout`) is
patched for this process only. (As run, the script patched the whole `_assemble` loop with the same rule; it was
cut down to the one method when the library grew it.)
"""
import sys

from causal_forcing.cli import main
from causal_forcing.pipelines import compose
from causal_forcing.pipelines import first_frame as ff


def box_of(frame):
    return compose.object_box(compose._rgb(frame).amax(dim=0) > compose.OBJECT_LEVEL)


def moved_by(placement, used):
    """Summed distance (pixels) the drawings were moved: each layer's object box against its drawing's."""
    total = 0.0
    for layer, drawing in zip(placement.layers, used):
        a, b = box_of(layer), box_of(drawing)
        total += (((a[0] + a[1]) / 2 - (b[0] + b[1]) / 2) ** 2 + ((a[2] + a[3]) / 2 - (b[2] + b[3]) / 2) ** 2) ** 0.5
    return total


def choose_layout(self, layouts, drawings):
    used = [next((d for d in clause if box_of(d) is not None), None) for clause in drawings]
    tries = [(moved_by(p, used), p) for p in (compose.place_layers(layout, drawings) for layout in layouts)
             if p is not None]
    return min(tries, key=lambda t: t[0])[1] if tries else None


ff.FirstFrameSampler._choose_layout = choose_layout
sys.exit(main(["eval", "model", *sys.argv[1:]]))
