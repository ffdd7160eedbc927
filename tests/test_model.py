"""Equivalence and property tests of the DiT, its attention layouts and the KV cache."""
import pytest
import torch
import torch.nn.functional as F

from causal_forcing.config import ModelConfig
from causal_forcing.models.attention import (Bidirectional, BlockCausal, TeacherForcing, attention,
                                             build_plan)
from causal_forcing.models.wan import WanDiT

from conftest import fan_in_init

B, C, H, W = 2, 16, 8, 8


def _inputs(model, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, frames, C, H, W, generator=g)
    ctx = torch.randn(B, model.config.text_len, model.config.text_dim, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    return x, t, ctx


def _blockwise_t(t, block):
    """Make timesteps constant within each block (as the samplers do)."""
    return t[:, ::block].repeat_interleave(block, dim=1)[:, :t.shape[1]]


@torch.no_grad()
@pytest.mark.parametrize("frames,block", [(6, 1), (6, 3), (5, 2)])
def test_kv_cache_equals_block_causal_mask(tiny_model, frames, block):
    """Truth: one block-causal forward over the whole clip (no cache) == block-by-block with the cache."""
    x, t, ctx = _inputs(tiny_model, frames)
    t = _blockwise_t(t, block)
    full = tiny_model(x, t, ctx, layout=BlockCausal(block))
    cache = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=frames)
    outs = [tiny_model(x[:, f0:f0 + block], t[:, f0:f0 + block], ctx, cache=cache, start_frame=f0)
            for f0 in range(0, frames, block)]
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_kv_cache_overwrite_semantics(tiny_model):
    """Later calls for the same block overwrite its slots: denoise steps then a clean commit leave the cache
    exactly as if only the clean commit had been made."""
    x, t, ctx = _inputs(tiny_model, 4)
    a = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=4)
    b = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=4)
    zeros = torch.zeros(B, 1)
    for f in range(3):
        for step_t in (999.0, 800.0, 300.0):
            tiny_model(torch.randn(B, 1, C, H, W), torch.full((B, 1), step_t), ctx, cache=a, start_frame=f)
        tiny_model(x[:, f:f + 1], zeros, ctx, cache=a, start_frame=f)
        tiny_model(x[:, f:f + 1], zeros, ctx, cache=b, start_frame=f)
    assert a.global_end == b.global_end == 3 * a.tokens_per_frame
    out_a = tiny_model(x[:, 3:4], t[:, 3:4], ctx, cache=a, start_frame=3)
    out_b = tiny_model(x[:, 3:4], t[:, 3:4], ctx, cache=b, start_frame=3)
    assert torch.equal(out_a, out_b)


@torch.no_grad()
@pytest.mark.parametrize("block", [1, 3])
def test_teacher_forcing_equals_block_causal_on_clean_history(tiny_model, block):
    """Truth: TF output for noisy block b == block-causal forward on [clean frames < b; noisy block b]
    with t = 0 on the clean frames."""
    frames = 6
    x, t, ctx = _inputs(tiny_model, frames)
    clean = torch.randn_like(x)
    t = _blockwise_t(t, block)
    tf = tiny_model(x, t, ctx, layout=TeacherForcing(block), clean_x=clean)
    for f0 in range(0, frames, block):
        seq = torch.cat([clean[:, :f0], x[:, f0:f0 + block]], 1)
        ts = torch.cat([torch.zeros(B, f0), t[:, f0:f0 + block]], 1)
        ref = tiny_model(seq, ts, ctx, layout=BlockCausal(block))[:, f0:]
        assert (tf[:, f0:f0 + block] - ref).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("layout", [BlockCausal(1), BlockCausal(2), TeacherForcing(2)])
