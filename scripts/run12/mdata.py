"""Run 12 experiment: frame-0 latents + positive/negative caption embeddings for a text–frame matcher."""

import sys
import time
import torch
import numpy as np
import random
from causal_forcing.data import shapes
from causal_forcing.data.shapes import ObjectAttrs, canonical_caption, COLORS, SHAPES, SIZES
from causal_forcing.models.small_vae import load_vae
from causal_forcing.models.text import build_text_encoder

torch.set_num_threads(2)
n = int(sys.argv[1])
base = int(sys.argv[2])
out = sys.argv[3]
rng = random.Random(base)


def ok(attrs):
    return not any(a.held_out for a in attrs) and len({a.color for a in attrs}) == len(attrs)


def change(attrs):
    for _ in range(100):
        a = list(attrs)
        i = rng.randrange(len(a))
        o = a[i]
        field = rng.choice(["size", "color", "shape"])
        vals = {"size": list(SIZES), "color": list(COLORS), "shape": list(SHAPES)}[field]
        v = rng.choice([x for x in vals if x != getattr(o, field)])
        a[i] = ObjectAttrs(**{**o.__dict__, field: v})
        if ok(a):
            return a
    return None


def swap(attrs):
    if len(attrs) != 2:
        return None
    fields = [f for f in ("size", "color", "shape") if getattr(attrs[0], f) != getattr(attrs[1], f)]
    if not fields:
        return None
    f = rng.choice(fields)
    a0 = ObjectAttrs(**{**attrs[0].__dict__, f: getattr(attrs[1], f)})
    a1 = ObjectAttrs(**{**attrs[1].__dict__, f: getattr(attrs[0], f)})
    return [a0, a1] if ok([a0, a1]) else None


def count(attrs):
    if len(attrs) == 2:
        return [attrs[rng.randrange(2)]]
    for _ in range(100):
        extra = ObjectAttrs(
            rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(shapes.MOTIONS)
        )
        a = [attrs[0], extra] if rng.random() < 0.5 else [extra, attrs[0]]
        if ok(a):
            return a
    return None


def negative(attrs):
    for _ in range(100):
        kind = rng.choices(["change", "swap", "count"], [0.5, 0.3, 0.2])[0]
        a = {"change": change, "swap": swap, "count": count}[kind](attrs)
        if a is not None:
            return canonical_caption(a)


vae = load_vae("shapes")
te = build_text_encoder("minilm", text_len=32, device="cpu", cache_size=0)
lat, pos, neg = [], [], []
t = time.time()
frames, caps = [], []
i = 0
s = base
while len(caps) < n:
    spec, clip = shapes.render_seed(s, size=64, frames=17)
    s += 1
    if spec.held_out:
        continue
    frames.append(clip[0])
    caps.append((spec.caption, negative(spec.attrs), negative(spec.attrs)))
x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[:, None].float() / 127.5 - 1
with torch.no_grad():
    z = torch.cat([vae.encode(x[k : k + 500]) for k in range(0, n, 500)])
print("latents", time.time() - t, flush=True)
flat = [c for cs in caps for c in cs]
emb = torch.cat([te.encode(flat[k : k + 512]).half() for k in range(0, len(flat), 512)]).reshape(n, 3, 32, -1)
print("text", time.time() - t, flush=True)
torch.save({"latents": z[:, 0].half(), "text": emb, "captions": caps}, out)
