"""Run 15 experiment: the shipped frame-wise pipeline with the real clip's first K latent frames (encoded by the
pipeline's VAE) in place of the first-frame and prefix models' frames; the student continues from frame K.

    python scripts/run15/real_prefix.py [--weights DIR] [--manifest EVAL.jsonl] [--seed S] [--frames K] --out DIR

The ceiling of a perfect prefix: what is left is the student's own. Same clips as `causal-forcing eval model`
otherwise (the same noise for the student's frames).
"""
import argparse
import dataclasses
import json
from pathlib import Path

import torch

from causal_forcing.data.shapes_io import load_clip, read_manifest
from causal_forcing.eval import models as M
from causal_forcing.pipelines.loading import load_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("--weights", default="causal_forcing/assets/shapes_framewise")
ap.add_argument("--manifest", default="runs/eval_data/manifest.jsonl")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--frames", type=int, default=4)
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.set_num_threads(2)
pipe = load_pipeline(args.weights)
sampler = pipe.first_frame
entries = read_manifest(args.manifest)
root = Path(args.manifest).parent
pixels = 1 + 4 * (args.frames - 1)
with torch.no_grad():
    real = {e["caption"]: pipe.vae.encode(torch.from_numpy(load_clip(root / e["file"])[:pixels])
                                          .permute(0, 3, 1, 2)[None].float() / 127.5 - 1) for e in entries}
state = {}
orig_for = sampler.for_prompts


def for_prompts(prompts):
    state["prompts"] = list(prompts)
    return orig_for(prompts)


def iter_sample(self, context, prefix_context, noise, prompts=None):
    frames = torch.cat([real[p] for p in state["prompts"]])
    for i in range(noise.shape[1]):
        yield frames[:, i:i + 1]


sampler.for_prompts = for_prompts
type(sampler).iter_sample = iter_sample
sampler.spec = dataclasses.replace(sampler.spec, frames=args.frames)
settings = M.EvalSettings(kind="causal", seed=args.seed, first_frame=sampler, save_videos=200)
rep = M.evaluate(pipe.model, pipe.vae, pipe.text_encoder, args.manifest, settings, out_dir=args.out, progress=True)
print(json.dumps({k: rep[k] for k in ("in_distribution", "held_out")}))
