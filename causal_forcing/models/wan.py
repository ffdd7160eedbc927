"""The Wan2.1 diffusion transformer, bidirectional and block-causal in one module.

Parameter names are exactly those of the original Wan release (``patch_embedding``, ``blocks.N.self_attn.q``,
``head.modulation`` ...), so official and released weights load 1:1. The attention layout is an *input* of
``forward`` (see ``attention.py``): bidirectional, block-causal with any block size, the teacher-forcing
[clean; noisy] layout of stage-1 training, or streaming with a caller-owned ``KVCache``.

Tensor layouts: latents are [B, F, C, H, W] (frames first), timesteps are [B] or per frame [B, F],
text embeddings [B, L ≤ text_len, text_dim] (shorter prompts are zero-padded to text_len, as in Wan).
The network predicts the flow v = ε − x0.

Two optional additions that Wan does not have (both off by default, both zero-initialised): ``ModelConfig.abs_pos_freqs
> 0`` adds an absolute 2-D position embedding (``pos_embedding``) to the patch tokens, see
:func:`grid_position_features`; ``ModelConfig.abs_time_frames > 0`` adds an embedding of the latent frame index
(``frame_embedding``, clamped to its last entry) to each frame's time embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import AttentionPlan, Backend, Bidirectional, BlockCausal, Layout, TeacherForcing, attention, build_plan
from .kv_cache import CacheWrite, KVCache
from .rope import RotaryTable, apply_rope


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [N, dim] of timesteps [N], cos first, computed in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def grid_position_features(grid: tuple[int, int], freqs: int, device: torch.device | None = None) -> Tensor:
    """Canvas-relative sin/cos features of every token of a ``grid`` = (rows, columns): [rows·cols, 4·freqs].

    A token's centre is at u = (i + ½) / rows, v = (j + ½) / cols in (0, 1); the features are sin(πku), cos(πku),
    sin(πkv), cos(πkv) for k = 1..freqs, so they depend only on where the token sits on the canvas and the same
    embedding serves every resolution.
    """
    gh, gw = grid
    k = torch.arange(1, freqs + 1, device=device, dtype=torch.float64) * math.pi
    u = (torch.arange(gh, device=device, dtype=torch.float64) + 0.5) / gh
    v = (torch.arange(gw, device=device, dtype=torch.float64) + 0.5) / gw
    fu = torch.cat([torch.sin(u[:, None] * k), torch.cos(u[:, None] * k)], dim=1)        # [gh, 2·freqs]
    fv = torch.cat([torch.sin(v[:, None] * k), torch.cos(v[:, None] * k)], dim=1)        # [gw, 2·freqs]
    feats = torch.cat([fu[:, None].expand(gh, gw, -1), fv[None].expand(gh, gw, -1)], dim=2)
    return feats.reshape(gh * gw, 4 * freqs).float()


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, with a learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (optionally affine), cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class _Projections(nn.Module):
    """q, k, v, o projections with Wan's RMS-normed queries and keys (shared by both attention kinds)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def forward(self, x: Tensor, rope: RotaryTable, ctx: "_ForwardContext", layer: int) -> Tensor:
        B, L, _ = x.shape
        shape = (B, L, self.num_heads, self.head_dim)
        q = apply_rope(self.norm_q(self.q(x)).view(shape), rope)
        k = apply_rope(self.norm_k(self.k(x)).view(shape), rope)
        v = self.v(x).view(shape)
        if ctx.cache is not None:
            k, v = ctx.cache.write_and_read(layer, ctx.cache_write, k, v)
            out = attention(q, k, v, None, ctx.backend)
        else:
            out = attention(q, k, v, ctx.plan, ctx.backend)
        return self.o(out.flatten(2))


