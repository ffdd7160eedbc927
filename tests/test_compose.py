"""Frame 0 assembled object by object (pipelines/compose.py, ``first_frame.compose``): the assembly against the
world's own renders, the cases where it declines, and the sampler's plumbing against the candidates solved one by
one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import fan_in_init
from causal_forcing.config import ModelConfig
from causal_forcing.data import shapes
from causal_forcing.errors import ConfigError
from causal_forcing.models.matcher import FrameTextMatcher, MatcherConfig
from causal_forcing.models.text import split_clauses
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines import first_frame as first_frame_module
from causal_forcing.pipelines.compose import Placement, boxes_touch, object_box, paint, place_layers, place_objects
from causal_forcing.pipelines.first_frame import MAX_CANDIDATES, FirstFrameSampler, FirstFrameSpec, candidate_noise

pytestmark = pytest.mark.usefixtures("one_thread")

CANVAS = 64


def frame0(*objects: tuple[str, str, str, int, int]) -> torch.Tensor:
    """The world's frame 0 with `objects` (size, colour, shape, left, top in whole pixels) as [3, H, W] in
    [-1, 1]."""
    params = tuple(shapes.ObjectParams(attrs=shapes.ObjectAttrs(size=s, color=c, shape=k, motion="still"),
                                       x0=x / CANVAS, y0=y / CANVAS, speed=0.0) for s, c, k, x, y in objects)
    pixels = shapes.render(shapes.ClipSpec(objects=params, size=CANVAS, frames=17, seed=0))[0]
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


RED = ("small", "red", "triangle")
BLUE = ("big", "blue", "square")


def test_place_objects_equals_the_world_render_at_the_layout_places():
    """Drawings of each object elsewhere, moved to where the layout has them, give exactly the world's render of
    both objects at the layout's places, whatever the layout draws there (here: the wrong shapes)."""
    layout = frame0(("small", "red", "circle", 40, 8), ("big", "blue", "circle", 6, 30))
    red, blue = frame0((*RED, 10, 44)), frame0((*BLUE, 36, 2))
    expected = frame0((*RED, 40, 8), (*BLUE, 6, 30))
    torch.testing.assert_close(place_objects(layout, [[red], [blue]]), expected, atol=0, rtol=0)
    # the order of the clauses does not matter when the objects do not touch
    torch.testing.assert_close(place_objects(layout, [[blue], [red]]), expected, atol=0, rtol=0)


def test_place_objects_uses_the_first_drawing_with_an_object_and_stays_in_the_frame():
    """A big square centred on a small one in the corner would stick out of the frame: it is kept inside."""
    layout = frame0(("small", "blue", "square", 0, 0), ("small", "red", "square", 50, 50))
    empty = torch.full((3, CANVAS, CANVAS), -1.0)
    big_blue = ("big", "blue", "square")
    out = place_objects(layout, [[empty, frame0((*big_blue, 30, 30)), frame0((*big_blue, 1, 1))],
                                 [frame0(("small", "red", "square", 3, 40))]])
    torch.testing.assert_close(out, frame0((*big_blue, 0, 0), ("small", "red", "square", 50, 50)), atol=0, rtol=0)


def test_place_objects_declines_what_it_cannot_assemble():
    layout = frame0(("small", "red", "circle", 40, 8), ("big", "blue", "circle", 6, 30))
    red, blue = frame0((*RED, 10, 44)), frame0((*BLUE, 36, 2))
    green = frame0(("small", "green", "square", 20, 20))
    empty = torch.full((3, CANVAS, CANVAS), -1.0)
    assert place_objects(layout, [[red], [green]]) is None            # the layout has no green object
    assert place_objects(layout, [[red], [empty, empty]]) is None     # a clause drew nothing
    touching = frame0(("small", "red", "circle", 20, 20), ("big", "blue", "circle", 20 + 9, 20))
    assert place_objects(touching, [[red], [blue]]) is None           # the moved objects would touch
    with pytest.raises(ValueError, match="layout must be"):
        place_objects(layout[None], [[red]])


