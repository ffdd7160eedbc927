"""Run 12 experiment: the shipped pipeline with the real clip's frame 0 instead of the first-frame model's."""

import sys
import json
import torch
from pathlib import Path
from causal_forcing.data.shapes_io import read_manifest, load_clip
from causal_forcing.eval import models as M
from causal_forcing.pipelines.loading import load_pipeline

torch.set_num_threads(2)
weights = sys.argv[1] if len(sys.argv) > 1 else "causal_forcing/assets/shapes_framewise"
pipe = load_pipeline(weights)
sampler = pipe.first_frame
man = "runs/eval_data/manifest.jsonl"
entries = read_manifest(man)
root = Path(man).parent
with torch.no_grad():
    real = {
        e["caption"]: pipe.vae.encode(
            torch.from_numpy(load_clip(root / e["file"])[:1]).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
        )[:, :1]
        for e in entries
    }
state = {}
orig_for = sampler.for_prompts


def for_prompts(prompts):
    state["p"] = list(prompts)
    return orig_for(prompts)


sampler.for_prompts = for_prompts
orig_solve = sampler._solve


def solve(model, context, noise, initial=None, guidance=None):
    if model is sampler.model:
        return iter([torch.cat([real[p] for p in state["p"]])])
    return orig_solve(model, context, noise, initial=initial, guidance=guidance)


sampler._solve = solve
settings = M.EvalSettings(kind="causal", seed=0, first_frame=sampler)
rep = M.evaluate(
    pipe.model, pipe.vae, pipe.text_encoder, man, settings, out_dir=sys.argv[2] if len(sys.argv) > 2 else None
)
print(json.dumps({k: rep[k] for k in ("in_distribution", "held_out")}))
