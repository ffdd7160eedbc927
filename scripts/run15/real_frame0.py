"""Run 15 experiment: the shipped frame-wise pipeline with the real clip's frame 0 in place of the assembled one,
its frames 1-3 still made object by object by the prefix model (each object of the real frame alone on the
background, continued with its own clause, the clips painted together). Splits the gap of the shipped prefix to
the real one (`real_prefix.py`) into frame 0 and frames 1-3.

    python scripts/run15/real_frame0.py [--weights DIR] [--manifest EVAL.jsonl] [--seed S] --out DIR
"""
import argparse
import json
from pathlib import Path

import torch

from causal_forcing.data.shapes import COLORS
from causal_forcing.data.shapes_io import load_clip, read_manifest
from causal_forcing.eval import models as M
from causal_forcing.pipelines import first_frame as ff
from causal_forcing.models.text import split_clauses
from causal_forcing.pipelines.compose import Placement
from causal_forcing.pipelines.loading import load_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("--weights", default="causal_forcing/assets/shapes_framewise")
ap.add_argument("--manifest", default="runs/eval_data/manifest.jsonl")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.set_num_threads(2)
pipe = load_pipeline(args.weights)
entries = {e["caption"]: e for e in read_manifest(args.manifest)}
root = Path(args.manifest).parent


def real_frame(caption):
    """Frame 0 [3, H, W] in [-1, 1] and, per clause, that object alone on black (exact palette pixels)."""
    pixels = torch.from_numpy(load_clip(root / entries[caption]["file"])[0]).permute(2, 0, 1)
    frame = pixels.float() / 127.5 - 1
    layers = []
    for obj in entries[caption]["objects"]:
        mask = (pixels == torch.tensor(COLORS[obj["color"]])[:, None, None]).all(0)
        layers.append(torch.where(mask, frame, torch.full_like(frame, -1.0)))
    return frame, layers


@torch.no_grad()
def first_frame(self, context, noise, prompts=None):
    frames, placements = [], {}
    for row, prompt in enumerate(prompts):
        frame, layers = real_frame(prompt)
        frames.append(frame)
        if len(split_clauses(prompt)) > 1:
            placements[row] = Placement(torch.full_like(frame, -1.0), layers)
    return self._encode(torch.stack(frames)), placements


ff.FirstFrameSampler.first_frame = first_frame
settings = M.EvalSettings(kind="causal", seed=args.seed, first_frame=pipe.first_frame, save_videos=200)
rep = M.evaluate(pipe.model, pipe.vae, pipe.text_encoder, args.manifest, settings, out_dir=args.out, progress=True)
print(json.dumps({k: rep[k] for k in ("in_distribution", "held_out")}))
