"""Run 15 experiment: data for a layout critic. Frame 0 of rendered ShapesWorld clips (encoded by the bundled VAE)
with the true caption and two negatives that differ from it only in motion words: one object's motion changed, or
(two objects with different motions) the motions swapped. Frame 0 shows no motion, only where the objects start,
so a matcher trained on these learns whether the objects' places suit the caption's motions.

    python scripts/run15/ldata.py N SEED OUT.pt
"""
import dataclasses
import random
import sys
import time

import numpy as np
import torch

from causal_forcing.data import shapes
from causal_forcing.data.shapes import MOTIONS, ObjectAttrs, canonical_caption
from causal_forcing.models.small_vae import load_vae
from causal_forcing.models.text import build_text_encoder

torch.set_num_threads(2)
n, base, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(base)


def with_motion(o, m):
    return ObjectAttrs(**{**o.__dict__, "motion": m})


def negative(attrs):
    a = list(attrs)
    if len(a) == 2 and a[0].motion != a[1].motion and rng.random() < 0.5:
        return canonical_caption([with_motion(a[0], a[1].motion), with_motion(a[1], a[0].motion)])
    i = rng.randrange(len(a))
    a[i] = with_motion(a[i], rng.choice([m for m in MOTIONS if m != a[i].motion]))
    return canonical_caption(a)


vae = load_vae("shapes")
te = build_text_encoder("minilm", text_len=32, device="cpu", cache_size=0)
t = time.time()
frames, caps = [], []
s = base
while len(caps) < n:
    spec = shapes.sample_clip(s, 64, 81)
    clip = shapes.render(dataclasses.replace(spec, frames=1))    # frame 0 only: the same pixels
    s += 1
    if spec.held_out:
        continue
    frames.append(clip[0])
    caps.append((canonical_caption(spec.attrs), negative(spec.attrs), negative(spec.attrs)))
x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[:, None].float() / 127.5 - 1
with torch.no_grad():
    z = torch.cat([vae.encode(x[k:k + 500]) for k in range(0, n, 500)])
print("latents", round(time.time() - t), flush=True)
flat = [c for cs in caps for c in cs]
emb = torch.cat([te.encode(flat[k:k + 512]).half() for k in range(0, len(flat), 512)]).reshape(n, 3, 32, -1)
print("text", round(time.time() - t), flush=True)
torch.save({"latents": z[:, 0].half(), "text": emb, "captions": caps}, out)
