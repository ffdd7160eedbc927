"""Run 14 prototype: among the whole prompt's samples that the clause drawings fit, use the one whose objects are
farthest apart.

Same arguments as `causal-forcing eval model`; the sampler's layout choice (`FirstFrameSampler._choose_layout`) is
patched for this process only. (As run, the script patched the whole `_assemble` loop with the same rule; it was
cut down to the one method when the library grew it.)
"""
import sys

from causal_forcing.cli import main
from causal_forcing.pipelines import compose
from causal_forcing.pipelines import first_frame as ff


def gap_of(placement):
    """The largest gap in pixels, along rows or columns, between the boxes of the first two placed objects."""
    a, b = (compose.object_box(compose._rgb(layer).amax(dim=0) > compose.OBJECT_LEVEL)
            for layer in placement.layers[:2])
    return float(max(b[0] - a[1], a[0] - b[1], b[2] - a[3], a[2] - b[3], 0))


def choose_layout(self, layouts, drawings):
    placements = [p for p in (compose.place_layers(layout, drawings) for layout in layouts) if p is not None]
    return max(placements, key=gap_of) if placements else None


ff.FirstFrameSampler._choose_layout = choose_layout
sys.exit(main(["eval", "model", *sys.argv[1:]]))
