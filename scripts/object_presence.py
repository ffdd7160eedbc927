"""Where do a model's objects go? Diagnostics behind docs/results.md ("Run 7").

    python scripts/object_presence.py prompts --out DIR [--n 200] [--draw 260] [--seed 20261128]
        a second evaluation manifest (DIR/manifest.jsonl): `--draw` canonical prompts drawn like the standard set
        (10 % held-out), minus those whose caption is in it, the first `--n` kept: prompts no choice was made on.

    python scripts/object_presence.py presence --weights DIR --manifest EVAL.jsonl [--kind causal] [--block-size 1]
                                              [--seed 0] [--vae shapes] [--first-frame DIR] [--two-object]
                                              [--detail] [--no-first-frame]
        generates every prompt as `causal-forcing eval model` does (`generate_clips`: the same clips) and, for each
        expected object the judge does not find in >= 90 % of the frames, says how it fails: never drawn (and
        whether it is the second object of a prompt), drawn at first and gone by the end (and whether it was at
        the canvas edge when last seen), drawn only later, or flickering. `--first-frame DIR`: frame 0 from that
        first-frame model, as in a pipeline that names it (default: the first-frame and prefix models that
        --weights' pipeline.json names, if any; `--no-first-frame`: none). `--two-object`: only the
        in-distribution two-object prompts; `--detail`: each missing object's presence over the clip, one mark per
        3 frames.

    python scripts/object_presence.py frame0 --weights FIRST_FRAME_DIR --manifest EVAL.jsonl [--vae shapes]
                                            [--text minilm|minilm-clauses] [--steps 20] [--guidance 4]
        a first-frame model's frame 0 (UniPC, --steps steps, CFG --guidance) for each in-distribution prompt,
        repeated as a still 17-frame clip and judged: how many expected objects it draws with the right colour,
        and with the right colour, shape and size, by prompt size. `--text`: the text encoder the model reads
        (default minilm).

    python scripts/object_presence.py prefix --weights PIPELINE_DIR --manifest EVAL.jsonl [--seed 0]
                                            [--first-frame-guidance G] [--prefix-guidance G]
        the in-distribution two-object prompts: the pipeline's prefix (frames 0..K-1, K from its pipeline.json)
        from its first-frame model's frame 0, and the prefix model's frames 1..K-1 from the real clip's frame 0
        (read from the manifest's clip files, encoded by the pipeline's VAE), on the same noise; for each, how
        many objects are present at the prefix's first and last pixel frame and move the caption's way over it
        (centroid shift > 1.5 px along the caption's axis and twice the shift across it; still: < 1.5 px both
        ways), and in how many prompts both objects do. The real clips' own first K frames are the reference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from causal_forcing.data import shapes
from causal_forcing.data.shapes_io import read_manifest
from causal_forcing.eval import models as M
from causal_forcing.eval import shapesbench as SB


def fresh_prompts(args: argparse.Namespace) -> None:
    standard = {p.caption for p in shapes.standard_eval_prompts()}
    drawn = shapes.standard_eval_prompts(n=args.draw, seed=args.seed)
    prompts = [p for p in drawn if p.caption not in standard][:args.n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"caption": p.caption, "held_out": p.held_out, "size": 64,
                                "file": f"fresh_{i:03d}.npz"}) + "\n")
    two = sum(" and " in p.caption for p in prompts)
    print(f"wrote {len(prompts)} prompts ({sum(p.held_out for p in prompts)} held-out, {two} two-object) to "
          f"{out / 'manifest.jsonl'}")


def classify_object(present: np.ndarray, box_last: np.ndarray | None, canvas: int) -> str:
    """How an object that is present in < 90 % of the frames fails (`present`: bool per frame)."""
    head, tail = present[:17].mean(), present[-20:].mean()
    if not present.any():
        return "never"
    if head >= 0.9 and tail < 0.5:
        y0, x0, y1, x1 = box_last
        return "vanishes at the edge" if min(y0, x0) <= 1 or max(y1, x1) >= canvas - 1 else "vanishes inside"
    if head < 0.5 and tail >= 0.9:
        return "appears late"
    return "flickers"


def presence(args: argparse.Namespace) -> None:
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder
    entries = read_manifest(args.manifest)
    model = M.load_model_folder(args.weights)
    text = build_text_encoder("minilm", text_len=model.config.text_len, device="cpu")
    vae = load_vae(args.vae)
    if args.two_object:
        entries = [e for e in entries if not e.get("held_out") and len(shapes.parse_caption(e["caption"])) == 2]
    first_frame = None
    if args.first_frame:
        from causal_forcing.pipelines.first_frame import FirstFrameSampler
        first_frame = FirstFrameSampler(M.load_model_folder(args.first_frame))
    elif not args.no_first_frame and (Path(args.weights) / "pipeline.json").is_file():
        # the pipeline's own first-frame model, and its prefix model if it names one
        from causal_forcing.pipelines.loading import _load_first_frame, read_pipeline_spec
        spec = read_pipeline_spec(args.weights)
        if spec.first_frame is not None:
            first_frame = _load_first_frame(spec.first_frame, Path(args.weights), torch.float32, spec.text_encoder)
    settings = M.EvalSettings(kind=args.kind, block_size=args.block_size, seed=args.seed, first_frame=first_frame)
    counts: dict[str, int] = {}
    total = 0
    for batch, clips in M.generate_clips(model, vae, text, entries, settings):
        for entry, clip in zip(batch, clips):
            cls, _ = SB.classify(clip)
            tracks = SB.all_tracks(cls, SB.noise_area(clip.shape[1]))
            objects = shapes.parse_caption(entry["caption"])
            for k, attrs in enumerate(objects):
                total += 1
                track = tracks.get(attrs.color)
                present = track.present if track is not None else np.zeros(clip.shape[0], bool)
                if present.mean() >= SB.PRESENT_FRACTION:
                    continue
                last = track.box[np.flatnonzero(present)[-1]] if present.any() else None
                kind = classify_object(present, last, clip.shape[1])
                if kind == "never":
                    kind += " (second of two)" if k == 1 else " (first of two)" if len(objects) == 2 else " (alone)"
                counts[kind] = counts.get(kind, 0) + 1
                if args.detail:   # one character per 3 frames: '#' present in all, '+' in some, '.' in none
                    marks = "".join("#" if c.all() else "+" if c.any() else "." for c in np.array_split(
                        present, -(-len(present) // 3)))
                    print(f"  {marks}  {kind:22s} {attrs.phrase}")
    missing = sum(counts.values())
    print(f"{missing} of {total} expected objects are present in < {SB.PRESENT_FRACTION:.0%} of the frames:")
    for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {n}")
    print(json.dumps({"objects": total, "missing": missing, **counts}))


def frame0(args: argparse.Namespace) -> None:
    from causal_forcing.models.small_vae import load_vae
    from causal_forcing.models.text import build_text_encoder
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    model = M.load_model_folder(args.weights)
    sampler = FirstFrameSampler(model, FirstFrameSpec(steps=args.steps, guidance=args.guidance))
    vae = load_vae(args.vae)
    text = build_text_encoder(args.text, text_len=model.config.text_len, device="cpu")
    entries = [e for e in read_manifest(args.manifest) if not e.get("held_out")]
    found: dict[int, list[int]] = {}  # prompt size -> objects, right colour, right colour+shape+size
    for start in range(0, len(entries), 25):
        batch = entries[start:start + 25]
        ctx = text.encode([e["caption"] for e in batch]).float()
        noise = torch.randn(len(batch), 1, model.config.in_dim, 8, 8, generator=torch.Generator().manual_seed(start))
        with torch.no_grad():
            still = M._pixels_to_uint8(vae.decode(sampler(ctx, noise).repeat(1, 5, 1, 1, 1)))   # 17 equal frames
        for entry, clip in zip(batch, still):
            objects = SB.score_clip(clip, entry["caption"])["objects"]
            n = found.setdefault(len(objects), [0, 0, 0])
            n[0] += len(objects)
            n[1] += sum(o["measured"] is not None and o["color"] == 1.0 for o in objects)
            n[2] += sum(o["measured"] is not None and o["color"] == o["shape"] == o["size"] == 1.0 for o in objects)
    for k, (total, ok, exact) in sorted(found.items()):
        print(f"{k}-object prompts: {ok} of {total} objects found in frame 0 with the right colour, {exact} with the "
              f"right colour, shape and size")


def _moves_as_told(track: SB.Track | None, motion: str) -> tuple[bool, bool]:
    """(present at the first and last frame, moved the caption's way between them)."""
    if track is None or not (track.present[0] and track.present[-1]):
        return False, False
    dy, dx = track.centroid[-1] - track.centroid[0]
    if motion == "still":
        return True, bool(abs(dy) < 1.5 and abs(dx) < 1.5)
    along_y, along_x = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}[motion]
    along, across = dy * along_y + dx * along_x, dy * along_x + dx * along_y
    return True, bool(along > 1.5 and along > 2 * abs(across))


