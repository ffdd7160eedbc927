"""An optional first-frame model: latent frame 0 from a separate many-step sampler, the rest from the student.

A frame-wise student makes frame 0 from pure noise, with no history: that frame is a text-to-image problem, and
it decides where each object starts. On ShapesWorld the start position also decides the direction of motion
(docs/results.md, "Run 8"), and a Wan DiT, whose only positional input is relative (RoPE), places objects by
chance. A pipeline may therefore name a second DiT, trained on frame 0 alone (with the absolute position
embedding ``ModelConfig.abs_pos_freqs``), that draws frame 0 with its own many-step, classifier-free-guided
sampler; the few-step student then continues from it exactly as from an I2V image (the frame is committed to
its KV cache at t = 0). Frame 0 is one latent frame, so the extra model calls are cheap next to the clip.

The same model may make a short prefix instead (``frames`` > 1: frames 0..frames-1, autoregressively, each with
the full guided solve). A student continues the motion it is shown far better than it picks a motion for each
object from the caption (docs/results.md, "Run 9"), so a first-frame model trained on the first few frames can
hand over a clip whose objects already move the caption's way. A stream hands each prefix frame on as soon as it
is made (:meth:`FirstFrameSampler.iter_frames`), so the prefix does not delay the first frame, and commits the
prefix to the student's cache block by block, at the student's block size, as the student's own frames would be.

In ``pipeline.json``::

    "first_frame": {"path": "first_frame", "steps": 20, "guidance": 4.0, "shift": 5.0, "solver": "unipc",
                    "frames": 1, "text_encoder": null}

``path`` is a model folder (``config.json`` + ``model.safetensors``) relative to the pipeline folder; a prefix
model (``prefix_path``) samples with the same settings, except its CFG scale where ``prefix_guidance`` is given. The
negative prompt of the guidance is the all-zero context, the unconditional input the model was trained with
(``data.text_encoder: dataset`` drops captions to zeros). ``text_encoder`` null means the model reads the
pipeline's own text embeddings; a MiniLM kind (``minilm`` or ``minilm-clauses``, models/text.py) gives it its
own encoding of the prompt instead, e.g. each clause of a two-object caption encoded alone so that every motion
word carries only its own object (docs/results.md, "Run 10"). Callers that know the prompts bind them with
:meth:`FirstFrameSampler.for_prompts`.

Frame 0 may also be the best of ``candidates`` samples (``matcher_path``: a text–frame matcher folder,
models/matcher.py, that scores each candidate against the first-frame model's text embeddings); the candidates'
noise is the stream's, rearranged (:func:`candidate_noise`), so a seed still gives one video. On ShapesWorld it did
not pay (docs/results.md, "Run 12"), and the bundled pipelines do not use it.

Frame 0 of a prompt with several clauses may instead be assembled object by object (``"compose": "objects"``,
:mod:`.compose`): a sample for the whole prompt gives where each object is (the first of ``compose_layouts``
samples that the drawings fit), a sample of each clause alone (``compose_candidates`` tries) draws it; all of them
from the stream's noise rearranged, and solved in one batch. This needs the first-frame model's own text encoder
(``text_encoder``, to encode each clause) and the pipeline's VAE (the assembly is done on pixels). It assumes
ShapesWorld-like scenes (bright objects of distinct colours on a dark background) and keeps the sampled frame
wherever it cannot assemble one; the bundled ShapesWorld pipelines use it (docs/results.md, "Runs 13 and 14").
With ``compose_prefix`` the rest of the prefix of an assembled frame 0 is made object by object as well: each
object alone, continued with its own clause, the clips painted together (:meth:`FirstFrameSampler._compose_prefix`).
With ``layout_path`` a learned layout model (models/layout.py) says where the assembled objects start instead of
the whole prompt's sample (:meth:`FirstFrameSampler._learned_layout`; the sample is the fallback, and its
background is kept); the bundled pipelines use it (docs/results.md, "Run 16").
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.layout import LayoutModel, pool_tokens
from ..models.matcher import FrameTextMatcher
from ..models.text import split_clauses
from ..models.wan import WanDiT
from .compose import Placement, paint, place_at, place_layers
from .teacher import autoregressive_blocks

SOLVERS = ("unipc", "euler")
#: Text encoder kinds a first-frame model may have of its own (small models this project trains).
TEXT_ENCODERS = ("minilm", "minilm-clauses")
#: Most frame-0 candidates: each is the stream's noise with its channels rolled and its grid flipped
#: (:func:`candidate_noise`), distinct for up to lcm(channels, 4) candidates, which is 16 for 16 channels.
MAX_CANDIDATES = 16
#: Ways to assemble frame 0 (None: as sampled). "objects": :mod:`.compose`, the whole caption's sample placing the
#: objects, each clause's own sample drawing its object.
COMPOSE_MODES = (None, "objects")


def _noise_seed(noise: Tensor) -> int:
    """A seed that is a function of a row's noise: the same seed gives the same layout draws, another seed
    another layout."""
    return zlib.crc32(noise.detach().flatten()[:256].float().cpu().numpy().tobytes())


def candidate_noise(noise: Tensor, k: int) -> Tensor:
    """Candidate ``k``'s starting noise, made from the stream's ``noise`` [B, n, C, H, W] without drawing more:
    channels rolled by k, the grid flipped left-right when k is odd and upside down when bit 1 of k is set.
    Each candidate is exactly as Gaussian as ``noise``; candidate 0 is ``noise`` itself, so one candidate is
    the plain sampler, and a seeded stream stays reproducible."""
    x = noise.roll(k, dims=2) if k % noise.shape[2] else noise
    dims = [d for d, bit in ((-1, 1), (-2, 2)) if k & bit]
    return x.flip(dims) if dims else x


@dataclass(frozen=True)
class FirstFrameSpec:
    """The ``first_frame`` entry of ``pipeline.json``: where the model is and how to sample it."""

    path: str = "first_frame"
    steps: int = 20
    guidance: float = 4.0
    shift: float = 5.0
    solver: str = "unipc"
    frames: int = 1          # latent frames made before the student takes over (a prefix of the clip)
    text_encoder: str | None = None   # its own text encoder kind (TEXT_ENCODERS); None: the pipeline's embeddings
    prefix_path: str | None = None    # a second model that makes frames 1..frames-1 after the first-frame model's
    prefix_text_encoder: str | None = None   # the prefix model's own text encoder kind; None: the pipeline's
    refine_steps: int = 0    # the student re-draws the prefix through its last N steps (0: the prefix as made)
    prefix_guidance: float | None = None   # the prefix model's CFG scale; None: ``guidance``
    candidates: int = 1      # frame-0 candidates per prompt; > 1: best-of-N, chosen by the matcher
    matcher_path: str | None = None   # a text–frame matcher folder (models/matcher.py) that scores candidates
    compose: str | None = None   # "objects": frame 0 of a multi-clause prompt assembled object by object
    compose_candidates: int = 4  # samples per clause for "objects" (the first with an object is used)
    compose_layouts: int = 1     # samples of the whole prompt tried as the layout (the first that assembles)
    compose_prefix: bool = False  # frames 1..frames-1 of an assembled frame 0 continued object by object too
    layout_path: str | None = None   # a layout model folder (models/layout.py): where assembled objects start
    layout_candidates: int = 1024    # proposals the layout model chooses among (sampling-importance resampling)
    layout_sharpness: float = 4.0    # exp(sharpness * score) weights; 1 samples the learned distribution
    layout_tries: int = 20           # layouts drawn until the drawings fit without touching (else the frame's)

    @property
    def prefix_cfg(self) -> float:
        """The CFG scale the prefix model samples with: ``prefix_guidance``, else ``guidance``."""
        return self.guidance if self.prefix_guidance is None else self.prefix_guidance

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("first_frame.path must name a model folder")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ConfigError(f"first_frame.frames must be a positive integer, got {self.frames!r}")
        if self.steps < 1:
            raise ConfigError(f"first_frame.steps must be positive, got {self.steps}")
        if not self.guidance >= 1.0:
            raise ConfigError(f"first_frame.guidance must be >= 1 (1 = no guidance), got {self.guidance}")
        if self.prefix_guidance is not None:
            if self.prefix_path is None:
                raise ConfigError("first_frame.prefix_guidance needs first_frame.prefix_path")
            if not self.prefix_guidance >= 1.0:
                raise ConfigError(f"first_frame.prefix_guidance must be >= 1 (1 = no guidance), "
                                  f"got {self.prefix_guidance}")
        if not self.shift > 0.0:
            raise ConfigError(f"first_frame.shift must be positive, got {self.shift}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"first_frame.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"first_frame.refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        for name in ("text_encoder", "prefix_text_encoder"):
            kind = getattr(self, name)
            if kind is not None and kind not in TEXT_ENCODERS:
                raise ConfigError(f"first_frame.{name} must be one of {', '.join(TEXT_ENCODERS)} or null, "
                                  f"got {kind!r}")
        if self.prefix_path is not None and (not self.prefix_path or self.frames < 2):
            raise ConfigError("first_frame.prefix_path must name a model folder, and needs frames >= 2")
        if self.prefix_text_encoder is not None and self.prefix_path is None:
            raise ConfigError("first_frame.prefix_text_encoder needs first_frame.prefix_path")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) \
                or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(f"first_frame.candidates must be an integer from 1 to {MAX_CANDIDATES}, "
                              f"got {self.candidates!r}")
        if self.matcher_path is not None and not self.matcher_path:
            raise ConfigError("first_frame.matcher_path must name a matcher folder or be null")
        if self.candidates > 1 and self.matcher_path is None:
            raise ConfigError("first_frame.candidates > 1 needs first_frame.matcher_path (what chooses among them)")
        if self.compose not in COMPOSE_MODES:
            raise ConfigError(f"first_frame.compose must be one of {', '.join(m for m in COMPOSE_MODES if m)} or "
                              f"null, got {self.compose!r}")
        if self.compose is not None and self.text_encoder is None:
            raise ConfigError("first_frame.compose needs first_frame.text_encoder (it encodes each clause alone)")
        if isinstance(self.compose_candidates, bool) or not isinstance(self.compose_candidates, int) \
                or not 1 <= self.compose_candidates < MAX_CANDIDATES:
            raise ConfigError(f"first_frame.compose_candidates must be an integer from 1 to {MAX_CANDIDATES - 1}, "
                              f"got {self.compose_candidates!r}")
        if isinstance(self.compose_layouts, bool) or not isinstance(self.compose_layouts, int) \
                or not 1 <= self.compose_layouts < MAX_CANDIDATES:
            raise ConfigError(f"first_frame.compose_layouts must be an integer from 1 to {MAX_CANDIDATES - 1}, "
                              f"got {self.compose_layouts!r}")
        if not isinstance(self.compose_prefix, bool):
            raise ConfigError(f"first_frame.compose_prefix must be true or false, got {self.compose_prefix!r}")
        if self.compose_prefix:
            if self.compose is None or self.frames < 2:
                raise ConfigError("first_frame.compose_prefix needs first_frame.compose and frames >= 2")
            if self.prefix_path is not None and self.prefix_text_encoder is None:
                raise ConfigError("first_frame.compose_prefix needs first_frame.prefix_text_encoder (the prefix "
                                  "model encodes each clause alone)")
        if self.layout_path is not None:
            if not self.layout_path or self.compose is None:
                raise ConfigError("first_frame.layout_path must name a layout model folder, and needs "
                                  "first_frame.compose")
        for name in ("layout_candidates", "layout_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"first_frame.{name} must be a positive integer, got {value!r}")
        if isinstance(self.layout_sharpness, bool) or not isinstance(self.layout_sharpness, (int, float)) \
                or not self.layout_sharpness >= 0.0:
            raise ConfigError(f"first_frame.layout_sharpness must be a number >= 0, got {self.layout_sharpness!r}")
        if self.candidates + self.compose_layouts - 1 >= MAX_CANDIDATES:
            raise ConfigError(f"first_frame.candidates + compose_layouts - 1 must be below {MAX_CANDIDATES} (the "
                              f"distinct candidate noises, one left for the clauses), got "
                              f"{self.candidates + self.compose_layouts - 1}")


class FirstFrameSampler:
    """Callable ``(context [B, L, D], noise [B, n, C, H, W]) -> latent frames 0..n-1 [B, n, C, H, W]`` (float32).

    ``frames`` (from the spec) is how many frames a stream asks it for; they are sampled autoregressively, one
    frame per block, each with the full many-step guided solve: all by the first-frame model, or, with a
    ``prefix_model``, frame 0 by the first-frame model and the rest by the prefix model, continuing from it (frame
    0 committed to its cache as an I2V image). A model with a text encoder of its own samples from its own
    embeddings of the prompts: call the sampler through :meth:`for_prompts`, which binds them."""

    def __init__(self, model: WanDiT, spec: FirstFrameSpec | None = None, text_encoder: Any = None, *,
                 prefix_model: WanDiT | None = None, prefix_text_encoder: Any = None,
                 matcher: FrameTextMatcher | None = None, vae: Any = None, layout_model: LayoutModel | None = None):
        self.model = model
        self.spec = spec or FirstFrameSpec()
        if (layout_model is None) != (self.spec.layout_path is None):
            raise ConfigError("a layout model must be given exactly when the spec names layout_path")
        if layout_model is not None and text_encoder is None:
            raise ConfigError("a layout model reads the clauses through the first-frame model's text encoder")
        self.layout_model = layout_model
        if self.spec.compose is not None and vae is None:
            raise ConfigError(f"first_frame.compose = {self.spec.compose!r} needs the pipeline's VAE")
        self.vae = vae
        if self.spec.candidates > 1 and matcher is None:
            raise ConfigError(f"first_frame.candidates = {self.spec.candidates} needs a matcher to choose among them")
        distinct = math.lcm(model.config.in_dim, 4)
        if self.spec.candidates > distinct:
            raise ConfigError(f"first_frame.candidates = {self.spec.candidates}: a model with {model.config.in_dim} "
                              f"latent channels has {distinct} distinct candidate noises")
        if matcher is not None:
            mc, fc = matcher.config, model.config
            if (mc.in_dim, mc.text_dim, mc.text_len) != (fc.in_dim, fc.text_dim, fc.text_len):
                raise ConfigError(f"the matcher reads latents of {mc.in_dim} channels and text [{mc.text_len}, "
                                  f"{mc.text_dim}], the first-frame model makes {fc.in_dim} channels from text "
                                  f"[{fc.text_len}, {fc.text_dim}]")
        self.matcher = matcher
        for what, given, named in (("a first-frame model", text_encoder, self.spec.text_encoder),
                                   ("a prefix model", prefix_text_encoder, self.spec.prefix_text_encoder)):
            if (given is None) != (named is None):
                raise ConfigError(f"{what} needs its own text encoder exactly when the spec names one "
                                  f"(spec: {named!r})")
        if (prefix_model is None) != (self.spec.prefix_path is None):
            raise ConfigError("a prefix model must be given exactly when the spec names prefix_path")
        self.text_encoder = text_encoder
        self.prefix_model = prefix_model
        self.prefix_text_encoder = prefix_text_encoder

    @property
    def frames(self) -> int:
        return self.spec.frames

    @property
    def refine_steps(self) -> int:
        return self.spec.refine_steps

    def models(self) -> list[WanDiT]:
        """Every DiT it runs (the matcher, a small scorer, stays where it was loaded)."""
        return [self.model] + ([] if self.prefix_model is None else [self.prefix_model])

    def for_prompts(self, prompts: Sequence[str]) -> FirstFrameSampler | _PromptBound:
        """The sampler to hand a stream made for ``prompts``: itself, or, where a model has a text encoder of its
        own, a callable that gives that model its own embeddings of ``prompts`` instead of the stream's."""
        if self.text_encoder is None and self.prefix_text_encoder is None:
            return self
        own = [None if enc is None else enc.encode(list(prompts)).float()
               for enc in (self.text_encoder, self.prefix_text_encoder)]
        return _PromptBound(self, own[0], own[1], list(prompts))

    def __call__(self, context: Tensor, noise: Tensor) -> Tensor:
        return self.sample(context, context, noise)

    def iter_frames(self, context: Tensor, noise: Tensor) -> Iterator[Tensor]:
        """Frames 0..n-1 one at a time, each [B, 1, C, H, W] as soon as it is made (what a stream uses, so that
        frame 0 is shown before the rest of the prefix is computed)."""
        return self.iter_sample(context, context, noise)

    def sample(self, context: Tensor, prefix_context: Tensor, noise: Tensor) -> Tensor:
        """Frames 0..n-1: the first-frame model reads ``context``, the prefix model (if any) ``prefix_context``."""
        return torch.cat(list(self.iter_sample(context, prefix_context, noise)), dim=1)

    @torch.no_grad()
    def iter_sample(self, context: Tensor, prefix_context: Tensor, noise: Tensor,
                    prompts: Sequence[str] | None = None) -> Iterator[Tensor]:
        """:meth:`sample`, one frame [B, 1, C, H, W] at a time (float32). ``prompts`` (one per batch row) are what
        ``compose`` splits into clauses; without them frame 0 is kept as sampled."""
        if noise.dim() != 5 or noise.shape[1] < 1:
            raise ValueError(f"first-frame noise must be [B, n, C, H, W] with n >= 1, got {list(noise.shape)}")
        n = noise.shape[1]
        placements: dict[int, Placement] = {}
        if self.spec.candidates > 1 or (self.spec.compose is not None and prompts is not None):
            first, placements = self.first_frame(context, noise[:, :1],
                                                 prompts if self.spec.compose is not None else None)
            yield first
        else:
            first = None
            for frame in self._solve(self.model, context, noise if self.prefix_model is None else noise[:, :1]):
                first = frame if first is None else first
                yield frame
            if self.prefix_model is None:
                return
        if n == 1:
            return
        if self.spec.compose_prefix and placements:
            assert prompts is not None
            later_frames = self._compose_prefix(first, context if self.prefix_model is None else prefix_context,
                                                noise[:, 1:], prompts, placements)
            for i in range(later_frames.shape[1]):
                yield later_frames[:, i:i + 1]
            return
        if self.prefix_model is None:       # frame 0 chosen or assembled: the first-frame model goes on from it
            later = self._solve(self.model, context, noise[:, 1:], initial=first)
        else:
            later = self._solve(self.prefix_model, prefix_context, noise[:, 1:], initial=first,
                                guidance=self.spec.prefix_cfg)
        next(later)                        # the initial frame comes back first: frame 0, already given
        yield from later

    @torch.no_grad()
    def first_frame(self, context: Tensor, noise: Tensor,
                    prompts: Sequence[str] | None = None) -> tuple[Tensor, dict[int, Placement]]:
        """Frame 0 [B, 1, C, H, W] when it is more than one plain sample, from ``noise`` [B, 1, C, H, W], and where
        the objects of each assembled row were placed (by row; empty without ``prompts``).

        Each prompt gets ``spec.candidates`` samples of the whole prompt (:func:`candidate_noise` 0..k-1; the
        matcher picks one when k > 1). With ``prompts`` (one per row; ``compose`` on), each prompt of several
        clauses also gets ``spec.compose_layouts - 1`` more samples of the whole prompt and
        ``spec.compose_candidates`` samples of every clause alone, from the candidate noises after those, and its
        frame is assembled (:func:`.compose.place_objects`) from the clause samples and the first of the whole
        prompt's samples (the chosen one, then the others) that they fit: decoded, assembled and encoded again by
        the VAE. Rows with one clause, or whose frame cannot be assembled, keep the chosen sample. Every sample is
        solved in one batch, so assembling costs a wider batch, not a second solve."""
        k, batch = self.spec.candidates, noise.shape[0]
        starts = [candidate_noise(noise, i) for i in range(k)]                    # candidate-major
        contexts = [context.repeat(k, 1, 1)]
        plan: list[tuple[int, int, int]] = []                                      # (row, clauses, samples each)
        layout_rows: dict[int, tuple[Tensor, int]] = {}       # row -> (pooled clauses, seed) for the layout model
        extra = self.spec.compose_layouts - 1
        if prompts is not None:
            if len(prompts) != batch:
                raise ValueError(f"{len(prompts)} prompts for a batch of {batch}")
            if self.vae is None or self.text_encoder is None:
                raise ConfigError("composing frame 0 needs the pipeline's VAE and the first-frame model's text "
                                  "encoder")
            distinct = math.lcm(noise.shape[2], 4)
            split = [(row, split_clauses(prompt)) for row, prompt in enumerate(prompts)]
            split = [(row, clauses, min(self.spec.compose_candidates, (distinct - k - extra) // len(clauses)))
                     for row, clauses in split if len(clauses) > 1]
            split = [(row, clauses, each) for row, clauses, each in split if each >= 1]
            if split:
                encoded = self.text_encoder.encode([c for _, clauses, _ in split for c in clauses])
                encoded = encoded.float().to(context.device)
                at = 0
                for row, clauses, each in split:              # per row: its other layouts, then its clauses
                    n = len(clauses)
                    starts += [candidate_noise(noise[row:row + 1], k + i) for i in range(extra)]
                    starts += [candidate_noise(noise[row:row + 1], k + extra + j * each + i)
                               for j in range(n) for i in range(each)]
                    contexts += [context[row:row + 1].expand(extra, -1, -1),
                                 encoded[at:at + n].repeat_interleave(each, dim=0)]
                    plan.append((row, n, each))
                    if self.layout_model is not None:
                        layout_rows[row] = (pool_tokens(encoded[at:at + n]), _noise_seed(noise[row]))
                    at += n
        frames = next(self._solve(self.model, torch.cat(contexts), torch.cat(starts)))
        first = frames[:k * batch]
        if k > 1:
            if self.matcher is None:
                raise ConfigError("best-of-N frame 0 needs a matcher")
            device = next(self.matcher.parameters()).device
            scores = self.matcher(first[:, 0].to(device), contexts[0].to(device)).float().view(k, batch)
            best = scores.argmax(dim=0).to(first.device)
            first = first.view(k, batch, *first.shape[1:])[best, torch.arange(batch, device=first.device)]
        else:
            first = first.clone()
        placements = self._assemble(first, frames[k * batch:], plan, extra, layout_rows) if plan else {}
        return first, placements

    def _assemble(self, first: Tensor, drawn: Tensor, plan: list[tuple[int, int, int]], extra: int,
                  layout_rows: dict[int, tuple[Tensor, int]] | None = None) -> dict[int, Placement]:
        """Replace, in place, the rows of ``first`` named by ``plan`` with their assembled frames, and return where
        the objects of each assembled row were placed. ``drawn`` holds, row by row in plan order, the row's
        ``extra`` other layouts, then its clause samples (clause by clause, sample by sample). The layouts and each
        clause's first sample are decoded in one call; a clause's later samples only when the ones before them have
        no object (place_layers uses the first that has one). ``layout_rows`` (with a layout model): each row's
        pooled clause embeddings and the seed of its layout draws."""
        layouts: list[int] = []
        heads: list[int] = []
        at = 0
        for _, clauses, each in plan:
            layouts += range(at, at + extra)
            heads += [at + extra + j * each for j in range(clauses)]
            at += extra + clauses * each
        rows = [row for row, _, _ in plan]
        decoded = self._decode(torch.cat([first[rows], drawn[layouts], drawn[heads]]))
        chosen, others = decoded[:len(rows)], decoded[len(rows):len(rows) + len(layouts)]
        head_pixels = iter(decoded[len(rows) + len(layouts):])
        made: dict[int, Placement] = {}
        at = 0
        for n, (row, clauses, each) in enumerate(plan):
            drawings = [_Drawings(self._decode, next(head_pixels),
                                  drawn[at + extra + j * each + 1:at + extra + (j + 1) * each])
                        for j in range(clauses)]
            at += extra + clauses * each
            layouts = [chosen[n], *others[n * extra:(n + 1) * extra]]
            placement = None
            if layout_rows:
                placement = self._learned_layout(layouts[0], drawings, *layout_rows[row])
            if placement is None:
                placement = self._choose_layout(layouts, drawings)
            if placement is not None:
                made[row] = placement
        if made:
            encoded = self._encode(torch.stack([paint(p.background, p.layers) for p in made.values()]))
            for row, latent in zip(made, encoded):
                first[row] = latent.to(first)
        return made

    def _learned_layout(self, frame: Tensor, drawings: Sequence[Iterable[Tensor]], texts: Tensor,
                        seed: int) -> Placement | None:
        """The drawings placed where the layout model puts the clauses' objects, on ``frame``'s background: the
        first of ``spec.layout_tries`` draws (from ``seed``) where no two objects touch; None if none fits."""
        assert self.layout_model is not None
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.spec.layout_tries):
            centres = self.layout_model.sample(texts, self.spec.layout_candidates, self.spec.layout_sharpness,
                                               generator)
            placement = place_at(frame, drawings, centres.tolist())
            if placement is not None:
                return placement
        return None

    def _choose_layout(self, layouts: Sequence[Tensor], drawings: Sequence[Iterable[Tensor]]) -> Placement | None:
        """The placement on the first of ``layouts`` (decoded frames [3, H, W]) that ``drawings`` fit."""
        for layout in layouts:
            placement = place_layers(layout, drawings)
            if placement is not None:
                return placement
        return None

    def _compose_prefix(self, first: Tensor, context: Tensor, noise: Tensor, prompts: Sequence[str],
                        placements: dict[int, Placement]) -> Tensor:
        """Latent frames 1..n [B, n, C, h, w] after frame 0 ``first`` [B, 1, C, h, w], from ``noise`` [B, n, C, h, w].

        Rows in ``placements`` (frame 0 assembled) are continued object by object: each clause's object alone on
        the background (its layer) is encoded, and the prefix model (else the first-frame model) continues it
        reading only that clause, from :func:`candidate_noise` ``j`` of the row's noise for clause ``j``; the
        per-object clips are decoded, painted over the background (:func:`.compose.paint`) and encoded again.
        Other rows continue from ``first`` as usual (``context``: the continuing model's embeddings). All of it is
        one batched solve."""
        model, encoder = ((self.prefix_model, self.prefix_text_encoder) if self.prefix_model is not None
                          else (self.model, self.text_encoder))
        guidance = self.spec.prefix_cfg if self.prefix_model is not None else self.spec.guidance
        rows = sorted(placements)
        plain = [row for row in range(first.shape[0]) if row not in placements]
        alone = [paint(placements[row].background, [layer]) for row in rows for layer in placements[row].layers]
        clauses = [clause for row in rows for clause in split_clauses(prompts[row])]
        if len(clauses) != len(alone):
            raise ValueError("a placement has a layer for every clause of its prompt")
        starts = [noise[plain]] + [candidate_noise(noise[row:row + 1], j)
                                   for row in rows for j in range(len(placements[row].layers))]
        initial = torch.cat([first[plain], self._encode(torch.stack(alone)).to(first)])
        contexts = torch.cat([context[plain].to(first.device),
                              encoder.encode(clauses).float().to(first.device)])
        solved = torch.cat(list(self._solve(model, contexts, torch.cat(starts), initial=initial,
                                            guidance=guidance)), dim=1)          # [rows, 1 + n, C, h, w]
        out = torch.empty_like(noise)
        out[plain] = solved[:len(plain), 1:]
        clips = self.vae.decode(solved[len(plain):].to(self.vae.device, self.vae.dtype)).float().cpu()
        composites, at = [], 0
        for row in rows:
            k = len(placements[row].layers)
            composites.append(paint(placements[row].background, list(clips[at:at + k])))
            at += k
        encoded = self.vae.encode(torch.stack(composites).to(self.vae.device, self.vae.dtype)).float()
        out[rows] = encoded[:, 1:].to(out)
        return out

    def _decode(self, latents: Tensor) -> Tensor:
        """Latent frames 0 [N, 1, C, h, w] -> pixel frames [N, 3, H, W] in [-1, 1] (float32, on the CPU)."""
        return self.vae.decode(latents.to(self.vae.device, self.vae.dtype))[:, 0].float().cpu()

    def _encode(self, frames: Tensor) -> Tensor:
        """Pixel frames [N, 3, H, W] in [-1, 1] -> latent frames 0 [N, 1, C, h, w] (float32)."""
        return self.vae.encode(frames[:, None].to(self.vae.device, self.vae.dtype)).float()

    def _solve(self, model: WanDiT, context: Tensor, noise: Tensor, initial: Tensor | None = None,
               guidance: float | None = None) -> Iterator[Tensor]:
        s = self.spec
        guidance = s.guidance if guidance is None else guidance
        device = next(model.parameters()).device
        context = context.to(device)
        negative = torch.zeros_like(context) if guidance != 1.0 else None
        n_in = 0 if initial is None else initial.shape[1]
        return autoregressive_blocks(model, context, negative, num_frames=n_in + noise.shape[1],
                                     latent_hw=tuple(noise.shape[-2:]), steps=s.steps, shift=s.shift,
                                     guidance=guidance, solver=s.solver, noise=noise,  # type: ignore[arg-type]
                                     initial_latent=initial, batch_cfg=True)


class _Drawings:
    """A clause's samples as drawings ([3, H, W] each): the first given decoded, each later one decoded the first
    time an iteration reaches it, and kept for the next."""

    def __init__(self, decode: Any, head: Tensor, rest: Tensor):
        self.decode, self.done, self.rest = decode, [head], rest

    def __iter__(self) -> Iterator[Tensor]:
        i = 0
        while i < len(self.done) or i - 1 < len(self.rest):
            if i == len(self.done):
                self.done.append(self.decode(self.rest[i - 1][None])[0])
            yield self.done[i]
            i += 1


class _PromptBound:
    """A :class:`FirstFrameSampler` bound to its models' own embeddings of a stream's prompts."""

    def __init__(self, sampler: FirstFrameSampler, context: Tensor | None, prefix_context: Tensor | None,
                 prompts: list[str] | None = None):
        self.sampler = sampler
        self.context = context
        self.prefix_context = prefix_context
        self.prompts = prompts

    @property
    def frames(self) -> int:
        return self.sampler.frames

    @property
    def refine_steps(self) -> int:
        return self.sampler.refine_steps

    def __call__(self, context: Tensor, noise: Tensor) -> Tensor:
        return torch.cat(list(self.iter_frames(context, noise)), dim=1)

    def iter_frames(self, context: Tensor, noise: Tensor) -> Iterator[Tensor]:
        for own in (self.context, self.prefix_context):
            if own is not None and own.shape[0] != context.shape[0]:
                raise ValueError(f"the stream has batch {context.shape[0]}, the bound prompts {own.shape[0]}")
        return self.sampler.iter_sample(context if self.context is None else self.context,
                                        context if self.prefix_context is None else self.prefix_context, noise,
                                        prompts=self.prompts)
