"""The streaming few-step sampler against cache-free recomputation and its own invariants."""
import dataclasses

import pytest
import torch

from causal_forcing.errors import ConfigError
from causal_forcing.models.attention import BlockCausal
from causal_forcing.pipelines.streaming import (CausalStream, ReplayNoise, SeededNoise, StreamConfig,
                                                sample_causal)
from causal_forcing.schedulers.flow import FewStepSchedule

HW = (8, 8)


def _ctx(model, seed=3, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.text_len, model.config.text_dim, generator=gen)


@pytest.mark.parametrize("block,frames", [(1, 4), (3, 6), (2, 5)])
def test_streaming_equals_cache_free_recomputation(tiny_model, block, frames):
    """Truth: each KV-cached call == a block-causal forward (no cache) over [committed clean history; x]."""
    calls = []
    ctx = _ctx(tiny_model)
    out = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=frames, config=StreamConfig(block_size=block),
                        seed=0, trace=calls.append)
    with torch.no_grad():
        for c in (c for c in calls if c["kind"] == "denoise"):
            f0 = c["start_frame"]
            hist = out[:, :f0]
            seq = torch.cat([hist, c["x"]], 1)
            ts = torch.cat([torch.zeros(1, f0), c["t"]], 1)
            ref = tiny_model(seq, ts, ctx, layout=BlockCausal(block))[:, f0:]
            assert (ref - c["flow"]).abs().max() < 1e-5


def test_call_counts_and_first_block_schedule(tiny_model):
    ctx = _ctx(tiny_model)
    calls = []
    sched = FewStepSchedule.from_config([1000, 500], first_block=[1000, 750, 500, 250])
    sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=4, config=StreamConfig(schedule=sched), trace=calls.append)
    kinds = [(c["kind"], c["block"]) for c in calls]
    # block 0: 4 steps + commit; blocks 1, 2: 2 + commit; last block: 2 steps, commit skipped.
    assert len(calls) == 5 + 3 + 3 + 2 and kinds[-1] == ("denoise", 3)
    assert [float(c["t"][0, 0]) for c in calls if c["block"] == 1 and c["kind"] == "denoise"] == \
        pytest.approx([1000.0, 833.3333], abs=1e-3)


def test_seeded_noise_is_deterministic(tiny_model):
    ctx = _ctx(tiny_model)
    a = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, seed=5)
    b = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, seed=5)
    c = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, seed=6)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_blocks_are_yielded_in_order_and_equal_whole_run(tiny_model):
    ctx = _ctx(tiny_model)
    stream = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=5, config=StreamConfig(block_size=2), seed=1)
    blocks = list(stream)
    assert [b.shape[1] for b in blocks] == [2, 2, 1]
    whole = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=5, config=StreamConfig(block_size=2), seed=1)
    assert torch.equal(torch.cat(blocks, 1), whole)


def test_i2v_keeps_the_image_frame(tiny_model):
    ctx = _ctx(tiny_model)
    image = torch.randn(1, 1, 16, *HW)
    calls = []
    out = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, initial_latent=image, trace=calls.append)
    assert torch.equal(out[:, :1], image) and out.shape[1] == 3
    assert calls[0]["kind"] == "image" and calls[0]["start_frame"] == 0
    assert calls[1]["start_frame"] == 1


def test_window_larger_than_video_equals_plain_sampler(tiny_model):
    ctx = _ctx(tiny_model)
    plain = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=5, seed=2)
    windowed = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=5, seed=2,
                             config=StreamConfig(window_frames=8, sink_frames=1, sink_rope="rolling"))
    assert torch.equal(plain, windowed)


def test_unbounded_stream_keeps_memory_flat(tiny_model):
    ctx = _ctx(tiny_model)
    stream = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=None, seed=0,
                          config=StreamConfig(window_frames=3, sink_frames=1, sink_rope="rolling"))
    before = stream.cache.memory_bytes()
    blocks = [stream.next_block() for _ in range(10)]
    assert stream.cache.memory_bytes() == before and stream.frame == 10
    assert all(torch.isfinite(b).all() for b in blocks)
    with pytest.raises(ValueError, match="window"):
        CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=None)