class CrossAttention(_Projections):
    """Text cross-attention: q/k RMS-normed, no RoPE, no mask (padding tokens are attended, as in Wan)."""

    def text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        B, Lc, _ = context.shape
        shape = (B, Lc, self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, x: Tensor, context: Tensor, ctx: "_ForwardContext", layer: int) -> Tensor:
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim)
        # With gradients on, text K/V are recomputed so the text path gets its gradient.
        text = ctx.cache.text if ctx.cache is not None and not torch.is_grad_enabled() else None
        if text is not None and text.layers[layer] is not None:
            k, v = text.layers[layer]
        else:
            k, v = self.text_kv(context)
            if text is not None:
                text.layers[layer] = (k.detach(), v.detach())
        return self.o(attention(q, k, v, None, ctx.backend).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope: RotaryTable, ctx: "_ForwardContext",
                layer: int) -> Tensor:
        """x [B, L, D]; e0 [B, F', 6, D] with one modulation per frame (L = F'·tokens_per_frame)."""
        B, L, D = x.shape
        nf = e0.shape[1]
        m = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)  # each [B, F', 1, D]

        def per_frame(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
            return (h.unflatten(1, (nf, L // nf)) * (1 + scale) + shift).flatten(1, 2)

        def gated(h: Tensor, gate: Tensor) -> Tensor:
            return (h.unflatten(1, (nf, L // nf)) * gate).flatten(1, 2)

        y = self.self_attn(per_frame(self.norm1(x), m[1], m[0]), rope, ctx, layer)
        x = x + gated(y, m[2])
        x = x + self.cross_attn(self.norm3(x), context, ctx, layer)
        y = self.ffn(per_frame(self.norm2(x), m[4], m[3]))
        return x + gated(y, m[5])


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        out = math.prod(cfg.patch_size) * cfg.out_dim
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, D]; e [B, F', D] time embedding per frame."""
        B, L, D = x.shape
        nf = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # [B, F', 1, D]
        h = (self.norm(x).unflatten(1, (nf, L // nf)) * (1 + scale) + shift).flatten(1, 2)
        return self.head(h)


class _ForwardContext:
    """What every layer of one forward call needs to know about attention."""

    __slots__ = ("plan", "cache", "cache_write", "backend")

    def __init__(self, plan: AttentionPlan | None, cache: KVCache | None, cache_write: CacheWrite | None,
                 backend: Backend):
        self.plan, self.cache, self.cache_write, self.backend = plan, cache, cache_write, backend


class WanDiT(nn.Module):
    """The Wan2.1 DiT. ``forward(x, t, context, layout=..., cache=..., start_frame=..., clean_x=...)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # Optional absolute position embedding (not in Wan); zero-initialised, so adding it to trained weights
        # leaves the function unchanged until it is trained.
        self.pos_embedding = nn.Linear(4 * cfg.abs_pos_freqs, cfg.dim) if cfg.abs_pos_freqs else None
        self.frame_embedding = nn.Embedding(cfg.abs_time_frames, cfg.dim) if cfg.abs_time_frames else None
        self._zero_added()
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.attn_backend: Backend = "auto"
        self.gradient_checkpointing = False

    # ---- initialisation (training from scratch; loading weights overwrites it) -------------------------
    def init_weights(self) -> None:
        """Wan's initialisation: xavier-uniform linears, zero biases, N(0, .02) embeddings, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)
        self._zero_added()

    def _added_modules(self) -> dict[str, nn.Module]:
        """The modules of this model that are not part of Wan (the optional embeddings), by name."""
        return {name: getattr(self, name) for name in ModelConfig.ADDED.values() if getattr(self, name) is not None}

    def _zero_added(self) -> None:
        for module in self._added_modules().values():
            for p in module.parameters():
                nn.init.zeros_(p)

    def added_state(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state_dict`` completed with zeros for the entries of modules that are not part of Wan
        (``pos_embedding``, ``frame_embedding``) and that the given weights lack; every other key untouched.

        Lets weights trained without those embeddings initialise a model that has them (fine-tuning): zero
        embeddings leave the function unchanged until they are trained.
        """
        own = {f"{name}.{k}": v for name, m in self._added_modules().items() for k, v in m.state_dict().items()}
        return {**{k: torch.zeros_like(v) for k, v in own.items() if k not in state_dict}, **state_dict}

    # ---- helpers ---------------------------------------------------------------------------------------
    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        _, ph, pw = self.config.patch_size
        h, w = latent_hw
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        gh, gw = self.token_grid(latent_hw)
        return gh * gw

    def new_cache(self, *, batch_size: int, latent_hw: tuple[int, int], capacity_frames: int,
                  window_frames: int | None = None, sink_frames: int = 0, sink_rope: str = "absolute",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        """A fresh KV cache for streams of this model (the cache belongs to the caller)."""
        p = next(self.parameters())
        return KVCache.for_model(self.config, batch_size=batch_size, tokens_per_frame=self.tokens_per_frame(latent_hw),
                                 capacity_frames=capacity_frames, window_frames=window_frames,
                                 sink_frames=sink_frames, sink_rope=sink_rope,  # type: ignore[arg-type]
                                 dtype=dtype or p.dtype, device=device or p.device)

    def embed_text(self, context: Tensor) -> Tensor:
        B, L, C = context.shape
        cfg = self.config
        if C != cfg.text_dim:
            raise ValueError(f"text embeddings have {C} channels, the model expects text_dim={cfg.text_dim}")
        if L > cfg.text_len:
            raise ValueError(f"text embeddings have {L} tokens, more than text_len={cfg.text_len}")
        if L < cfg.text_len:
            context = torch.cat([context, context.new_zeros(B, cfg.text_len - L, C)], dim=1)
        return self.text_embedding(context)

    def _patchify(self, x: Tensor) -> Tensor:
        """[B, F, C, H, W] → tokens [B, F·H'·W', D] (plus the absolute position embedding, if configured)."""
        p = self.patch_embedding(x.transpose(1, 2))                     # [B, D, F', H', W']
        if self.pos_embedding is not None:
            gh, gw = p.shape[-2:]
            feats = grid_position_features((gh, gw), self.config.abs_pos_freqs, p.device).to(p.dtype)
            pos = self.pos_embedding(feats)                             # [H'·W', D]
            p = p + pos.t().reshape(1, -1, 1, gh, gw)
        return p.flatten(2).transpose(1, 2)

    def _unpatchify(self, tokens: Tensor, num_frames: int, grid: tuple[int, int]) -> Tensor:
        """Head outputs [B, L, pt·ph·pw·C] → [B, F, C, H, W]."""
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        gh, gw = grid
        B = tokens.shape[0]
        u = tokens.view(B, num_frames // pt, gh, gw, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bfpchqwr", u)
        return u.reshape(B, num_frames, c, gh * ph, gw * pw)

    def _time(self, t: Tensor, dtype: torch.dtype, first_frame: int = 0) -> tuple[Tensor, Tensor]:
        """t [B, F] → e [B, F, D], e0 [B, F, 6, D]; ``first_frame`` is the (token) frame index of t[:, 0]."""
        B, nf = t.shape
        e = self.time_embedding(timestep_embedding(t.reshape(-1), self.config.freq_dim).to(dtype)).view(B, nf, -1)
        if self.frame_embedding is not None:
            index = torch.arange(first_frame, first_frame + nf, device=t.device)
            e = e + self.frame_embedding(index.clamp(max=self.config.abs_time_frames - 1)).to(dtype)
        e0 = self.time_projection(e).unflatten(2, (6, self.config.dim))
        return e, e0

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, layout: Layout | None = None,
                cache: KVCache | None = None, start_frame: int = 0, clean_x: Tensor | None = None,
                clean_t: Tensor | None = None) -> Tensor:
        """Predict the flow for latents x [B, F, C, H, W] at timesteps t ([B] or [B, F]).

        * ``layout`` – ``Bidirectional()`` (default), ``BlockCausal(n)`` or ``TeacherForcing(n)``.
          ``TeacherForcing`` needs ``clean_x`` (same shape as x; its tokens get ``clean_t``, default 0) and
          returns the prediction for the noisy x only.
        * ``cache`` – a ``KVCache``: x is the next block (or the last block again) of a stream starting at
          latent frame ``start_frame``; its K/V are written to the cache and it attends to everything cached.
        """
        B, nf, C, H, W = x.shape
        pt = self.config.patch_size[0]
        if nf % pt:
            raise ValueError(f"{nf} frames are not divisible by the temporal patch size {pt}")
        grid = self.token_grid((H, W))
        S = grid[0] * grid[1]
        nf_tok = nf // pt
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            t = t[:, None].expand(B, nf)
        if t.shape != (B, nf):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{B}, {nf}], got {list(t.shape)}")
        t = t[:, ::pt]  # one modulation per token frame
        dtype = self.patch_embedding.weight.dtype

        tokens = self._patchify(x.to(dtype))
        e, e0 = self._time(t, dtype, start_frame // pt)
        head_e = e
        rope = RotaryTable.for_grid(self.config.head_dim, nf_tok, *grid, start_frame // pt, x.device)
        plan, write = None, None
        if isinstance(layout, TeacherForcing):
            if cache is not None:
                raise ValueError("the teacher-forcing layout cannot be combined with a KV cache")
            if clean_x is None or clean_x.shape != x.shape:
                raise ValueError("teacher forcing needs clean_x with the same shape as x")
            ct = torch.zeros_like(t) if clean_t is None else torch.as_tensor(clean_t, device=x.device)
            if ct.dim() == 1:
                ct = ct[:, None].expand(B, nf)
            ct = ct[:, ::pt] if ct.shape[1] == nf else ct
            ce, ce0 = self._time(ct, dtype, start_frame // pt)   # the clean copy sits at the same frames
            tokens = torch.cat([self._patchify(clean_x.to(dtype)), tokens], dim=1)
            e0 = torch.cat([ce0, e0], dim=1)
            rope = RotaryTable.concat([rope, rope])
            plan = build_plan(layout, nf_tok, S)
        elif cache is not None:
            if layout is not None and not isinstance(layout, BlockCausal):
                raise ValueError("a KV cache implies block-causal attention; pass layout=None or BlockCausal")
            if cache.tokens_per_frame != S or cache.batch_size != B:
                raise ValueError(f"KV cache was built for batch {cache.batch_size} and {cache.tokens_per_frame} "
                                 f"tokens/frame, got batch {B} and {S}")
            write = cache.plan((start_frame // pt) * S, nf_tok * S)
        else:
            plan = build_plan(layout or Bidirectional(), nf_tok, S)

        ctx = _ForwardContext(plan, cache, write, self.attn_backend)
        text = self.embed_text(context.to(dtype))
        for i, block in enumerate(self.blocks):
            # Not with a cache: recomputation would replay cache writes (and the one-block forwards of a
            # rollout are small anyway).
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                tokens = checkpoint(block, tokens, e0, text, rope, ctx, i, use_reentrant=False)
            else:
                tokens = block(tokens, e0, text, rope, ctx, i)
        if write is not None:
            cache.commit(write)
        if isinstance(layout, TeacherForcing):
            tokens = tokens[:, nf_tok * S:]
        out = self.head(tokens, head_e)
        return self._unpatchify(out, nf, grid)
