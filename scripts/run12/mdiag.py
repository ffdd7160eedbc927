import sys
import torch
import collections
from causal_forcing.data.shapes_io import read_manifest
from causal_forcing.eval import models as M
from causal_forcing.eval import shapesbench as SB
from causal_forcing.models.small_vae import load_vae
from causal_forcing.models.text import build_text_encoder
from causal_forcing.models.matcher import load_matcher

torch.set_num_threads(2)
d = torch.load("runs/r12/cands_two_N8.pt", weights_only=False)
cands = d["cands"]
entries = [
    e for e in read_manifest("runs/eval_data/manifest.jsonl") if not e.get("held_out") and " and " in e["caption"]
]
caps = [e["caption"] for e in entries]
text = build_text_encoder("minilm", text_len=32, device="cpu")
full = text.encode(caps).float()
m = load_matcher(sys.argv[1])
vae = load_vae("shapes")
with torch.no_grad():
    score = torch.stack([m(cands[:, n, 0], full) for n in range(8)], 1)
best = score.argmax(1)
sel = cands[torch.arange(len(caps)), best]
with torch.no_grad():
    still = M._pixels_to_uint8(vae.decode(sel.repeat(1, 5, 1, 1, 1)))
why = collections.Counter()
for e, clip, s in zip(entries, still, score.max(1).values):
    objs = SB.score_clip(clip, e["caption"])["objects"]
    for o in objs:
        if o["measured"] is None:
            why["missing"] += 1
        else:
            for k in ("color", "shape", "size"):
                if o[k] != 1.0:
                    why[k] += 1
    bad = [
        (o["expected"] if "expected" in o else "", o["measured"], o["shape"], o["size"])
        for o in objs
        if o["measured"] is None or o["shape"] != 1.0 or o["size"] != 1.0
    ]
    if bad and why["printed"] < 12:
        why["printed"] += 1
        print(e["caption"], f"score={s:.2f}", bad)
print(why)