def test_prompt_switch_leaves_earlier_blocks_unchanged(tiny_model):
    ctx, ctx2 = _ctx(tiny_model, 3), _ctx(tiny_model, 4)
    base = list(CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=4, seed=0))
    s = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=4, seed=0)
    switched = [s.next_block(), s.next_block()]
    s.set_context(ctx2)
    switched += list(s)
    assert torch.equal(switched[0], base[0]) and torch.equal(switched[1], base[1])
    assert (switched[2] - base[2]).abs().max() > 1e-3


def test_replay_noise_validates():
    r = ReplayNoise(torch.zeros(1, 2, 1, 1, 1), [torch.zeros(1, 1, 1, 1, 1)])
    r.initial((1, 2, 1, 1, 1))
    with pytest.raises(IndexError):
        r.initial((1, 1, 1, 1, 1))
    with pytest.raises(ValueError):
        r.fresh((1, 2, 1, 1, 1))


def test_context_noise_commit_draws_noise(tiny_model):
    """commit_t > 0 noises the committed block (one extra draw per commit) and changes later blocks."""
    ctx = _ctx(tiny_model)
    clean = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, seed=0)
    noisy = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=3, seed=0, config=StreamConfig(commit_t=100.0))
    assert torch.equal(clean[:, 0], noisy[:, 0]) and (clean[:, 1:] - noisy[:, 1:]).abs().max() > 1e-4


def test_first_frame_model_equals_its_sampler_then_i2v(tiny_model):
    """Truth: a stream with a first-frame model == that model's many-step sampler for frame 0 (same noise), then
    the student continuing from it exactly like I2V from an image (same later noise, same commit)."""
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from causal_forcing.pipelines.teacher import sample_autoregressive
    from conftest import fan_in_init

    other = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=7).eval()
    sampler = FirstFrameSampler(other, FirstFrameSpec(steps=3, guidance=2.5, solver="euler"))
    ctx = _ctx(tiny_model, batch=2)
    calls = []
    out = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=4, config=StreamConfig(block_size=2), seed=5,
                        first_frame=sampler, trace=calls.append)
    assert out.shape[1] == 4

    gen = torch.Generator().manual_seed(5)
    noise0 = torch.randn(2, 1, 16, *HW, generator=gen)
    frame0 = sample_autoregressive(other, ctx, torch.zeros_like(ctx), num_frames=1, latent_hw=HW, steps=3,
                                   guidance=2.5, solver="euler", noise=noise0)
    assert torch.allclose(out[:, :1], frame0, atol=1e-5)   # batched vs separate CFG branches: float rounding
    # The rest: the student after frame 0 committed like its own block, drawing noise after frame 0's.
    stream = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=4, config=StreamConfig(block_size=2),
                          noise=SeededNoise.from_generator(gen), initial_latent=frame0)
    assert torch.allclose(out, stream.generate(), atol=1e-5)
    kinds = [(c["kind"], c["start_frame"]) for c in calls]
    assert kinds[:2] == [("commit", 0), ("denoise", 1)]    # frame 0 goes into the cache, then frame 1 starts
    assert all(not (k == "denoise" and s == 0) for k, s in kinds)



def test_first_frame_model_prefix_of_several_frames(tiny_model):
    """A first-frame model asked for a prefix of 3 frames: the stream yields exactly its 3-frame autoregressive
    sample (same noise), commits the prefix block by block at the student's block size (frame-wise: frame by
    frame, as the student's own frames would go in), and, when the prefix is exactly one block, continues exactly
    like I2V from those frames."""
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from causal_forcing.pipelines.teacher import sample_autoregressive
    from conftest import fan_in_init

    other = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=7).eval()
    sampler = FirstFrameSampler(other, FirstFrameSpec(steps=3, guidance=2.5, solver="euler", frames=3))
    ctx = _ctx(tiny_model, batch=2)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 16, *HW, generator=gen)
    prefix = sample_autoregressive(other, ctx, torch.zeros_like(ctx), num_frames=3, latent_hw=HW, steps=3,
                                   guidance=2.5, solver="euler", noise=noise, batch_cfg=True)
    for block_size, commits in ((1, [0, 1, 2]), (3, [0])):
        calls = []
        out = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=6, config=StreamConfig(block_size=block_size),
                            seed=5, first_frame=sampler, trace=calls.append)
        assert out.shape[1] == 6 and torch.allclose(out[:, :3], prefix, atol=1e-6)
        kinds = [(c["kind"], c["start_frame"]) for c in calls]
        first_denoise = kinds.index(("denoise", 3))
        assert kinds[:first_denoise] == [("commit", s) for s in commits]
        assert all(s >= 3 for k, s in kinds if k == "denoise")
    g2 = torch.Generator().manual_seed(5)
    torch.randn(2, 3, 16, *HW, generator=g2)                       # the prefix's draw
    i2v = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=6, config=StreamConfig(block_size=3),
                       noise=SeededNoise.from_generator(g2), initial_latent=prefix).generate()
    assert torch.allclose(out, i2v, atol=1e-5)
    # A clip shorter than the prefix takes only the frames it needs from the first-frame model.
    short = sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=2, seed=5, first_frame=sampler)
    noise2 = torch.randn(2, 2, 16, *HW, generator=torch.Generator().manual_seed(5))
    expected = sample_autoregressive(other, ctx, torch.zeros_like(ctx), num_frames=2, latent_hw=HW, steps=3,
                                     guidance=2.5, solver="euler", noise=noise2, batch_cfg=True)
    assert torch.allclose(short, expected, atol=1e-6)