def test_causality(tiny_model, layout):
    """Changing frame k never changes outputs of blocks before k's block, and does change k's block."""
    frames, k = 6, 3
    x, t, ctx = _inputs(tiny_model, frames)
    kw = {"clean_x": torch.randn_like(x)} if isinstance(layout, TeacherForcing) else {}
    base = tiny_model(x, t, ctx, layout=layout, **kw)
    x2 = x.clone()
    x2[:, k] += 1.0
    kw2 = dict(kw)
    if kw:  # in TF, perturb the clean history of frame k instead: blocks after k's block must see it
        kw2 = {"clean_x": kw["clean_x"].clone()}
        kw2["clean_x"][:, k] += 1.0
        x2 = x
    out = tiny_model(x2, t, ctx, layout=layout, **kw2)
    n = layout.block_size
    first_affected = (k // n) * n if not kw else (k // n + 1) * n
    assert torch.equal(out[:, :first_affected], base[:, :first_affected])
    assert (out[:, first_affected:] - base[:, first_affected:]).abs().max() > 1e-3


@torch.no_grad()
def test_bidirectional_is_shift_invariant_and_t_broadcast(tiny_model):
    """RoPE is relative: a bidirectional clip's output does not depend on its absolute start frame.
    A [B] timestep equals the same value repeated per frame."""
    x, t, ctx = _inputs(tiny_model, 4)
    a = tiny_model(x, t[:, 0], ctx)
    b = tiny_model(x, t[:, :1].expand(B, 4), ctx, start_frame=7)
    assert (a - b).abs().max() < 1e-5


@torch.no_grad()
def test_short_context_is_zero_padded(tiny_model):
    x, t, ctx = _inputs(tiny_model, 2)
    short = ctx[:, :5]
    padded = torch.cat([short, torch.zeros_like(ctx[:, 5:])], 1)
    assert torch.equal(tiny_model(x, t, short), tiny_model(x, t, padded))
    with pytest.raises(ValueError, match="text_len"):
        tiny_model(x, t, torch.randn(B, 9, 32))


def test_text_cache_reset_switches_prompt(tiny_model):
    """The text K/V are cached per stream: a new prompt is ignored until the text cache is reset, and after the
    reset the output equals a forward that recomputes the text K/V (the grad-enabled path never uses it)."""
    x, t, ctx = _inputs(tiny_model, 2)
    ctx2 = torch.randn_like(ctx)

    def run(second_ctx, reset):
        cache = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=2)
        with torch.no_grad():
            tiny_model(x[:, :1], t[:, :1], ctx, cache=cache, start_frame=0)
        if reset:
            cache.text.reset()
        with torch.set_grad_enabled(reset == "grad"):
            return tiny_model(x[:, 1:], t[:, 1:], second_ctx, cache=cache, start_frame=1).detach()

    stale, same = run(ctx2, False), run(ctx, False)
    assert torch.equal(stale, same)
    fresh, recomputed = run(ctx2, True), run(ctx2, "grad")
    assert (fresh - recomputed).abs().max() < 1e-6
    assert (fresh - stale).abs().max() > 1e-3


def _one_layer_model():
    cfg = ModelConfig(dim=64, ffn_dim=128, text_dim=32, text_len=8, num_heads=2, num_layers=1)
    return fan_in_init(WanDiT(cfg)).eval()


@torch.no_grad()
@pytest.mark.parametrize("block,window,sink,rope", [(1, 3, 0, "absolute"), (1, 4, 1, "absolute"),
                                                    (1, 4, 1, "rolling"), (2, 6, 2, "rolling"),
                                                    (2, 6, 2, "absolute")])
def test_local_window_with_sink_equals_recomputation(block, window, sink, rope):
    """Truth: with one layer, cached K/V depend only on the frame itself, so a rolling-window stream's block
    output equals a fresh cache holding exactly the visible frames (sink + most recent) at the positions the
    window gives them: absolute, or with the sink moved right before the oldest kept frame."""
    model = _one_layer_model()
    frames = 12
    x, t, ctx = _inputs(model, frames)
    t = _blockwise_t(t, block)
    clean = torch.randn_like(x)
    zeros = torch.zeros(B, block)
    cache = model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=0, window_frames=window,
                            sink_frames=sink, sink_rope=rope)
    for f0 in range(0, frames, block):
        out = model(x[:, f0:f0 + block], t[:, f0:f0 + block], ctx, cache=cache, start_frame=f0)
        # Recompute: visible history = sink frames + the most recent (window - sink - block) frames.
        keep = window - sink - block
        recent = list(range(max(sink, f0 - keep), f0))
        sinks = list(range(min(sink, f0)))
        fresh = model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=window)
        evicted = recent and recent[0] > sink
        shift = (recent[0] - sink) if (rope == "rolling" and evicted) else 0
        for f in sinks:
            model(clean[:, f:f + 1], zeros[:, :1], ctx, cache=fresh, start_frame=f + shift)
        for f in recent:
            model(clean[:, f:f + 1], zeros[:, :1], ctx, cache=fresh, start_frame=f)
        ref = model(x[:, f0:f0 + block], t[:, f0:f0 + block], ctx, cache=fresh, start_frame=f0)
        assert (out - ref).abs().max() < 1e-5, f0
        model(clean[:, f0:f0 + block], zeros, ctx, cache=cache, start_frame=f0)  # commit clean
    assert cache.num_frames == frames


