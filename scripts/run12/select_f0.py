# ruff: noqa: B023 - each flow() closure is used within its own loop iteration
"""Run 12 experiment: best-of-N frame 0 by the first-frame model's own implicit classifier (diffusion classifier)."""

import sys
import torch
import numpy as np
from causal_forcing.data.shapes_io import read_manifest
from causal_forcing.eval import models as M
from causal_forcing.eval import shapesbench as SB
from causal_forcing.models.small_vae import load_vae
from causal_forcing.models.text import build_text_encoder
from causal_forcing.pipelines.teacher import integrate, solver_sigmas, model_timestep
from causal_forcing.models.attention import Bidirectional

torch.set_num_threads(2)
N = int(sys.argv[1])
K = int(sys.argv[2])
G = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
model = M.load_model_folder("causal_forcing/assets/shapes_first_frame").eval()
vae = load_vae("shapes")
text = build_text_encoder("minilm", text_len=model.config.text_len, device="cpu")
entries = [
    e for e in read_manifest("runs/eval_data/manifest.jsonl") if not e.get("held_out") and " and " in e["caption"]
]
caps = [e["caption"] for e in entries]
P = len(caps)
full = text.encode(caps).float()
sig = solver_sigmas("unipc", 20, 5.0)
C = model.config.in_dim


def fwd(x, t, ctx):
    with torch.no_grad():
        return model(x, t, ctx, layout=Bidirectional()).float()


# candidates: [P, N, 1, C, 8, 8]
cands = []
for n in range(N):
    noise = torch.randn(P, 1, C, 8, 8, generator=torch.Generator().manual_seed(1000 + n))
    ctx2 = torch.cat([full, torch.zeros_like(full)])

    def flow(x, sigma):
        t = torch.full((2 * P, 1), model_timestep(sigma), dtype=torch.float32)
        vc, vu = fwd(x.float().repeat(2, 1, 1, 1, 1), t, ctx2).chunk(2)
        return vu + G * (vc - vu)

    with torch.no_grad():
        cands.append(integrate(flow, noise, sig, "unipc").float())
cands = torch.stack(cands, 1)
# judge every candidate
exact = np.zeros((P, N), int)
for n in range(N):
    with torch.no_grad():
        still = M._pixels_to_uint8(vae.decode(cands[:, n].repeat(1, 5, 1, 1, 1)))
    for i, (entry, clip) in enumerate(zip(entries, still)):
        objs = SB.score_clip(clip, entry["caption"])["objects"]
        exact[i, n] = sum(o["measured"] is not None and o["color"] == o["shape"] == o["size"] == 1.0 for o in objs)
# implicit-classifier score, paired noise and sigma across candidates
g = torch.Generator().manual_seed(7)
sigmas = torch.linspace(0.05, 0.95, K)
score = torch.zeros(P, N)
for k in range(K):
    eps = torch.randn(P, 1, 1, C, 8, 8, generator=g).expand(P, N, 1, C, 8, 8)
    s = float(sigmas[k])
    x0 = cands
    xt = (1 - s) * x0 + s * eps
    target = eps - x0
    xt = xt.reshape(P * N, 1, C, 8, 8)
    ctx = full.repeat_interleave(N, 0)
    t = torch.full((2 * P * N, 1), 1000 * s, dtype=torch.float32)
    vc, vu = fwd(torch.cat([xt, xt]), t, torch.cat([ctx, torch.zeros_like(ctx)])).chunk(2)
    tg = target.reshape(P * N, 1, C, 8, 8)
    ec = ((vc - tg) ** 2).flatten(1).mean(1)
    eu = ((vu - tg) ** 2).flatten(1).mean(1)
    score += (eu - ec).reshape(P, N)
best = score.argmax(1).numpy()
both = exact == 2
print(
    f"N={N} K={K} G={G}: candidate0 exact {exact[:, 0].sum()}/{2 * P} both {both[:, 0].sum()}/{P}; "
    f"mean over candidates exact {exact.mean(0).sum():.1f}; selected exact {exact[np.arange(P), best].sum()} "
    f"both {both[np.arange(P), best].sum()}; oracle both {both.any(1).sum()}"
)
# also cond-only error score
