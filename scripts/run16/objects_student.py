"""Run 16 prototype: the whole clip made object by object. Where the shipped pipeline assembles frame 0 and makes
the prefix object by object (`first_frame.compose_prefix`), the student too continues each object alone, reading
that object's clause as a one-object caption (in its training distribution), and the per-object clips are
painted together over the background frame by frame (`compose.paint`, the brightest pixel wins). One-clause
prompts are made as shipped.

    python scripts/run16/objects_student.py ARGS       # ARGS as for `causal-forcing eval model`

It patches, for its own process, `FirstFrameSampler._compose_prefix` (to keep each row's per-object prefix
latents and background) and `eval.models.generate_clips` (to run the per-object student and paint); the library
is unchanged.
"""
import sys

import torch

from causal_forcing.eval import models as eval_models
from causal_forcing.models.text import split_clauses
from causal_forcing.pipelines import first_frame as ff
from causal_forcing.pipelines.compose import paint
from causal_forcing.pipelines.streaming import CausalStream, StreamConfig
from causal_forcing.schedulers.flow import FewStepSchedule

KEPT: dict = {}
_compose_prefix = ff.FirstFrameSampler._compose_prefix


def compose_prefix(self, first, context, noise, prompts, placements):
    """As the library's, keeping per row the per-object prefix latents [n, k, C, h, w] and the background."""
    original_solve = self._solve

    def solve(model, contexts, starts, initial=None, guidance=None):
        frames = list(original_solve(model, contexts, starts, initial=initial, guidance=guidance))
        solved = torch.cat(frames, dim=1)
        plain = first.shape[0] - len(placements)
        at = plain
        for row in sorted(placements):
            n = len(placements[row].layers)
            KEPT[row] = (solved[at:at + n].clone(), placements[row].background)
            at += n
        yield from frames

    self._solve = solve
    try:
        return _compose_prefix(self, first, context, noise, prompts, placements)
    finally:
        del self._solve


class Prefix:
    """A first-frame callable that hands the stream given latents [B, k, C, h, w] as its prefix."""

    def __init__(self, latents):
        self.latents, self.frames, self.refine_steps = latents, latents.shape[1], 0

    def __call__(self, context, noise):
        return self.latents.to(noise)


def generate_clips(model, vae, text_encoder, entries, settings):
    latent_frames = 1 + (settings.frames - 1) // 4
    size = entries[0].get("size", 64)
    hw = (size // vae.spatial_factor, size // vae.spatial_factor)
    for start in range(0, len(entries), settings.batch_size):
        batch = list(entries[start:start + settings.batch_size])
        prompts = [e["caption"] for e in batch]
        ctx = text_encoder.encode(prompts).float()
        KEPT.clear()
        lat = eval_models.generate_latents(model, ctx, torch.zeros_like(ctx), settings, latent_frames, hw,
                                           settings.seed + start, prompts=prompts)
        with torch.no_grad():
            pixels = vae.decode(lat)
            if KEPT:
                rows = sorted(KEPT)
                clauses = [c for row in rows for c in split_clauses(prompts[row])]
                prefix = torch.cat([KEPT[row][0] for row in rows])
                stream = CausalStream(model, text_encoder.encode(clauses).float(), latent_hw=hw,
                                      num_frames=latent_frames,
                                      config=StreamConfig(block_size=settings.block_size,
                                                          schedule=FewStepSchedule.from_config(
                                                              settings.steps, settings.first_block_steps)),
                                      seed=settings.seed + start + 1_000_000, first_frame=Prefix(prefix))
                clips = vae.decode(stream.generate())
                at = 0
                for row in rows:
                    n = KEPT[row][0].shape[0]
                    pixels[row] = paint(KEPT[row][1].to(clips), list(clips[at:at + n])).to(pixels)
                    at += n
            yield batch, eval_models._pixels_to_uint8(pixels)


if __name__ == "__main__":
    ff.FirstFrameSampler._compose_prefix = compose_prefix
    eval_models.generate_clips = generate_clips
    from causal_forcing.cli import main
    sys.exit(main(["eval", "model", *sys.argv[1:]]))
