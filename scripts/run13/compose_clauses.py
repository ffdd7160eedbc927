"""Run 13 prototype: frame 0 of a multi-object caption composed from one first-frame sample per clause.

Each clause ("a big red circle moving up") is sampled alone by the first-frame model (K candidates each, the
stream's noise rearranged), decoded, the objects pasted in clause order on black (later on top, as the world
draws them), choosing for each later clause the first candidate whose object box does not touch the earlier
ones; the composite is encoded by the VAE and handed to the prefix model as frame 0.

python scripts/run13/compose_clauses.py PIPELINE OUT SEED K
"""

import json
import re
import sys

import torch

from causal_forcing.data import shapes
from causal_forcing.eval import models as M
from causal_forcing.pipelines.first_frame import candidate_noise
from causal_forcing.pipelines.loading import load_pipeline

torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
weights, out, seed, K = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
MODE = sys.argv[5] if len(sys.argv) > 5 else ""
LAYOUT = MODE in ("layout", "strict")       # the world's layout rule along the caption's motions
STRICT = MODE.startswith("strict")           # no candidate fits: keep the model's own frame 0 ("strict-M": no rule,
MARGIN = int(MODE.split("-")[1]) if MODE.startswith("strict-") else 1   # boxes at least M pixels apart instead)
REENCODE = len(sys.argv) > 5 and sys.argv[5] == "reencode"   # control: no composition, frame 0 re-encoded
SDEDIT = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0   # > 0: re-noise the composite to this sigma, solve back
from causal_forcing.models.attention import Bidirectional  # noqa: E402
from causal_forcing.pipelines.teacher import integrate, model_timestep, solver_sigmas  # noqa: E402
pipe = load_pipeline(weights)
sampler = pipe.first_frame
man = sys.argv[7] if len(sys.argv) > 7 else "runs/eval_data/manifest.jsonl"
SPLIT = re.compile(r",? and | next to ")
state = {}
orig_for = sampler.for_prompts


def for_prompts(prompts):
    state["p"] = list(prompts)
    return orig_for(prompts)


sampler.for_prompts = for_prompts
orig_solve = sampler._solve


def box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return None
    return (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))


def touches(a, b, margin=None):
    margin = MARGIN if margin is None else margin
    return not (a[1] + margin < b[0] or b[1] + margin < a[0] or a[3] + margin < b[2] or b[3] + margin < a[2])


def valid(placed):
    if not LAYOUT or len(placed) < 2:
        return True
    objs = [shapes.ObjectParams(attrs=a, x0=b[2] / 64, y0=b[0] / 64, speed=0.0 if a.motion == "still" else
                                sum(shapes.SPEED_RANGE) / 2) for a, b in placed]
    return shapes.overlap_fraction(objs, 64, 81) <= shapes.MAX_OVERLAP_FRACTION


def place(prompt, noise, full_latent):
    """Mode "place": the first-frame model's own sample for the whole caption decides where each object goes
    (the object of the matching colour); one sample per clause draws it, moved there."""
    clauses = [c.strip() for c in SPLIT.split(prompt) if c.strip()]
    if len(clauses) < 2:
        return None
    m = len(clauses)
    ctx = pipe.text_encoder.encode(clauses).float().repeat_interleave(K, dim=0)
    starts = torch.cat([candidate_noise(noise, j * K + k + 1) for j in range(m) for k in range(K)])
    lat = next(orig_solve(sampler.model, ctx, starts))
    pix = pipe.vae.decode(lat)[:, 0].float()
    full = pipe.vae.decode(full_latent)[0, 0].float()
    rgb_full = (full + 1) * 127.5
    bright_full = rgb_full.amax(dim=0)
    canvas = torch.full_like(full, -1.0)
    size = full.shape[-1]
    boxes = []
    for j in range(m):
        done = False
        for k in range(K):
            i = j * K + k
            rgb = (pix[i] + 1) * 127.5
            obj = rgb.amax(dim=0) > 100
            b = box(obj)
            if b is None:
                continue
            colour = rgb[:, obj].mean(dim=1)
            there = (bright_full > 100) & ((rgb_full - colour[:, None, None]).pow(2).sum(0).sqrt() < 80)
            t = box(there)
            if t is None:
                state["nomatch"] = state.get("nomatch", 0) + 1
                return None
            dy = round((t[0] + t[1]) / 2 - (b[0] + b[1]) / 2)
            dx = round((t[2] + t[3]) / 2 - (b[2] + b[3]) / 2)
            dy = max(-b[0], min(size - 1 - b[1], dy))
            dx = max(-b[2], min(size - 1 - b[3], dx))
            moved = torch.roll(pix[i], shifts=(dy, dx), dims=(-2, -1))
            nb = (b[0] + dy, b[1] + dy, b[2] + dx, b[3] + dx)
            if any(touches(nb, o) for o in boxes):
                state["touch"] = state.get("touch", 0) + 1
                return None
            boxes.append(nb)
            mb = ((moved + 1) * 127.5).amax(dim=0)
            canvas = torch.where((mb > ((canvas + 1) * 127.5).amax(dim=0))[None], moved, canvas)
            done = True
            break
        if not done:
            return None
    state["n"] = state.get("n", 0) + 1
    return pipe.vae.encode(canvas[None, None]).float()


