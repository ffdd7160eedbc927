# ruff: noqa: B023 - each flow() closure is used within its own loop iteration
"""Run 12 experiment: composable CFG for frame 0 of two-object prompts."""

import sys
import torch
from causal_forcing.data.shapes_io import read_manifest
from causal_forcing.eval import models as M
from causal_forcing.eval import shapesbench as SB
from causal_forcing.models.small_vae import load_vae
from causal_forcing.models.text import build_text_encoder
from causal_forcing.pipelines.teacher import integrate, solver_sigmas, model_timestep
from causal_forcing.models.attention import Bidirectional

torch.set_num_threads(2)
model = M.load_model_folder("causal_forcing/assets/shapes_first_frame").eval()
vae = load_vae("shapes")
text = build_text_encoder("minilm", text_len=model.config.text_len, device="cpu")
entries = [
    e for e in read_manifest("runs/eval_data/manifest.jsonl") if not e.get("held_out") and " and " in e["caption"]
]
combos = [tuple(float(v) for v in c.split(",")) for c in sys.argv[1:]]
caps = [e["caption"] for e in entries]
full = text.encode(caps).float()
c1 = text.encode([c.split(" and ")[0] for c in caps]).float()
c2 = text.encode([c.split(" and ")[1] for c in caps]).float()
neg = torch.zeros_like(full)
sig = solver_sigmas("unipc", 20, 5.0)
for g, gc in combos:
    tot = ok = exact = both = 0
    for s in range(0, len(entries), 25):
        sl = slice(s, s + 25)
        B = len(entries[sl])
        ctx = torch.cat([full[sl], c1[sl], c2[sl], neg[sl]])

        def flow(x, sigma):
            t = torch.full((4 * B, 1), model_timestep(sigma), dtype=torch.float32)
            with torch.no_grad():
                v = model(x.float().repeat(4, 1, 1, 1, 1), t, ctx, layout=Bidirectional()).float()
            vf, v1, v2, vu = v.chunk(4)
            return vu + g * (vf - vu) + gc * ((v1 - vu) + (v2 - vu))

        noise = torch.randn(B, 1, model.config.in_dim, 8, 8, generator=torch.Generator().manual_seed(1000 + s))
        with torch.no_grad():
            x0 = integrate(flow, noise, sig, "unipc").float()
            still = M._pixels_to_uint8(vae.decode(x0.repeat(1, 5, 1, 1, 1)))
        for entry, clip in zip(entries[sl], still):
            objs = SB.score_clip(clip, entry["caption"])["objects"]
            tot += len(objs)
            ok += sum(o["measured"] is not None and o["color"] == 1.0 for o in objs)
            ex = sum(o["measured"] is not None and o["color"] == o["shape"] == o["size"] == 1.0 for o in objs)
            exact += ex
            both += ex == len(objs)
    print(f"g={g} gc={gc}: colour {ok}/{tot} exact {exact}/{tot} both-exact {both}/{len(entries)}", flush=True)
