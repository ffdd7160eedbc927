import sys
import torch
import numpy as np
from causal_forcing.data.shapes_io import read_manifest
from causal_forcing.data import shapes
from causal_forcing.data.shapes import ObjectAttrs
from causal_forcing.models.text import build_text_encoder
from causal_forcing.models.matcher import load_matcher

torch.set_num_threads(2)
d = torch.load("runs/r12/cands_two_N8.pt", weights_only=False)
cands, exact = d["cands"], d["exact"]
entries = [
    e for e in read_manifest("runs/eval_data/manifest.jsonl") if not e.get("held_out") and " and " in e["caption"]
]
caps = [e["caption"] for e in entries]
P = len(caps)
text = build_text_encoder("minilm", text_len=32, device="cpu")
alts = []
for c in caps:
    attrs = shapes.parse_caption(c)
    a = []
    for i in range(len(attrs)):
        for sh in shapes.SHAPES:
            if sh != attrs[i].shape:
                x = list(attrs)
                x[i] = ObjectAttrs(**{**attrs[i].__dict__, "shape": sh})
                a.append(shapes.canonical_caption(x))
        for sz in shapes.SIZES:
            if sz != attrs[i].size:
                x = list(attrs)
                x[i] = ObjectAttrs(**{**attrs[i].__dict__, "size": sz})
                a.append(shapes.canonical_caption(x))
    alts.append(a)
K = len(alts[0])
full = text.encode(caps).float()
alt = text.encode([x for a in alts for x in a]).float().view(P, K, 32, -1)
allx = exact == 2
for path in sys.argv[1:]:
    m = load_matcher(path)
    with torch.no_grad():
        s_true = torch.stack([m(cands[:, n, 0], full) for n in range(8)], 1)  # [P, 8]
        s_alt = torch.stack(
            [torch.stack([m(cands[:, n, 0], alt[:, k]) for k in range(K)], 1) for n in range(8)], 1
        )  # [P,8,K]
    for name, score in (
        ("plain", s_true),
        ("margin-max", s_true - s_alt.max(-1).values),
        ("margin-lse", s_true - torch.logsumexp(s_alt, -1)),
        ("softmax", s_true - torch.logsumexp(torch.cat([s_true[..., None], s_alt], -1), -1)),
    ):
        res = []
        for NN in (2, 4, 8):
            best = score[:, :NN].argmax(1).numpy()
            res.append(f"N={NN}: {allx[np.arange(P), best].sum()}")
        print(path, name, "  ".join(res))
