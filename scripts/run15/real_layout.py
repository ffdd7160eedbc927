"""Run 15 experiment: the shipped frame-wise pipeline with the assembly's layout taken from the real clip's frame 0:
the clause samples (the drawings) are placed where the real frame has the objects of their colours (falling back to
the sampler's own choice where they do not fit). Splits the frame-0 gap (`real_frame0.py`) into where the objects
are and how they are drawn.

    python scripts/run15/real_layout.py ARGS        # ARGS as for `causal-forcing eval model`
"""
import json
import sys
from pathlib import Path

import torch

from causal_forcing.cli import main
from causal_forcing.data.shapes_io import load_clip, read_manifest
from causal_forcing.pipelines import first_frame as ff
from causal_forcing.pipelines.compose import place_layers

args = sys.argv[1:]
manifest = Path(args[args.index("--manifest") + 1])
entries = {e["caption"]: e for e in read_manifest(manifest)}
state = {}
_first_frame, _assemble, _choose = (ff.FirstFrameSampler.first_frame, ff.FirstFrameSampler._assemble,
                                    ff.FirstFrameSampler._choose_layout)


def first_frame(self, context, noise, prompts=None):
    state["prompts"] = prompts
    return _first_frame(self, context, noise, prompts)


def assemble(self, first, drawn, plan, extra):
    state["rows"], state["at"] = [row for row, _, _ in plan], 0
    return _assemble(self, first, drawn, plan, extra)


def choose_layout(self, layouts, drawings):
    row = state["rows"][state["at"]]
    state["at"] += 1
    caption = state["prompts"][row]
    real = torch.from_numpy(load_clip(manifest.parent / entries[caption]["file"])[0]).permute(2, 0, 1)
    placement = place_layers(real.float() / 127.5 - 1, drawings)
    state["real"] = state.get("real", 0) + (placement is not None)
    return placement if placement is not None else _choose(self, layouts, drawings)


ff.FirstFrameSampler.first_frame = first_frame
ff.FirstFrameSampler._assemble = assemble
ff.FirstFrameSampler._choose_layout = choose_layout
try:
    main(["eval", "model", *args])
finally:
    print(json.dumps({"placed_on_the_real_layout": state.get("real", 0)}), file=sys.stderr)