def test_place_layers_hold_each_object_alone_and_paint_to_the_frame():
    """Each layer is the world's render of its object alone at its layout place; painted over the background they
    are place_objects' frame; painting a clip is painting each of its frames."""
    layout = frame0(("small", "red", "circle", 40, 8), ("big", "blue", "circle", 6, 30))
    red, blue = frame0((*RED, 10, 44)), frame0((*BLUE, 36, 2))
    placement = place_layers(layout, [[red], [blue]])
    assert placement is not None and len(placement.layers) == 2
    for layer, alone in zip(placement.layers, (frame0((*RED, 40, 8)), frame0((*BLUE, 6, 30)))):
        torch.testing.assert_close(paint(placement.background, [layer]), alone, atol=0, rtol=0)
    torch.testing.assert_close(paint(placement.background, placement.layers), place_objects(layout, [[red], [blue]]),
                               atol=0, rtol=0)
    clips = [torch.stack([layer, layer.roll(3, -1)]) for layer in placement.layers]       # two frames each
    painted = paint(placement.background, clips)
    for t in range(2):
        torch.testing.assert_close(painted[t], paint(placement.background, [c[t] for c in clips]), atol=0, rtol=0)
    assert place_layers(layout, [[red], [frame0(("small", "green", "square", 20, 20))]]) is None


def test_boxes_and_gaps():
    mask = torch.zeros(8, 10, dtype=torch.bool)
    assert object_box(mask) is None
    mask[2:5, 3:7] = True
    assert object_box(mask) == (2, 4, 3, 6)
    assert boxes_touch((0, 3, 0, 3), (2, 5, 2, 5))          # overlapping
    assert boxes_touch((0, 3, 0, 3), (0, 3, 4, 7))          # adjacent columns
    assert not boxes_touch((0, 3, 0, 3), (0, 3, 4, 7), gap=0)
    assert not boxes_touch((0, 3, 0, 3), (5, 8, 0, 3))      # one empty row between
    assert boxes_touch((0, 3, 0, 3), (5, 8, 0, 3), gap=2)


def test_split_clauses():
    assert split_clauses("a big red circle moving up and a small blue square standing still") == [
        "a big red circle moving up", "a small blue square standing still"]
    assert split_clauses("a red ball next to a blue cube, and a green cone") == ["a red ball", "a blue cube",
                                                                                  "a green cone"]
    assert split_clauses("a red circle") == ["a red circle"]


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------
TINY_DIT = ModelConfig(in_dim=8, out_dim=8, dim=32, ffn_dim=64, text_dim=24, text_len=5, num_heads=2, num_layers=2,
                       abs_pos_freqs=2)


