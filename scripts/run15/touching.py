"""Run 15 diagnostic: how often the two objects of the in-distribution two-object clips touch (object boxes within
1 px of each other) in the real clips and in saved evaluation clips.

    python scripts/run15/touching.py EVAL_DIR [EVAL_DIR ...]    # folders of `eval model --save-videos 200`
"""
import sys
from pathlib import Path

import numpy as np

from causal_forcing.data.shapes_io import _load_mp4, load_clip, read_manifest
from causal_forcing.eval import shapesbench as SB

ENTRIES = read_manifest("runs/eval_data/manifest.jsonl")


def touching(frames, colors):
    """Per frame where both objects are found: are their boxes within 1 px? None if one is never found."""
    cls, _ = SB.classify(frames)
    tracks = SB.all_tracks(cls, SB.noise_area(64))
    a, b = tracks.get(colors[0]), tracks.get(colors[1])
    if a is None or b is None:
        return None
    both = a.present & b.present
    if not both.any():
        return None
    p, q = a.box[both], b.box[both]
    gap = np.max(np.stack([p[:, 0] - q[:, 2], q[:, 0] - p[:, 2], p[:, 1] - q[:, 3], q[:, 1] - p[:, 3]]), axis=0)
    return gap <= 1


def loader(folder):
    return lambda i, e: _load_mp4(Path(f"{folder}/eval_{i:03d}.mp4"))


sources = [("real", lambda i, e: load_clip(Path("runs/eval_data") / e["file"]))]
for name, load in sources + [(folder, loader(folder)) for folder in sys.argv[1:]]:
    any_touch, fraction = [], []
    for i, e in enumerate(ENTRIES):
        if e.get("held_out") or " and " not in e["caption"]:
            continue
        t = touching(load(i, e), [c.split()[2] for c in e["caption"].split(" and ")])
        if t is not None:
            any_touch.append(t.any())
            fraction.append(t.mean())
    print(f"{name}: {len(any_touch)} clips, touching at some frame {np.mean(any_touch):.3f}, "
          f"in {np.mean(fraction):.3f} of the frames")