def prefix(args: argparse.Namespace) -> None:
    import dataclasses

    from causal_forcing.data.shapes_io import load_clip
    from causal_forcing.pipelines.loading import load_pipeline
    pipe = load_pipeline(args.weights)
    sampler = pipe.first_frame
    if sampler is None or sampler.prefix_model is None:
        raise SystemExit(f"{args.weights}: the pipeline names no prefix model")
    overrides = {"guidance": args.first_frame_guidance, "prefix_guidance": args.prefix_guidance}
    sampler.spec = dataclasses.replace(sampler.spec, **{k: v for k, v in overrides.items() if v is not None})
    n = sampler.frames
    root = Path(args.manifest).parent
    entries = [e for e in read_manifest(args.manifest)
               if not e.get("held_out") and len(shapes.parse_caption(e["caption"])) == 2]
    captions = [e["caption"] for e in entries]
    pixels = 1 + 4 * (n - 1)
    real = torch.stack([torch.from_numpy(load_clip(root / e["file"])[:pixels]) for e in entries])
    channels, (h, w) = pipe.model.config.in_dim, pipe.latent_hw
    noise = torch.randn(len(entries), n, channels, h, w, generator=torch.Generator().manual_seed(args.seed))
    bound = sampler.for_prompts(captions)
    with torch.no_grad():
        real_latents = pipe.vae.encode(real.permute(0, 1, 4, 2, 3).float() / 127.5 - 1)
        context = pipe.text_encoder.encode(captions).float()
        generated = bound(context, noise)
        own = context if sampler.prefix_text_encoder is None else bound.prefix_context
        # the prefix model alone, continuing the real frame 0 (as the sampler continues its first-frame model's)
        from_real = torch.cat(list(sampler._solve(sampler.prefix_model, own, noise[:, 1:],
                                                  initial=real_latents[:, :1], guidance=sampler.spec.prefix_cfg)),
                              dim=1)
    for name, latents in (("the real clip's first frames", real_latents[:, :n]),
                          ("first-frame model's frame 0 + prefix model", generated),
                          ("real frame 0 + prefix model", from_real)):
        with torch.no_grad():
            clips = M._pixels_to_uint8(pipe.vae.decode(latents))
        present = right = both = 0
        for entry, clip in zip(entries, clips):
            cls, _ = SB.classify(clip)
            ok_all = True
            for attrs in shapes.parse_caption(entry["caption"]):
                seen, ok = _moves_as_told(SB.color_track(cls == SB.COLOR_NAMES.index(attrs.color) + 1, attrs.color,
                                                         SB.noise_area(clip.shape[1])), attrs.motion)
                present += seen
                right += ok
                ok_all &= ok
            both += ok_all
        print(f"{name:44s} both objects right {both}/{len(entries)} ({both / len(entries):.2f}); objects present "
              f"{present}/{2 * len(entries)}, moving right {right}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="a fresh prompt manifest disjoint from the standard set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--draw", type=int, default=260)
    p.add_argument("--seed", type=int, default=20261128)
    p.set_defaults(func=fresh_prompts)
    p = sub.add_parser("presence", help="how expected objects go missing")
    p.add_argument("--weights", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--kind", default="causal", choices=["causal", "autoregressive", "bidirectional"])
    p.add_argument("--block-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default="shapes")
    p.add_argument("--first-frame", default=None, metavar="DIR",
                   help="a first-frame model folder (20 steps, CFG 4) that makes frame 0, as in a pipeline "
                        "(default: the one --weights' pipeline.json names, with its prefix model, if any)")
    p.add_argument("--no-first-frame", action="store_true", help="the student makes frame 0 itself")
    p.add_argument("--two-object", action="store_true", help="only the in-distribution two-object prompts")
    p.add_argument("--detail", action="store_true", help="print each missing object's presence over time")
    p.set_defaults(func=presence)
    p = sub.add_parser("frame0", help="are the expected objects in a first-frame model's frame 0?")
    p.add_argument("--weights", required=True, help="a first-frame model folder")
    p.add_argument("--manifest", required=True)
    p.add_argument("--vae", default="shapes")
    p.add_argument("--text", default="minilm", choices=["minilm", "minilm-clauses"],
                   help="the text encoder the first-frame model reads")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4)")
    p.set_defaults(func=frame0)
    p = sub.add_parser("prefix", help="a pipeline's prefix from its own frame 0 and from the real frame 0")
    p.add_argument("--weights", required=True, help="a pipeline folder whose pipeline.json names a prefix model")
    p.add_argument("--manifest", required=True, help="a manifest whose clip files are beside it (data shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-frame-guidance", type=float, default=None)
    p.add_argument("--prefix-guidance", type=float, default=None)
    p.set_defaults(func=prefix)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.func(args)


if __name__ == "__main__":
    main()