class HashText:
    """A text encoder whose embedding is a fixed function of the text (what the sampler is given per clause)."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.randn(5, 24, generator=torch.Generator().manual_seed(sum(map(ord, p))))
                            for p in prompts])


class PoolVAE:
    """A stand-in VAE, frame by frame (one pixel frame per latent frame): 8x nearest upsampling of the first 3
    channels, and 8x average pooling back."""

    device = torch.device("cpu")
    dtype = torch.float32

    def decode(self, latents: torch.Tensor) -> torch.Tensor:          # [N, F, C, h, w] -> [N, F, 3, 8h, 8w]
        up = F.interpolate(latents[:, :, :3].flatten(0, 1), scale_factor=8, mode="nearest").clamp(-1, 1)
        return up.unflatten(0, latents.shape[:2])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:           # [N, T, 3, H, W] -> [N, T, 8, H/8, W/8]
        pooled = F.avg_pool2d(pixels.flatten(0, 1), 8)
        latents = torch.cat([pooled, torch.zeros_like(pooled[:, :1]).expand(-1, 5, -1, -1)], dim=1)
        return latents.unflatten(0, pixels.shape[:2])


def _matcher() -> FrameTextMatcher:
    torch.manual_seed(1)
    model = FrameTextMatcher(MatcherConfig(in_dim=8, latent_hw=(4, 6), text_dim=24, text_len=5, dim=32, num_heads=2,
                                           num_layers=2, ffn_dim=48)).eval()
    with torch.no_grad():
        for p in model.parameters():          # a random matcher whose scores differ clearly between inputs
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("candidates,layouts", [(1, 1), (2, 1), (1, 2)])
def test_composed_frame_zero_is_the_assembly_of_the_clause_samples(monkeypatch, candidates, layouts):
    """Rows with several clauses get ``encode(place_objects(decode(first), decoded clause samples))``, ``first``
    being the plain sampler's frame 0 (or, with 2 candidates, the one of candidate noises 0 and 1 the matcher
    scores higher) and the clause samples the plain sampler's from the clause's embedding and candidate noise
    ``candidates + (layouts - 1) + j k + i``; one-clause rows keep ``first``; a row it declines tries its other
    layouts (the whole prompt from candidate noise ``candidates``, ...) and keeps ``first`` when it declines them
    all; the next frame continues from the assembled one. The sampler solves all of them in one batch; here each
    is solved alone."""
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    text, vae = HashText(), PoolVAE()
    matcher = _matcher() if candidates > 1 else None
    spec = FirstFrameSpec(steps=3, guidance=2.0, solver="euler", text_encoder="minilm", compose="objects",
                          compose_candidates=2, candidates=candidates, compose_layouts=layouts,
                          matcher_path="matcher" if candidates > 1 else None)
    prompts = ["a red circle and a blue square", "a green triangle", "a red circle next to a big white square"]
    seen: list[tuple[torch.Tensor, list[list[torch.Tensor]]]] = []

    def fake_place(layout, drawings):
        seen.append((layout, [list(d) for d in drawings]))
        if len(seen) == 2:                                                      # the second row is declined
            return None
        return Placement(layout.flip(-1) * 0.5, [])                            # paints to layout.flip(-1) * 0.5

    monkeypatch.setattr(first_frame_module, "place_layers", fake_place)
    sampler = FirstFrameSampler(model, spec, text, vae=vae, matcher=matcher)
    plain = FirstFrameSampler(model, dataclasses.replace(spec, compose=None, candidates=1, matcher_path=None), text)
    noise = torch.randn(3, 1, 8, 4, 6, generator=torch.Generator().manual_seed(5))
    context = text.encode(prompts)
    with torch.no_grad():
        out = sampler.for_prompts(prompts)(context, noise)
        tries = [plain(context, candidate_noise(noise, i)) for i in range(candidates)]
        if matcher is None:
            reference = tries[0]
        else:
            scores = torch.stack([matcher(t[:, 0], context) for t in tries])          # [candidates, B]
            assert scores.argmax(0).any()          # the matcher's choice is not always candidate 0
            reference = torch.stack([tries[int(c)][b] for b, c in enumerate(scores.argmax(0))])
    assert len(seen) == 1 + layouts
    torch.testing.assert_close(out[1], reference[1], atol=1e-5, rtol=1e-5)     # one clause: untouched
    torch.testing.assert_close(seen[1][0], vae.decode(reference[2:])[0, 0], atol=1e-5, rtol=1e-5)
    if layouts == 1:
        torch.testing.assert_close(out[2], reference[2], atol=1e-5, rtol=1e-5)  # declined: untouched
    else:                                                                       # declined, then its second layout
        with torch.no_grad():
            second = plain(context[2:], candidate_noise(noise[2:], candidates))
        torch.testing.assert_close(seen[2][0], vae.decode(second)[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[2:], vae.encode((seen[2][0].flip(-1) * 0.5)[None, None]), atol=0, rtol=0)
    layout, drawings = seen[0]
    torch.testing.assert_close(layout, vae.decode(reference[:1])[0, 0], atol=1e-5, rtol=1e-5)
    clauses = split_clauses(prompts[0])
    with torch.no_grad():
        for j, clause in enumerate(clauses):
            for i in range(2):
                alone = plain(text.encode([clause]), candidate_noise(noise[:1], candidates + layouts - 1 + j * 2 + i))
                torch.testing.assert_close(drawings[j][i], vae.decode(alone)[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], vae.encode((layout.flip(-1) * 0.5)[None, None]), atol=0, rtol=0)
    if (candidates, layouts) != (1, 1):
        return
    # without prompts (a caller that did not bind them) frame 0 is as sampled
    with torch.no_grad():
        torch.testing.assert_close(sampler(context, noise), reference, atol=0, rtol=0)
    # frames after frame 0 continue from the assembled frame
    seen.clear()
    two = FirstFrameSampler(model, dataclasses.replace(spec, frames=2), text, vae=vae)
    later = torch.randn(1, 1, 8, 4, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        clip = two.for_prompts(prompts[:1])(context[:1], torch.cat([noise[:1], later], 1))
        expected = list(plain._solve(model, context[:1], later, initial=out[:1]))
    torch.testing.assert_close(clip[:, :1], out[:1], atol=1e-5, rtol=1e-5)   # batch 1 against batch 3
    torch.testing.assert_close(clip[:, 1:], expected[1], atol=1e-5, rtol=1e-5)


def test_composed_prefix_continues_each_object_alone(monkeypatch):
    """``compose_prefix``: a row whose frame 0 was assembled gets frames 1.. = encode(paint(background, decode(each
    object's clip)))[1:], each clip being the prefix model's plain continuation of that object's layer alone, read
    with its clause only, from candidate noise j; a one-clause row continues as without it. Against each clip solved
    alone."""
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    prefix = fan_in_init(WanDiT(TINY_DIT), seed=4).eval()
    text, vae = HashText(), PoolVAE()
    spec = FirstFrameSpec(steps=3, guidance=2.0, solver="euler", text_encoder="minilm", compose="objects",
                          compose_candidates=1, frames=3, prefix_path="prefix", prefix_text_encoder="minilm-clauses",
                          prefix_guidance=1.5, compose_prefix=True)
    prompts = ["a red circle and a blue square", "a green triangle"]
    generator = torch.Generator().manual_seed(8)
    background = torch.full((3, 32, 48), -0.8)
    layers = [torch.rand(3, 32, 48, generator=generator) * 2 - 1 for _ in range(2)]
    monkeypatch.setattr(first_frame_module, "place_layers", lambda layout, drawings: Placement(background, layers))
    sampler = FirstFrameSampler(model, spec, text, prefix_model=prefix, prefix_text_encoder=text, vae=vae)
    plain = FirstFrameSampler(model, dataclasses.replace(spec, compose=None, compose_prefix=False), text,
                              prefix_model=prefix, prefix_text_encoder=text)
    noise = torch.randn(2, 3, 8, 4, 6, generator=generator)
    context = text.encode(prompts)
    with torch.no_grad():
        out = sampler.for_prompts(prompts)(context, noise)
        reference = plain.for_prompts(prompts[1:])(context[1:], noise[1:])
        clips = []
        for j, clause in enumerate(split_clauses(prompts[0])):
            start = vae.encode(paint(background, [layers[j]])[None, None])
            solved = plain._solve(prefix, text.encode([clause]), candidate_noise(noise[:1, 1:], j), initial=start,
                                  guidance=1.5)
            clips.append(vae.decode(torch.cat(list(solved), dim=1))[0])
        expected = vae.encode(paint(background, clips)[None])
    torch.testing.assert_close(out[:1, :1], vae.encode(paint(background, layers)[None, None]), atol=0, rtol=0)
    torch.testing.assert_close(out[:1, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                       # not what continuing the assembled frame as a whole gives
        whole = list(plain._solve(prefix, text.encode(prompts[:1]), noise[:1, 1:], initial=out[:1, :1],
                                  guidance=1.5))[1:]
    assert not torch.allclose(out[:1, 1:], torch.cat(whole, dim=1), atol=1e-3)


def test_compose_settings_are_validated():
    model = fan_in_init(WanDiT(TINY_DIT), seed=2).eval()
    with pytest.raises(ConfigError, match="compose must be one of objects"):
        FirstFrameSpec(text_encoder="minilm", compose="blend")
    with pytest.raises(ConfigError, match="needs first_frame.text_encoder"):
        FirstFrameSpec(compose="objects")
    for bad in (0, MAX_CANDIDATES, True, 2.0):
        with pytest.raises(ConfigError, match="compose_candidates must be an integer"):
            FirstFrameSpec(text_encoder="minilm", compose="objects", compose_candidates=bad)
        with pytest.raises(ConfigError, match="compose_layouts must be an integer"):
            FirstFrameSpec(text_encoder="minilm", compose="objects", compose_layouts=bad)
    with pytest.raises(ConfigError, match="candidates \\+ compose_layouts - 1 must be below"):
        FirstFrameSpec(text_encoder="minilm", compose="objects", compose_layouts=8, candidates=9,
                       matcher_path="m")
    with pytest.raises(ConfigError, match="compose_prefix needs first_frame.compose and frames >= 2"):
        FirstFrameSpec(text_encoder="minilm", compose="objects", compose_prefix=True)
    with pytest.raises(ConfigError, match="compose_prefix needs first_frame.prefix_text_encoder"):
        FirstFrameSpec(text_encoder="minilm", compose="objects", compose_prefix=True, frames=2, prefix_path="p")
    with pytest.raises(ConfigError, match="compose_prefix must be true or false"):
        FirstFrameSpec(text_encoder="minilm", compose="objects", compose_prefix="yes", frames=2)
    with pytest.raises(ConfigError, match="needs the pipeline's VAE"):
        FirstFrameSampler(model, FirstFrameSpec(text_encoder="minilm", compose="objects"), HashText())