def test_cache_rejects_out_of_order_and_overflow(tiny_model):
    x, t, ctx = _inputs(tiny_model, 3)
    cache = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=2)
    with torch.no_grad():
        tiny_model(x[:, :1], t[:, :1], ctx, cache=cache, start_frame=0)
        tiny_model(x[:, 1:2], t[:, 1:2], ctx, cache=cache, start_frame=1)
        with pytest.raises(ValueError, match="full"):
            tiny_model(x[:, 2:3], t[:, 2:3], ctx, cache=cache, start_frame=2)
        with pytest.raises(ValueError, match="append"):
            tiny_model(x[:, :1], t[:, :1], ctx, cache=cache, start_frame=0)


def test_gradients_stay_inside_the_block(tiny_model):
    """Cached K/V are stored detached; the current block's own K/V keep their gradient."""
    x, t, ctx = _inputs(tiny_model, 2)
    cache = tiny_model.new_cache(batch_size=B, latent_hw=(H, W), capacity_frames=2)
    x0 = x[:, :1].clone().requires_grad_(True)
    tiny_model(x0, t[:, :1], ctx, cache=cache, start_frame=0)
    assert not any(k.requires_grad for k in cache.k + cache.v)
    x1 = x[:, 1:].clone().requires_grad_(True)
    out = tiny_model(x1, t[:, 1:], ctx, cache=cache, start_frame=1)
    out.sum().backward()
    assert x0.grad is None and x1.grad is not None and x1.grad.abs().sum() > 0
    assert tiny_model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", [Bidirectional(), BlockCausal(1), BlockCausal(2), TeacherForcing(1),
                                    TeacherForcing(3)])
def test_attention_backends_agree_with_dense_mask(layout):
    """Truth: SDPA with the explicit dense boolean mask. Checked: segmented SDPA and FlexAttention."""
    frames, S = 6, 4
    plan = build_plan(layout, frames, S)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, plan.length, 2, 8, generator=g) for _ in range(3))
    mask = plan.dense_mask()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask).transpose(1, 2)
    assert (attention(q, k, v, plan, "sdpa") - ref).abs().max() < 1e-5
    assert (attention(q, k, v, plan, "masked") - ref).abs().max() < 1e-5
    assert (attention(q, k, v, plan, "auto") - ref).abs().max() < 1e-5   # on a CPU: masked for short sequences
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        pytest.skip("FlexAttention not available")
    assert (attention(q, k, v, plan, "flex") - ref).abs().max() < 1e-5
    # the block mask is built once per plan: an equal plan built again reuses it, and stays correct
    from causal_forcing.models.attention import plan_block_mask
    again = build_plan(layout, frames, S)
    assert plan_block_mask(again, q.device) is plan_block_mask(plan, q.device)
    assert (attention(q, k, v, again, "flex") - ref).abs().max() < 1e-5


@pytest.mark.parametrize("layout", [BlockCausal(1), TeacherForcing(2)])
def test_masked_and_segmented_attention_have_the_same_gradients(layout):
    """The one-call masked backend (what "auto" picks on a CPU for short sequences) and the segmented SDPA
    backend are two computations of the same function: equal outputs and equal input gradients."""
    plan = build_plan(layout, 5, 3)
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, plan.length, 2, 8, generator=g) for _ in range(3)]
    w = torch.randn(2, plan.length, 2, 8, generator=g)
    grads = {}
    for name in ("sdpa", "masked"):
        qkv = [t.clone().requires_grad_(True) for t in base]
        (attention(*qkv, plan, name) * w).sum().backward()
        grads[name] = [t.grad for t in qkv]
    for a, b in zip(grads["sdpa"], grads["masked"]):
        assert (a - b).abs().max() < 1e-5


def test_teacher_forcing_mask_matches_spec():
    """The TF mask written out by hand for 3 frames, block size 1 (spec §1.5)."""
    plan = build_plan(TeacherForcing(1), 3, 1)
    expected = torch.tensor([
        # clean 0 1 2 | noisy 0 1 2
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(plan.dense_mask(), expected)


def test_backend_validation():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, None, "xformers")


@torch.no_grad()
def test_bf16_forward_tracks_fp32(tiny_model):
    """Half-precision weights run on CPU (norms computed in fp32) and stay close to the fp32 output."""
    x, t, ctx = _inputs(tiny_model, 3)
    ref = tiny_model(x, t, ctx, layout=BlockCausal(1))
    half = WanDiT(tiny_model.config)
    half.load_state_dict(tiny_model.state_dict())
    half = half.to(torch.bfloat16).eval()
    out = half(x, t, ctx, layout=BlockCausal(1))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05
