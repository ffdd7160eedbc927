"""Run 15 prototype: of the whole caption's layouts that the clause drawings fit, the one a layout critic scores
highest. The critic is a frame-text matcher (`models/matcher.py`) trained by `ldata.py` + run 12's `mtrain.py` to
tell the true caption of a rendered frame 0 from captions with other motion words, so it judges whether the objects'
places suit the caption's motions (learned from the world's frames, not the simulator's rule).

    python scripts/run15/critic_layout.py --critic MATCHER_DIR ARGS

ARGS as for `causal-forcing eval model`; the sampler's layout choice (`FirstFrameSampler._choose_layout`) is patched
for this process only.
"""
import sys

import torch

from causal_forcing.cli import main
from causal_forcing.models.matcher import load_matcher
from causal_forcing.pipelines import first_frame as ff
from causal_forcing.pipelines.compose import paint, place_layers

args = sys.argv[1:]
i = args.index("--critic")
CRITIC = load_matcher(args[i + 1])
del args[i:i + 2]
state = {}
_first_frame, _assemble = ff.FirstFrameSampler.first_frame, ff.FirstFrameSampler._assemble


def first_frame(self, context, noise, prompts=None):
    state["context"] = context
    return _first_frame(self, context, noise, prompts)


def assemble(self, first, drawn, plan, extra):
    state["rows"], state["at"] = [row for row, _, _ in plan], 0
    return _assemble(self, first, drawn, plan, extra)


@torch.no_grad()
def choose_layout(self, layouts, drawings):
    row = state["rows"][state["at"]]
    state["at"] += 1
    fits = [p for p in (place_layers(layout, drawings) for layout in layouts) if p is not None]
    if len(fits) < 2:
        return fits[0] if fits else None
    latents = self._encode(torch.stack([paint(p.background, p.layers) for p in fits]))[:, 0]
    context = state["context"][row:row + 1].expand(len(fits), -1, -1).float()
    scores = CRITIC(latents, context)
    return fits[int(scores.argmax())]


ff.FirstFrameSampler.first_frame = first_frame
ff.FirstFrameSampler._assemble = assemble
ff.FirstFrameSampler._choose_layout = choose_layout
sys.exit(main(["eval", "model", *args]))
