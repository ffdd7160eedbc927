"""Does a model read the direction word of a caption? Diagnostics behind docs/results.md ("the direction sign").

    python scripts/direction_probe.py confusion SCORES.json...
        motion of every expected moving object in ShapesBench reports (eval model --out DIR/scores.json): found
        (a track was matched), on the caption's axis, exactly right; and sign-given-axis (0.5 = a coin toss).

    python scripts/direction_probe.py pairs --weights DIR --kind KIND --manifest EVAL.jsonl [--vae DIR] [--n 20]
        the first N in-distribution single-object moving prompts, and the same prompts with the direction
        reversed (left<->right, up<->down), generated with the same noise: a model that reads the direction word
        moves the object the other way in most pairs; one that ignores it moves it the same way.

    python scripts/direction_probe.py sensitivity --weights DIR --latents SHARD.safetensors [--frames 9]
        how much the model's output on noisy training latents changes when one word of the caption changes
        (direction, colour, shape; relative L2), and how far it is from time-reversal equivariance.

    python scripts/direction_probe.py contrast --weights DIR --kind KIND --manifest EVAL.jsonl [--vae DIR]
            [--negative zeros|reversed] [--guidance G] [--contrast H]
        `pairs` with the teacher's many-step sampler under other guidance: the negative prompt is the empty one
        (zeros) or the caption with the direction reversed, and (bidirectional only) an extra contrast term
        h·(v_cond − v_reversed) is added to v_neg + g·(v_cond − v_neg): does amplifying the direction word help?

    python scripts/direction_probe.py prior --manifest TRAIN.jsonl
        how much the start position gives the direction away in the training data (the world draws the start so
        that no bounce happens in the first 16 frames): the fraction of moving objects that move away from the
        nearer wall, the fraction moving right/down in each fifth of the canvas (by the object's centre), and how
        often a frame-to-frame step goes the caption's way (after frame 15 objects bounce off the walls).

    python scripts/direction_probe.py placement --weights DIR --kind KIND [--vae DIR] [--n 96] [--seed 1000]
        N single-object moving prompts in the canonical form (in-distribution combinations, a fixed random
        draw), 17 frames: of the objects moving along the caption's axis, the fraction with the caption's sign
        and the fraction moving away from the nearer wall; and, of all, the fraction whose frame-0 centre lies on
        the side the caption's direction implies (left half for "right", top half for "down" ...). A model that
        places frame 0 by the caption scores well above 0.5 there; one that ignores the word scores 0.5 and then
        moves away from the wall it happens to start near.

    python scripts/direction_probe.py next-frame --weights DIR --latents SHARD.safetensors [--vae DIR] [--clips 24]
        an AR (teacher-forcing) model given the real latent frame 0 of single-object moving training clips and
        pure noise for latent frame 1: is its prediction of frame 1 moved the clip's way, with the true caption
        and with the direction reversed? (Displacement of the decoded object between pixel frames 0 and 4.)

    python scripts/direction_probe.py frame-loss --latents SHARD.safetensors WEIGHTS...
        the teacher-forcing flow loss of AR models on the first 32 clips of a latent shard (random σ per frame,
        fixed draws), split into frame 0, frames 1-4 and frames 5-20: a fit check, not a benchmark.

    python scripts/direction_probe.py data --latents SHARD.safetensors --vae DIR [--clips 32]
        whether the training data carries the direction: for each clip with a direction word, is the stored
        caption embedding closer to its own caption than to the caption with the direction reversed; and the
        ShapesBench motion score of the stored latents, decoded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_forcing.data.shapes import parse_caption  # noqa: E402
from causal_forcing.eval.shapesbench import MOTION_AXES  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def motion_rows(clips: list[dict]) -> list[tuple[str, str | None]]:
    """(expected, measured) motion of every expected moving object; measured None when nothing was matched."""
    rows = []
    for clip in clips:
        for obj in clip["objects"]:
            expected = parse_caption(obj["expected"])[0].motion
            if expected in OPPOSITE:
                rows.append((expected, (obj.get("measured") or {}).get("motion")))
    return rows


def confusion(paths: list[str]) -> None:
    for path in paths:
        rows = motion_rows(json.loads(Path(path).read_text())["clips"])
        found = [(e, m) for e, m in rows if m is not None]
        if not found:
            print(f"{path}: moving objects {len(rows)}, none found")
            continue
        axis = sum(MOTION_AXES[m] == MOTION_AXES[e] for e, m in found)
        exact = sum(m == e for e, m in found)
        print(f"{path}: moving objects {len(rows)}, found {len(found)}, on the axis {axis / len(found):.2f}, "
              f"exact {exact / len(found):.2f}, sign given axis {exact / max(axis, 1):.2f}")


def pairs(args: argparse.Namespace) -> None:
    from causal_forcing.eval.models import EvalSettings, evaluate, load_model_folder
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder

    chosen, flipped = single_moving_prompts(args.manifest, args.n)
    model = load_model_folder(args.weights)
    vae = load_vae(args.vae)
    text = build_text_encoder("minilm", text_len=model.config.text_len)
    settings = EvalSettings(kind=args.kind, block_size=args.block_size, seed=args.seed, batch_size=len(chosen),
                            save_videos=0)
    reports = []
    for i, batch in enumerate((chosen, flipped)):
        manifest = Path(args.work) / f"pairs_{i}.jsonl"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text("".join(json.dumps(e) + "\n" for e in batch))
        reports.append(evaluate(model, vae, text, manifest, settings))   # one batch each: the same noise
    a, b = (motion_rows(r["clips"]) for r in reports)
    print(f"{args.weights}: {pair_summary(a, b)}")


def reverse_direction(caption: str) -> str:
    return " ".join(OPPOSITE.get(w, w) for w in caption.split())


def single_moving_prompts(manifest: str, n: int) -> tuple[list[dict], list[dict]]:
    """The first n in-distribution single-object moving prompts, and the same with the direction reversed."""
    entries = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    chosen = [e for e in entries if " and " not in e["caption"] and e["caption"].split()[-1] in OPPOSITE
              and not e.get("held_out")][:n]
    return chosen, [{**e, "caption": reverse_direction(e["caption"])} for e in chosen]


def pair_summary(a: list, b: list) -> str:
    both = [(x, y) for x, y in zip(a, b) if x[1] in OPPOSITE and y[1] in OPPOSITE]
    differ = sum(x[1] != y[1] for x, y in both)
    exact = sum(m == e for e, m in a + b)
    return (f"exact direction {exact}/{len(a) + len(b)}; of {len(both)} pairs where both objects move, "
            f"{differ} move differently")


def contrast_flow(model, ctx, neg, rev, guidance: float, contrast_scale: float):
    """v_neg + g·(v_c − v_neg) [+ h·(v_c − v_reversed)], every frame at t = 1000·σ, bidirectional attention."""
    import torch

    from causal_forcing.models.attention import Bidirectional
    from causal_forcing.pipelines.teacher import cfg_combine

    def flow(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full(x.shape[:2], 1000.0 * sigma)
        v_c = model(x, t, ctx, layout=Bidirectional())
        v = cfg_combine(v_c, model(x, t, neg, layout=Bidirectional()), guidance)
        if contrast_scale:
            v = v + contrast_scale * (v_c.float() - model(x, t, rev, layout=Bidirectional()).float())
        return v
    return flow


def contrast(args: argparse.Namespace) -> None:
    import torch

    from causal_forcing.eval import shapesbench
    from causal_forcing.eval.models import EvalSettings, _pixels_to_uint8, load_model_folder
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder
    from causal_forcing.pipelines.teacher import integrate, sample_autoregressive, solver_sigmas

    if args.contrast and args.kind != "bidirectional":
        sys.exit("--contrast is implemented for --kind bidirectional only (the AR sampler runs two branches)")
    model = load_model_folder(args.weights)
    vae = load_vae(args.vae)
    text = build_text_encoder("minilm", text_len=model.config.text_len)
    defaults = EvalSettings()                                # the evaluation's clip length and shift
    frames = 1 + (defaults.frames - 1) // 4
    reports = []
    for batch in single_moving_prompts(args.manifest, args.n):
        hw = (batch[0].get("size", 64) // vae.spatial_factor,) * 2
        captions = [e["caption"] for e in batch]
        ctx = text.encode(captions).float()
        rev = text.encode([reverse_direction(c) for c in captions]).float()
        neg = rev if args.negative == "reversed" else torch.zeros_like(ctx)
        gen = torch.Generator().manual_seed(args.seed)          # the same noise for both lists
        with torch.no_grad():
            if args.kind == "autoregressive":
                lat = sample_autoregressive(model, ctx, neg, num_frames=frames, latent_hw=hw,
                                            block_size=args.block_size, steps=args.steps, shift=defaults.shift,
                                            guidance=args.guidance, generator=gen)
            else:
                x = torch.randn((len(batch), frames, model.config.in_dim, *hw), generator=gen)
                flow = contrast_flow(model, ctx, neg, rev, args.guidance, args.contrast)
                lat = integrate(flow, x, solver_sigmas("unipc", args.steps, defaults.shift), "unipc").float()
            clips = _pixels_to_uint8(vae.decode(lat))
        reports.append(shapesbench.report([shapesbench.score_clip(c, e["caption"]) for c, e in zip(clips, batch)],
                                          kind=args.kind))
    a, b = (motion_rows(r["clips"]) for r in reports)
    scores = " / ".join(f"{r['in_distribution']['total']:.3f}" for r in reports)
    print(f"{args.weights} negative={args.negative} g={args.guidance} h={args.contrast}: {pair_summary(a, b)}; "
          f"Total (prompts / reversed) {scores}")


def sensitivity(args: argparse.Namespace) -> None:
    import torch
    from safetensors import safe_open

    from causal_forcing.eval.models import load_model_folder
    from causal_forcing.models.text import build_text_encoder

    torch.manual_seed(args.seed)
    model = load_model_folder(args.weights)
    text = build_text_encoder("minilm", text_len=model.config.text_len)
    with safe_open(args.latents, "pt") as f:
        latents = f.get_tensor("latents").float()[:args.clips, :args.frames]
    base = "a big blue triangle moving right"
    swaps = {"direction (right -> left)": base.replace("right", "left"),
             "colour (blue -> red)": base.replace("blue", "red"),
             "shape (triangle -> square)": base.replace("triangle", "square")}
    emb = {k: text.encode([c]).float().expand(len(latents), -1, -1) for k, c in {"base": base, **swaps}.items()}
    for sigma in (0.9, 0.6, 0.3):
        x = (1 - sigma) * latents + sigma * torch.randn_like(latents)
        t = torch.full(x.shape[:2], sigma * 1000.0)
        with torch.no_grad():
            out = {k: model(x, t, e) for k, e in emb.items()}
            reversed_out = model(x.flip(1), t, emb["base"]).flip(1)
        ref = out["base"]
        rel = {k: float((out[k] - ref).norm() / ref.norm()) for k in swaps}
        rev = float((reversed_out - ref).norm() / ref.norm())
        print(f"sigma {sigma}: " + ", ".join(f"{k} {v:.3f}" for k, v in rel.items())
              + f"; time reversal {rev:.3f}")


def decoded_centroids(vae, latents):
    """Decode latents and return the centroid of the non-black pixels per frame: (cx, cy) [B, T] each, and (h, w)."""
    import numpy as np
    import torch

    from causal_forcing.eval.models import _pixels_to_uint8

    with torch.no_grad():
        mask = (_pixels_to_uint8(vae.decode(latents)).max(-1) > 60).astype(np.float64)   # [B, T, H, W]
    h, w = mask.shape[2:]
    count = np.maximum(mask.sum((2, 3)), 1)
    cy = (mask * np.arange(h)[:, None]).sum((2, 3)) / count
    cx = (mask * np.arange(w)).sum((2, 3)) / count
    return cx, cy, (h, w)


def prior(args: argparse.Namespace) -> None:
    import numpy as np

    from causal_forcing.data.shapes import SIZES, ObjectParams, positions
    moving = away = 0
    bins: dict[int, list[int]] = {}
    agree: list[np.ndarray] = []
    for line in Path(args.manifest).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        for obj in entry["objects"]:
            motion = obj["motion"]
            if motion not in OPPOSITE:
                continue
            centre = (obj["x0"] if motion in ("left", "right") else obj["y0"]) + SIZES[obj["size"]] / 2
            positive = motion in ("right", "down")
            moving += 1
            away += positive == (centre < 0.5)
            b = bins.setdefault(min(int(centre * 5), 4), [0, 0])
            b[0] += 1
            b[1] += positive
            xs, ys = positions(ObjectParams.from_dict(obj), entry["size"], entry["frames"])
            step = np.diff((xs if motion in ("left", "right") else ys).astype(np.float64))
            agree.append((np.sign(step) == (1 if positive else -1)) | (step == 0))
    print(f"{args.manifest}: {moving} moving objects, {away / moving:.3f} move away from the nearer wall")
    a = np.mean(agree, axis=0)
    print(f"  frame-to-frame steps the caption's way: frames 0-15 {a[:15].mean():.2f}, 16-39 {a[16:40].mean():.2f}, "
          f"40-{len(a) - 1} {a[40:].mean():.2f}, whole clip {a.mean():.2f}")
    for k in sorted(bins):
        n, pos = bins[k]
        print(f"  centre in [{k / 5:.1f}, {(k + 1) / 5:.1f}): {n} objects, {pos / n:.2f} moving right/down")


def placement(args: argparse.Namespace) -> None:
    import itertools

    import numpy as np
    import torch

    from causal_forcing.data.shapes import COLORS, SHAPES, SIZES, ObjectAttrs
    from causal_forcing.eval.models import EvalSettings, generate_latents, load_model_folder
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder

    model = load_model_folder(args.weights)
    vae = load_vae(args.vae)
    text = build_text_encoder("minilm", text_len=model.config.text_len)
    combos = [ObjectAttrs(size, color, shape, motion) for size, color, shape, motion
              in itertools.product(SIZES, COLORS, SHAPES, OPPOSITE)]
    combos = [a for a in combos if not a.held_out]
    chosen = [combos[i] for i in np.random.default_rng(0).permutation(len(combos))[:args.n]]
    settings = EvalSettings(kind=args.kind, block_size=args.block_size)
    hw = (64 // vae.spatial_factor,) * 2                      # ShapesBench's 64-pixel canvas
    rows = []
    for start in range(0, len(chosen), args.batch_size):
        batch = chosen[start:start + args.batch_size]
        ctx = text.encode([a.phrase for a in batch]).float()
        lat = generate_latents(model, ctx, torch.zeros_like(ctx), settings, 5, hw, args.seed + start)   # 17 frames
        cx, cy, (h, w) = decoded_centroids(vae, lat)
        for i, a in enumerate(batch):
            along, across, extent = (cx, cy, w) if a.motion in ("left", "right") else (cy, cx, h)
            rows.append({"sign": 1 if a.motion in ("right", "down") else -1, "start": along[i, 0] / (extent - 1),
                         "moved": along[i, 16] - along[i, 0], "off": across[i, 16] - across[i, 0]})
    on_axis = [r for r in rows if abs(r["moved"]) > max(abs(r["off"]), 2.0)]
    sign = np.mean([np.sign(r["moved"]) == r["sign"] for r in on_axis])
    away = np.mean([np.sign(r["moved"]) == (1 if r["start"] < 0.5 else -1) for r in on_axis])
    side = np.mean([(r["start"] < 0.5) == (r["sign"] > 0) for r in rows])
    print(f"{args.weights}: {len(rows)} prompts, {len(on_axis)} move along the caption's axis: right sign {sign:.2f}, "
          f"away from the nearer wall {away:.2f}; frame 0 on the side the caption implies {side:.2f}")


def next_frame(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from safetensors import safe_open

    from causal_forcing.eval.models import load_model_folder
    from causal_forcing.models.attention import TeacherForcing
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder

    model = load_model_folder(args.weights)
    vae = load_vae(args.vae)
    text = build_text_encoder("minilm", text_len=model.config.text_len)
    with safe_open(args.latents, "pt") as f:
        records = json.loads(f.metadata()["records"])
        latents = f.get_tensor("latents").float()[:, :2]
    chosen = [i for i, r in enumerate(records) if len(r["objects"]) == 1 and r["objects"][0]["motion"] in OPPOSITE]
    chosen = chosen[:args.clips]
    x0 = latents[chosen]
    motions = [records[i]["objects"][0]["motion"] for i in chosen]
    captions = [records[i]["canonical"] for i in chosen]

    def along_true_direction(lat: torch.Tensor) -> np.ndarray:
        cx, cy, _ = decoded_centroids(vae, lat)
        moved = {"right": cx[:, -1] - cx[:, 0], "down": cy[:, -1] - cy[:, 0]}
        return np.array([moved["right" if m in ("left", "right") else "down"][i] * (1 if m in ("right", "down") else -1)
                         for i, m in enumerate(motions)])

    truth = along_true_direction(x0)
    print(f"{args.weights}: {len(chosen)} clips; the data moves {truth.mean():.2f} px the caption's way by frame 4")
    noise = torch.randn(x0[:, 1:].shape, generator=torch.Generator().manual_seed(args.seed))
    xt = torch.cat([x0[:, :1], noise], dim=1)
    t = torch.tensor([0.0, 1000.0]).expand(len(chosen), 2)
    for name, caps in (("true caption", captions),
                       ("reversed caption", [reverse_direction(c) for c in captions])):
        with torch.no_grad():
            flow = model(xt, t, text.encode(caps).float(), layout=TeacherForcing(1), clean_x=x0)
        pred = torch.cat([x0[:, :1], noise - flow[:, 1:]], dim=1)        # x0 = x_t − σ·v at σ = 1
        moved = along_true_direction(pred)
        print(f"  {name}: predicted frame 1 moves the clip's true way in {(moved > 0).mean():.2f} "
              f"(mean {moved.mean():.2f} px)")


def frame_loss(args: argparse.Namespace) -> None:
    import torch
    from safetensors import safe_open

    from causal_forcing.eval.models import load_model_folder
    from causal_forcing.models.attention import TeacherForcing

    with safe_open(args.latents, "pt") as f:
        latents, context = f.get_tensor("latents").float()[:32], f.get_tensor("context").float()[:32]
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(latents.shape, generator=g)
    sigma = torch.rand(latents.shape[:2], generator=g)
    for weights in args.weights:
        model = load_model_folder(weights)
        losses = []
        with torch.no_grad():
            for i in range(0, len(latents), 8):
                x0, e, s = latents[i:i + 8], eps[i:i + 8], sigma[i:i + 8]
                xt = (1 - s[..., None, None, None]) * x0 + s[..., None, None, None] * e
                flow = model(xt, s * 1000, context[i:i + 8], layout=TeacherForcing(1), clean_x=x0)
                losses.append((flow - (e - x0)).pow(2).mean(dim=(2, 3, 4)))
        loss = torch.cat(losses)
        print(f"{weights}: frame 0 {loss[:, 0].mean():.4f}, frames 1-4 {loss[:, 1:5].mean():.4f}, "
              f"frames 5+ {loss[:, 5:].mean():.4f}")


def data(args: argparse.Namespace) -> None:
    import torch
    from safetensors import safe_open

    from causal_forcing.eval.models import _pixels_to_uint8
    from causal_forcing.eval.shapesbench import score_clip
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder

    with safe_open(args.latents, "pt") as f:
        records = json.loads(f.metadata()["records"])[:args.clips]
        context = f.get_tensor("context").float()[:args.clips]
        latents = f.get_tensor("latents").float()[:args.clips]
    text = build_text_encoder("minilm", text_len=context.shape[1])
    vae = load_vae(args.vae)
    closer = with_direction = 0
    motion = []
    for i, record in enumerate(records):
        words = record["caption"].split()    # the training caption (a paraphrase or the canonical form)
        if any(w in OPPOSITE for w in words):
            own, reversed_ = text.encode([record["caption"], " ".join(OPPOSITE.get(w, w) for w in words)]).float()
            with_direction += 1
            closer += bool((context[i] - own).norm() < (context[i] - reversed_).norm())
        with torch.no_grad():
            clip = _pixels_to_uint8(vae.decode(latents[i:i + 1]))[0]
        motion.append(score_clip(clip, record["caption"])["motion"])   # the judge reads paraphrases too
    print(f"{args.latents}: stored embedding closer to its own caption than to the reversed one for {closer} of "
          f"{with_direction} clips with a direction word; decoded latents' motion score "
          f"{sum(motion) / len(motion):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("confusion")
    c.add_argument("scores", nargs="+")
    q = sub.add_parser("pairs")
    q.add_argument("--weights", required=True)
    q.add_argument("--kind", choices=("causal", "autoregressive", "bidirectional"), required=True)
    q.add_argument("--block-size", type=int, default=1)
    q.add_argument("--manifest", required=True)
    q.add_argument("--vae", default="shapes")
    q.add_argument("--n", type=int, default=20)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--work", default="runs/direction_probe", help="where the two prompt lists are written")
    g = sub.add_parser("contrast")
    g.add_argument("--weights", required=True)
    g.add_argument("--kind", choices=("autoregressive", "bidirectional"), required=True)
    g.add_argument("--block-size", type=int, default=1)
    g.add_argument("--manifest", required=True)
    g.add_argument("--vae", default="shapes")
    g.add_argument("--n", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--negative", choices=("zeros", "reversed"), default="zeros")
    g.add_argument("--guidance", type=float, default=4.0)
    g.add_argument("--contrast", type=float, default=0.0)
    r = sub.add_parser("sensitivity")
    r.add_argument("--weights", required=True)
    r.add_argument("--latents", required=True, help="a latent shard of `data encode` (latents + context)")
    r.add_argument("--clips", type=int, default=8)
    r.add_argument("--frames", type=int, default=9)
    r.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("data")
    d.add_argument("--latents", required=True)
    d.add_argument("--vae", default="shapes")
    d.add_argument("--clips", type=int, default=32)
    fl = sub.add_parser("frame-loss")
    fl.add_argument("--latents", required=True)
    fl.add_argument("weights", nargs="+")
    nf = sub.add_parser("next-frame")
    nf.add_argument("--weights", required=True)
    nf.add_argument("--latents", required=True)
    nf.add_argument("--vae", default="shapes")
    nf.add_argument("--clips", type=int, default=24)
    nf.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("prior")
    pr.add_argument("--manifest", required=True, help="the training manifest of `data shapes`")
    pl = sub.add_parser("placement")
    pl.add_argument("--weights", required=True)
    pl.add_argument("--kind", choices=("causal", "autoregressive", "bidirectional"), required=True)
    pl.add_argument("--block-size", type=int, default=1)
    pl.add_argument("--vae", default="shapes")
    pl.add_argument("--n", type=int, default=96)
    pl.add_argument("--batch-size", type=int, default=24)
    pl.add_argument("--seed", type=int, default=1000)
    args = p.parse_args()
    {"data": lambda: data(args), "prior": lambda: prior(args), "placement": lambda: placement(args),
     "next-frame": lambda: next_frame(args), "frame-loss": lambda: frame_loss(args),
     "confusion": lambda: confusion(args.scores), "pairs": lambda: pairs(args),
     "contrast": lambda: contrast(args),
     "sensitivity": lambda: sensitivity(args)}[args.cmd]()


if __name__ == "__main__":
    main()
