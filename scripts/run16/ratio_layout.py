"""Run 16 prototype, as run: train the density-ratio layout model (causal_forcing/models/layout.py) and measure how
often its layouts are valid ShapesWorld starts (the world's own rules, used here only to measure). The library's
`layout` stage (causal_forcing/training/layout.py) replaced it: it trains the bundled model, and its eval.json gives
the same measure (`shapes.valid_start`). This script differs in its data (clips from seed 9,000,000 on, a pool
of 4096 centres) and its own training loop (AdamW at 1e-3, cosine, batch 512).

    python scripts/run16/ratio_layout.py train OUT.pt [--clips 100000] [--steps 3000]
    python scripts/run16/ratio_layout.py check OUT.pt [--candidates 1024] [--sharpness 4]
    python scripts/run16/ratio_layout.py folder OUT.pt DIR      # a layout model folder, for --first-frame-layout
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from causal_forcing.data import shapes
from causal_forcing.models.layout import LayoutModel, pooled_text
from causal_forcing.models.text import build_text_encoder

TEXT = build_text_encoder("minilm", text_len=32, device="cpu", cache_size=0)
_EMB: dict = {}


def embed(clauses):
    missing = [c for c in dict.fromkeys(clauses) if c not in _EMB]
    for at in range(0, len(missing), 256):
        part = missing[at:at + 256]
        _EMB.update(zip(part, pooled_text(TEXT, part)))
    return torch.stack([_EMB[c] for c in clauses])


def centre(obj, canvas=64):
    side = shapes.side_pixels(obj.attrs.size, canvas) / canvas
    return [obj.x0 + side / 2, obj.y0 + side / 2]


def data(clips, seed=9_000_000):
    pairs, singles = [], []
    while len(pairs) + len(singles) < clips:
        spec = shapes.sample_clip(seed, 64, 81)
        seed += 1
        objs = spec.objects
        clauses = [shapes.canonical_caption([o.attrs]) for o in objs]
        if len(objs) == 1:
            singles.append((clauses[0], centre(objs[0])))
        else:
            pairs.append((clauses[0], clauses[1], centre(objs[0]), centre(objs[1])))
    return pairs, singles


def train(out, clips=100000, steps=3000):
    torch.manual_seed(0)
    t0 = time.time()
    pairs, singles = data(clips)
    ta, tb = embed([p[0] for p in pairs]), embed([p[1] for p in pairs])
    ca, cb = torch.tensor([p[2] for p in pairs]), torch.tensor([p[3] for p in pairs])
    allc = torch.cat([ca, cb, torch.tensor([s[1] for s in singles])])
    print(f"{len(pairs)} pairs, {len(allc)} centres, data {time.time() - t0:.0f} s", flush=True)
    model = LayoutModel()
    model.set_pool(allc)
    n_val = 2000
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def loss_on(idx):
        pa, pb = model.propose((2, len(idx)))
        logit_pos = model.pair_logit(ta[idx], tb[idx], ca[idx], cb[idx])
        logit_neg = model.pair_logit(ta[idx], tb[idx], pa, pb)
        return (F.binary_cross_entropy_with_logits(logit_pos, torch.ones_like(logit_pos))
                + F.binary_cross_entropy_with_logits(logit_neg, torch.zeros_like(logit_neg))) / 2

    for step in range(steps):
        idx = torch.randint(n_val, len(pairs), (512,))
        loss = loss_on(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            with torch.no_grad():
                val = loss_on(torch.arange(n_val)).item()
            print(step, round(loss.item(), 4), "val", round(val, 4), f"{time.time() - t0:.0f} s", flush=True)
    torch.save({"config": model.config(), "state": model.state_dict()}, out)


def load(path):
    blob = torch.load(path, weights_only=True)
    model = LayoutModel(**blob["config"])
    model.load_state_dict(blob["state"])
    return model.eval()


def check(path, candidates=1024, sharpness=4.0):
    model = load(path)
    rows = [json.loads(line) for line in open("runs/eval_data/manifest.jsonl")]
    rows = [r for r in rows if not r["held_out"] and len(r["objects"]) == 2]
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    counts = {"model": 0, "proposal": 0, "real": 0}
    total = 0
    for r in rows:
        attrs = shapes.parse_caption(r["caption"])
        texts = embed([shapes.canonical_caption([a]) for a in attrs])
        real = [[o["x0"] + shapes.side_pixels(o["size"], 64) / 128, o["y0"] + shapes.side_pixels(o["size"], 64) / 128]
                for o in r["objects"]]
        for _ in range(5):
            total += 1
            counts["model"] += shapes.valid_start(attrs, model.sample(texts, candidates, sharpness, gen).tolist(), rng)
            counts["proposal"] += shapes.valid_start(attrs, model.propose((2,), gen).tolist(), rng)
            counts["real"] += shapes.valid_start(attrs, real, rng)
    print({k: round(v / total, 3) for k, v in counts.items()}, total)


if __name__ == "__main__":
    extra = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    if sys.argv[1] == "train":
        train(sys.argv[2], int(extra.get("--clips", 100000)), int(extra.get("--steps", 3000)))
    elif sys.argv[1] == "folder":
        from causal_forcing.models.layout import save_layout_model
        save_layout_model(load(sys.argv[2]), sys.argv[3])
    else:
        check(sys.argv[2], int(extra.get("--candidates", 1024)), float(extra.get("--sharpness", 4.0)))