def test_prefix_model_continues_the_first_frame_model(tiny_model):
    """``prefix_path``: frame 0 from the first-frame model, frames 1..n-1 from the prefix model continuing it as from
    an I2V image (truth: the two autoregressive samplers composed by hand on the same noise); with a clause text
    encoder of its own, bound through ``for_prompts``, the prefix model reads that encoder's embeddings."""
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from causal_forcing.pipelines.teacher import sample_autoregressive
    from conftest import fan_in_init

    first = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=7).eval()
    prefix = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=8).eval()
    spec = FirstFrameSpec(steps=3, guidance=2.5, solver="euler", frames=3, prefix_path="prefix")
    sampler = FirstFrameSampler(first, spec, prefix_model=prefix)
    ctx, own = _ctx(tiny_model, batch=2), _ctx(tiny_model, batch=2, seed=9)
    noise = torch.randn(2, 3, 16, *HW, generator=torch.Generator().manual_seed(5))
    kw = dict(latent_hw=HW, steps=3, guidance=2.5, solver="euler", batch_cfg=True)
    frame0 = sample_autoregressive(first, ctx, torch.zeros_like(ctx), num_frames=1, noise=noise[:, :1], **kw)
    for reads in (ctx, own):
        rest = sample_autoregressive(prefix, reads, torch.zeros_like(reads), num_frames=3, noise=noise[:, 1:],
                                     initial_latent=frame0, **kw)
        got = sampler(ctx, noise) if reads is ctx else sampler.sample(ctx, own, noise)
        assert torch.allclose(got[:, :1], frame0, atol=1e-6) and torch.allclose(got, rest, atol=1e-6)
    assert (sampler(ctx, noise) - sampler.sample(ctx, own, noise))[:, 1:].abs().max() > 1e-4
    # prefix_guidance: the prefix model's own CFG scale; frame 0 keeps the first-frame model's.
    own_cfg = FirstFrameSampler(first, dataclasses.replace(spec, prefix_guidance=4.0), prefix_model=prefix)
    rest = sample_autoregressive(prefix, ctx, torch.zeros_like(ctx), num_frames=3, noise=noise[:, 1:],
                                 initial_latent=frame0, **{**kw, "guidance": 4.0})
    got = own_cfg(ctx, noise)
    assert torch.allclose(got[:, :1], frame0, atol=1e-6) and torch.allclose(got, rest, atol=1e-6)
    assert (got - sampler(ctx, noise))[:, 1:].abs().max() > 1e-4

    class Own:                                   # a stand-in text encoder: fixed embeddings per prompt
        def encode(self, prompts):
            return own[:len(prompts)]
    bound = FirstFrameSampler(first, dataclasses.replace(spec, prefix_text_encoder="minilm-clauses"),
                              prefix_model=prefix, prefix_text_encoder=Own()).for_prompts(["a", "b"])
    assert bound.frames == 3 and torch.equal(bound(ctx, noise), sampler.sample(ctx, own, noise))
    with pytest.raises(ConfigError, match="prefix model"):
        FirstFrameSampler(first, spec)
    for bad, message in ((dict(frames=1), "frames >= 2"),
                         (dict(prefix_path=None, prefix_text_encoder="minilm"), "needs first_frame.prefix_path"),
                         (dict(prefix_path=None, prefix_guidance=2.0), "needs first_frame.prefix_path"),
                         (dict(prefix_guidance=0.5), "prefix_guidance must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(spec, **bad)


@pytest.mark.parametrize("block", [1, 3])
def test_prefix_frames_are_handed_on_as_they_are_made(tiny_model, block):
    """A stream yields frame 0 of a prefix before the prefix model has run at all (time to first frame is one
    frame's solve, not the prefix's), then one prefix frame at a time, also when the student's blocks are longer
    (the prefix is committed in the student's blocks all the same); the clip is the same as the whole prefix made
    at once. A prompt switch during the prefix ends it: the student makes the next frame under the new prompt."""
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from conftest import fan_in_init

    first = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=7).eval()
    prefix = fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=8).eval()
    sampler = FirstFrameSampler(first, FirstFrameSpec(steps=3, guidance=2.5, solver="euler", frames=3,
                                                      prefix_path="prefix"), prefix_model=prefix)
    prefix_calls = []
    hook = prefix.register_forward_hook(lambda *_: prefix_calls.append(1))
    try:
        ctx = _ctx(tiny_model, batch=2)
        config = StreamConfig(block_size=block)
        stream = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=5, seed=5, first_frame=sampler, config=config)
        block0 = stream.next_block()
        assert block0.shape[1] == 1 and not prefix_calls
        rest = list(stream)
        assert [b.shape[1] for b in rest] == ([1, 1, 1, 1] if block == 1 else [1, 1, 2]) and prefix_calls
        class AllAtOnce:                       # no iter_frames: the stream takes the whole prefix as one block
            frames = 3

            def __call__(self, c, noise):
                return sampler(c, noise)
        whole = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=5, seed=5, first_frame=AllAtOnce(),
                             config=config)
        blocks = list(whole)
        assert blocks[0].shape[1] == 3
        torch.testing.assert_close(torch.cat([block0, *rest], 1), torch.cat(blocks, 1), atol=1e-6, rtol=0)

        calls = []
        switched = CausalStream(tiny_model, ctx, latent_hw=HW, num_frames=5, seed=5, first_frame=sampler,
                                trace=calls.append, config=config)
        switched.next_block()
        switched.set_context(_ctx(tiny_model, seed=11, batch=2))
        switched.next_block()
        kinds = [(c["kind"], c["start_frame"]) for c in calls]
        assert kinds[:2] == [("commit", 0), ("denoise", 1)]     # frame 0 committed, then the student from frame 1
    finally:
        hook.remove()