def compose(prompt, noise):
    clauses = [c.strip() for c in SPLIT.split(prompt) if c.strip()]
    if len(clauses) < 2:
        return None
    ctx = pipe.text_encoder.encode(clauses).float()           # [m, L, D]
    m = len(clauses)
    starts = torch.cat([candidate_noise(noise, j * K + k) for j in range(m) for k in range(K)])
    contexts = ctx.repeat_interleave(K, dim=0)
    lat = next(orig_solve(sampler.model, contexts, starts))    # [m*K, 1, C, h, w]
    pix = pipe.vae.decode(lat)
    pix = pix[:, 0].float()                                    # [m*K, 3, H, W] in [-1, 1]
    bright = ((pix + 1) * 127.5).amax(dim=1)                   # [m*K, H, W]
    canvas = torch.full_like(pix[0], -1.0)
    boxes = []
    attrs = shapes.parse_caption(prompt)
    for j in range(m):
        chosen = None
        for k in range(K):
            i = j * K + k
            b = box(bright[i] > 100)
            if b is None:
                continue
            if all(not touches(b, o) for o in boxes) and valid(list(zip(attrs, boxes + [b]))):
                chosen = i
                break
            if chosen is None:
                chosen = -1 - i  # remember the first non-empty one
        if chosen is None:
            continue
        state["fallback"] = state.get("fallback", 0) + (chosen < 0)
        if chosen < 0 and STRICT:   # no candidate fits: keep the first-frame model's own frame 0 for the caption
            return None
        i = chosen if chosen >= 0 else -1 - chosen
        b = box(bright[i] > 100)
        boxes.append(b)
        canvas = torch.where((bright[i] > ((canvas + 1) * 127.5).amax(dim=0))[None], pix[i], canvas)
    state["n"] = state.get("n", 0) + 1
    z = pipe.vae.encode(canvas[None, None]).float()
    if SDEDIT > 0:
        full = pipe.text_encoder.encode([prompt]).float()
        ctx2 = torch.cat([full, torch.zeros_like(full)])
        g = sampler.spec.guidance

        def flow(x, sigma):
            t = torch.full((2, 1), model_timestep(sigma), dtype=torch.float32)
            vc, vu = sampler.model(x.float().repeat(2, 1, 1, 1, 1), t, ctx2, layout=Bidirectional()).float().chunk(2)
            return vu + g * (vc - vu)

        sig = solver_sigmas("unipc", sampler.spec.steps, sampler.spec.shift)
        sig = sig[sig <= SDEDIT]
        eps = candidate_noise(noise, 15)
        z = integrate(flow, (1 - sig[0]) * z + sig[0] * eps, sig, "unipc").float()
    return z


def solve(model, context, noise, initial=None, guidance=None):
    if model is sampler.model and initial is None and noise.shape[1] == 1:
        frames = next(orig_solve(model, context, noise))
        if REENCODE:   # control: the full caption's own frame 0, decoded and encoded again
            for b, p in enumerate(state["p"]):
                if len([c for c in SPLIT.split(p) if c.strip()]) > 1:
                    frames[b:b + 1] = pipe.vae.encode(pipe.vae.decode(frames[b:b + 1])[:, :1]).to(frames)
            return iter([frames])
        for b, p in enumerate(state["p"]):
            c = place(p, noise[b:b + 1], frames[b:b + 1]) if MODE == "place" else compose(p, noise[b:b + 1])
            if c is not None:
                frames[b:b + 1] = c.to(frames)
        return iter([frames])
    return orig_solve(model, context, noise, initial=initial, guidance=guidance)


sampler._solve = solve
settings = M.EvalSettings(kind="causal", seed=seed, first_frame=sampler)
rep = M.evaluate(pipe.model, pipe.vae, pipe.text_encoder, man, settings, out_dir=out)
print("composed", state.get("n"), "fallbacks", state.get("fallback"), "nomatch", state.get("nomatch"),
      "touch", state.get("touch"))
print(json.dumps({k: rep[k] for k in ("in_distribution", "held_out")}))