def test_refined_prefix_is_redrawn_by_the_student(tiny_model):
    """``refine_steps``: the student re-draws each prefix frame through its last N steps. Through all of its steps
    (the first at t = 1000, where the prefix is noised to pure noise) nothing of the prefix is left: two different
    first-frame models give the same clip. Through fewer steps the prefix shows through."""
    from causal_forcing.models.wan import WanDiT
    from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec
    from conftest import fan_in_init

    ctx = _ctx(tiny_model, batch=2)
    models = [fan_in_init(WanDiT(tiny_model.config.replace(abs_pos_freqs=2)), seed=s).eval() for s in (7, 8)]
    config = StreamConfig(block_size=1)
    steps = len(config.schedule.steps)

    def run(model, refine):
        spec = FirstFrameSpec(steps=3, guidance=2.5, solver="euler", frames=2, refine_steps=refine)
        return sample_causal(tiny_model, ctx, latent_hw=HW, num_frames=4, config=config, seed=5,
                             first_frame=FirstFrameSampler(model, spec))
    full = [run(m, steps) for m in models]
    assert torch.allclose(full[0], full[1], atol=1e-5)
    partial = [run(m, 1) for m in models]
    assert (partial[0][:, :2] - partial[1][:, :2]).abs().max() > 1e-3
    assert (partial[0][:, :2] - run(models[0], 0)[:, :2]).abs().max() > 1e-4   # the student did re-draw it
    with pytest.raises(ValueError, match="refine_steps"):
        run(models[0], steps + 1)
    with pytest.raises(ConfigError, match="refine_steps"):
        FirstFrameSpec(refine_steps=-1)
