"""The ShapesWorld recipe: every stage of Causal Forcing (and the Self Forcing baseline) on a CPU.

    data → VAE → latents + MiniLM embeddings → bidirectional teacher → AR teachers (frame-/chunk-wise)
    → ODE data (causal; bidirectional for the baseline) → few-step inits (causal ODE, causal CD, Self Forcing ODE)
    → DMD from each → ShapesBench evaluation of everything
    (+ the first-frame model of the shipped pipelines: the frame-wise AR teacher fine-tuned on frame 0, and the
    prefix model of both: the first-frame model fine-tuned on the first frames, with clause-wise text)

Each step has one output; a step whose output exists is skipped, a training step with checkpoints resumes, so
the recipe can be interrupted at any moment and run again (``causal-forcing recipe shapes --out DIR``).
Stage settings come from ``configs/shapes/*.yaml``; the recipe only wires paths and block sizes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "shapes"
SHIPPED_VAE = Path(__file__).resolve().parents[1] / "assets" / "shapes_vae"
TEXT_LEN = 32
FEW_STEP = [1000.0, 750.0, 500.0, 250.0]
#: The stage config files the plan reads (from configs/shapes or the folder given as ``configs``).
STAGE_FILES = ("bidirectional_short.yaml", "bidirectional.yaml", "ar_diffusion.yaml", "ode_data.yaml",
               "causal_ode.yaml", "causal_cd.yaml", "dmd.yaml", "first_frame.yaml", "prefix.yaml",
               "prefix_tune.yaml", "layout.yaml")
#: The frame-wise inits of the key comparison (causal ODE init vs Self Forcing's bidirectional ODE init).
KEY_INITS = ("causal_ode_framewise", "self_forcing_ode_framewise")
#: The causal inits behind each bundled pipeline folder (and its block size): each init and its DMD student are
#: candidates, and the one with the best in-distribution Total over the evaluation seeds is shipped.
SHIP_CANDIDATES = {"shapes_framewise": (1, ("causal_ode_framewise", "causal_cd_framewise")),
                   "shapes_chunkwise": (3, ("causal_ode_chunkwise", "causal_cd_chunkwise"))}
#: Every causal init that may be shipped: these are evaluated over all the sampling seeds, like the DMD students.
SHIP_INITS = tuple(init for _, inits in SHIP_CANDIDATES.values() for init in inits)
#: Latent frames the shipped pipelines make before their students take over when there is a prefix model: frame 0
#: by the first-frame model, frames 1..PREFIX_FRAMES-1 by the prefix model (frame-wise, the best of 2-5, "Run 10").
PREFIX_FRAMES = 4
#: The first-frame model's own text encoder in the shipped pipelines: the pipeline's MiniLM, so frame 0 is the same,
#: but the model can encode each clause alone for FIRST_FRAME_COMPOSE.
FIRST_FRAME_TEXT = "minilm"
#: Frame 0 of a multi-clause prompt assembled object by object (pipelines/compose.py; docs/results.md, "Run 13"):
#: one sample per clause draws each object, and the first of 3 samples of the whole caption that the drawings fit
#: places them (docs/results.md, "Run 14": 3 layouts assemble ~97 % of two-object frames, one ~80 %).
FIRST_FRAME_COMPOSE = "objects"
FIRST_FRAME_COMPOSE_CANDIDATES = 1
FIRST_FRAME_COMPOSE_LAYOUTS = 3
#: ... and the rest of the prefix made object by object too: each object continued alone with its own clause
#: (docs/results.md, "Run 14").
FIRST_FRAME_COMPOSE_PREFIX = True
#: The prefix model's own text encoder: each clause of a caption encoded alone (models/text.py).
PREFIX_TEXT = "minilm-clauses"
#: CFG scales when there is a prefix model: the first-frame model's, and the prefix model's (docs/results.md, "Run
#: 11": lower than the first-frame model's 4 alone, they keep more objects whole; chosen over 3 seeds).
PREFIX_PIPELINE_GUIDANCE = 3.0
PREFIX_GUIDANCE = 1.5
#: Stage settings a quick recipe (tests of the wiring) adds to the tiny step counts, by stage.
QUICK_STAGE = {"layout": ["stage.clips=400", "stage.val_pairs=20", "stage.pool=64", "stage.candidates=8"]}


@dataclass
class Step:
    name: str
    output: Path                   # the step is done when this exists
    run: Callable[[], None]
    needs: list[str] = field(default_factory=list)   # steps whose outputs this one reads
    after: list[str] = field(default_factory=list)   # steps it waits for when they run too (it reads whatever exists)


class ShapesRecipe:
    def __init__(self, out: str | Path, *, num_clips: int = 6000, workers: int = 2, seeds: int = 3,
                 train_seeds: int = 1, quick: bool = False, configs: str | Path | None = None,
                 graphed_teachers: bool = False):
        self.out = Path(out)
        # The stage settings: configs/shapes (the 2-core CPU budget) unless another preset folder is given, such as
        # configs/shapes_gpu (bigger batches, wall-clock limits for one GPU); it must hold every file the plan reads.
        self.configs = Path(configs) if configs else CONFIGS
        missing = [f for f in STAGE_FILES if not (self.configs / f).is_file()]
        if missing:
            raise InputError(f"config folder {self.configs} has no {missing[0]}")
        self.num_clips = num_clips
        self.workers = workers
        self.seeds = seeds              # sampling seeds of the 4-step DMD students
        self.train_seeds = train_seeds  # DMD runs (train.seed 0, 1, ...) of the two key-comparison students
        self.quick = quick  # tiny step counts, for tests of the wiring
        # The teachers (bidirectional, AR by teacher forcing) with the CUDA-graph trainer instead of the trainer.
        self.graphed_teachers = graphed_teachers
        self.steps = self._build()

    # ---- paths --------------------------------------------------------------------------------------
    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def run_dir(self, name: str) -> Path:
        return self.p("runs", name)

    def final(self, name: str, ema: bool = True) -> Path:
        return self.run_dir(name) / ("final_ema" if ema else "final")

    # ---- step bodies --------------------------------------------------------------------------------
    def _data(self) -> None:
        from ..data.shapes_io import write_training_set
        write_training_set(self.p("data", "train"), num=self.num_clips, seed=0, workers=self.workers)

    def _eval_data(self) -> None:
        from ..data.shapes_io import write_eval_set
        write_eval_set(self.p("data", "eval"), workers=self.workers)

    def _vae(self) -> None:
        if not (SHIPPED_VAE / "config.json").exists():
            raise InputError(f"no shipped ShapesWorld VAE at {SHIPPED_VAE}; train one with "
                             f"`causal-forcing train vae --config configs/shapes/vae.yaml`")
        tmp = self.p(".vae.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(SHIPPED_VAE, tmp)
        tmp.rename(self.p("vae"))

    def _encode(self) -> None:
        from ..data.encode import encode_clips
        from ..models.small_vae import SmallVAE
        from ..models.text import build_text_encoder
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"   # clips go to the VAE's device
        vae = SmallVAE.from_folder(self.p("vae")).to(device)
        text = build_text_encoder("minilm", text_len=TEXT_LEN, device=device)
        encode_clips(self.p("data", "train"), vae, self.p("latents"), vae_name="shapes", text_encoder=text,
                     text_encoder_name=f"minilm-{TEXT_LEN}")

    def _encode_clauses(self) -> None:
        """The prefix model's training data: the first frames of ``latents`` (as many as prefix.yaml trains on)
        with every caption re-encoded clause by clause; no VAE runs, so this takes seconds."""
        from ..data.encode import reencode_text
        from ..models.text import build_text_encoder
        from ..training import load_stage_config
        frames = load_stage_config("ar-diffusion", self.configs / "prefix.yaml", []).data.max_frames
        text = build_text_encoder(PREFIX_TEXT, text_len=TEXT_LEN, cache_size=0)
        reencode_text(self.p("latents"), self.p("latents_clauses"), text, text_encoder_name=f"{PREFIX_TEXT}-{TEXT_LEN}",
                      max_frames=frames)
        (self.p("latents_clauses") / ".complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def _train(self, stage: str, config: str, name: str, overrides: list[str]) -> Callable[[], None]:
        def go() -> None:
            from ..training import run_stage
            over = [f"train.out_dir={self.run_dir(name)}", *overrides]
            if self.quick:
                over += ["train.max_steps=2", "train.save_every=1", "train.log_every=1", "ema.start_step=0",
                         "data.batch_size=2", *QUICK_STAGE.get(stage, [])]
            if self.graphed_teachers and stage in ("bidirectional", "ar-diffusion"):
                self._train_graphed(stage, config, over)
                return
            resume = (self.run_dir(name) / "checkpoints" / "latest").exists()
            run_stage(stage, self.configs / config, over, resume=resume)
        return go

    def _train_graphed(self, stage: str, config: str, overrides: list[str]) -> None:
        """A teacher step with ``training.graphed`` (one step = one CUDA-graph replay), settings from its config."""
        from ..training import load_stage_config
        from ..training.graphed import settings_from_stage_config, train
        s = settings_from_stage_config(stage, load_stage_config(stage, self.configs / config, overrides))
        s.resume = True
        train(s)

    def _ode(self, name: str, teacher: Path, kind: str, block: int) -> Callable[[], None]:
        def go() -> None:
            from ..training import run_stage
            out = self.p("ode", name)
            over = [f"data.path={self.p('latents')}", f"train.out_dir={self.p('ode', '.' + name)}",
                    f"stage.teacher={teacher}", f"stage.kind={kind}", f"stage.block_size={block}",
                    f"stage.out={out}.partial"]
            if self.quick:
                over += ["stage.num_samples=4", "stage.steps=8", "stage.keep=[0,2,4,6,-2,-1]" if kind == "causal"
                         else "stage.keep=[0,2,4,6,-1]"]
            run_stage("ode-data", self.configs / "ode_data.yaml", over, resume=Path(f"{out}.partial").exists())
            Path(f"{out}.partial").rename(out)
        return go

    def _evaluate(self, name: str, model_dir: Path, kind: str, block: int,
                  steps: int | None = None, seeds: int = 1, replica_of: str | None = None,
                  train_seed: int = 0) -> Callable[[], None]:
        """ShapesBench on the 200-prompt set over `seeds` seeds (the causal few-step models only; a many-step
        teacher once), with one of the released 1/2/4-step lists when `steps` is given."""
        def go() -> None:
            from ..eval.models import EvalSettings, evaluate, load_model_folder
            from ..models.small_vae import SmallVAE
            from ..models.text import build_text_encoder
            from ..pipelines.loading import RELEASED_STEPS
            model = load_model_folder(model_dir)
            vae = SmallVAE.from_folder(self.p("vae"))
            text = build_text_encoder("minilm", text_len=TEXT_LEN)
            out = self.p("eval", name)
            reports = []
            for seed in range(seeds if kind == "causal" else 1):
                done = out / f"seed{seed}" / "scores.json"
                if done.exists():   # an interrupted evaluation goes on with the seeds it has not done
                    reports.append(json.loads(done.read_text()))
                    continue
                every, first = RELEASED_STEPS[steps or 4]
                settings = EvalSettings(kind=kind, block_size=block, seed=1000 * seed,  # type: ignore[arg-type]
                                        steps=every, first_block_steps=first, teacher_steps=4 if self.quick else 20)
                rep = evaluate(model, vae, text, self.p("data", "eval", "manifest.jsonl"), settings,
                               out_dir=out / f"seed{seed}", limit=4 if self.quick else None, progress=True)
                reports.append(rep)
            tmp = out / "summary.json.tmp"
            tmp.write_text(json.dumps({"model": name, "kind": kind, "block_size": block,
                                       "steps": (steps or 4) if kind == "causal" else None,
                                       "replica_of": replica_of, "train_seed": train_seed,
                                       "seeds": [{k: r[k] for k in ("in_distribution", "held_out", "all")}
                                                 for r in reports]}, indent=1))
            tmp.rename(out / "summary.json")
        return go

    # ---- the plan -----------------------------------------------------------------------------------
    def _build(self) -> list[Step]:
        lat = f"data.path={self.p('latents')}"
        S: list[Step] = [
            Step("data", self.p("data", "train", "manifest.jsonl"), self._data),
            Step("eval-data", self.p("data", "eval", "manifest.jsonl"), self._eval_data),
            Step("vae", self.p("vae", "config.json"), self._vae),
            Step("encode", self.p("latents", ".complete"), self._encode_complete, ["data", "vae"]),
            # The teacher from scratch on the first 9 latent frames (cheap), then continued on whole clips.
            Step("bidirectional-short", self.final("bidirectional_short"),
                 self._train("bidirectional", "bidirectional_short.yaml", "bidirectional_short", [lat]), ["encode"]),
            Step("bidirectional", self.final("bidirectional"),
                 self._train("bidirectional", "bidirectional.yaml", "bidirectional",
                             [lat, f"train.init={self.final('bidirectional_short')}"]), ["bidirectional-short"]),
        ]
        evaluation = ["eval-data", "vae"]  # what every evaluation reads besides its model
        bidir = self.final("bidirectional")
        for mode, block in (("framewise", 1), ("chunkwise", 3)):
            S.append(Step(f"ar-{mode}", self.final(f"ar_{mode}"),
                          self._train("ar-diffusion", "ar_diffusion.yaml", f"ar_{mode}",
                                      [lat, f"train.init={bidir}", f"stage.block_size={block}"]), ["bidirectional"]))
            S.append(Step(f"ode-causal-{mode}", self.p("ode", f"causal_{mode}"),
                          self._ode(f"causal_{mode}", self.final(f"ar_{mode}"), "causal", block), [f"ar-{mode}"]))
        # The first-frame model of the shipped pipelines (pipelines/first_frame.py): the frame-wise AR teacher
        # fine-tuned on latent frame 0 alone, with the absolute position embedding.
        S.append(Step("first-frame", self.final("first_frame"),
                      self._train("ar-diffusion", "first_frame.yaml", "first_frame",
                                  [lat, f"train.init={self.final('ar_framewise')}"]), ["ar-framewise"]))
        # The prefix model of the shipped pipelines: the first-frame model fine-tuned on the first latent
        # frames, each caption's clauses encoded alone; it makes frames 1..PREFIX_FRAMES-1 after frame 0.
        # (encode-clauses waits for first-frame, which needs it no sooner, so the teachers before stay gates that get
        # every core)
        S.append(Step("encode-clauses", self.p("latents_clauses", ".complete"), self._encode_clauses, ["encode"],
                      after=["first-frame"]))
        S.append(Step("prefix", self.final("prefix"),
                      self._train("ar-diffusion", "prefix.yaml", "prefix",
                                  [f"data.path={self.p('latents_clauses')}",
                                   f"train.init={self.final('first_frame')}"]), ["first-frame", "encode-clauses"]))
        S.append(Step("prefix-tune", self.final("prefix_tune"),
                      self._train("ar-diffusion", "prefix_tune.yaml", "prefix_tune",
                                  [f"data.path={self.p('latents_clauses')}", f"train.init={self.final('prefix')}"]),
                      ["prefix", "encode-clauses"]))
        # The layout model of the shipped pipelines: where the objects of an assembled frame 0 start, learned from
        # the scene annotations of training clips (docs/results.md, "Run 16"); it reads no other step's output, and
        # waits for the teachers only so that they keep both cores (it runs beside the AR steps).
        S.append(Step("layout", self.final("layout", ema=False),
                      self._train("layout", "layout.yaml", "layout", []), after=["bidirectional"]))
        S.append(Step("ode-bidirectional", self.p("ode", "bidirectional"),
                      self._ode("bidirectional", bidir, "bidirectional", 1), ["bidirectional"]))
        # init name → (stage, config, block size, overrides, the steps it reads)
        inits = {
            "causal_ode_framewise": ("causal-ode", "causal_ode.yaml", 1,
                                     [f"data.path={self.p('ode', 'causal_framewise')}", "stage.mode=causal",
                                      f"train.init={self.final('ar_framewise')}"],
                                     ["ode-causal-framewise", "ar-framewise"]),
            "causal_ode_chunkwise": ("causal-ode", "causal_ode.yaml", 3,
                                     [f"data.path={self.p('ode', 'causal_chunkwise')}", "stage.mode=causal",
                                      f"train.init={self.final('ar_chunkwise')}"],
                                     ["ode-causal-chunkwise", "ar-chunkwise"]),
            "self_forcing_ode_framewise": ("causal-ode", "causal_ode.yaml", 1,
                                           [f"data.path={self.p('ode', 'bidirectional')}", "stage.mode=self-forcing",
                                            f"train.init={bidir}"], ["ode-bidirectional", "bidirectional"]),
            "causal_cd_framewise": ("causal-cd", "causal_cd.yaml", 1, [lat, f"train.init={self.final('ar_framewise')}"],
                                    ["encode", "ar-framewise"]),
            "causal_cd_chunkwise": ("causal-cd", "causal_cd.yaml", 3, [lat, f"train.init={self.final('ar_chunkwise')}"],
                                    ["encode", "ar-chunkwise"]),
        }

        def dmd(init: str, block: int, seed: int = 0) -> Callable[[], None]:
            """Asymmetric DMD from `init` (real score: the bidirectional teacher); seed > 0 is a replica run."""
            run = f"dmd_{init}" + (f"_train{seed}" if seed else "")
            over = [lat, f"train.init={self.final(init)}", f"stage.real_score={bidir}", f"stage.block_size={block}"]
            return self._train("dmd", "dmd.yaml", run, over + ([f"train.seed={seed}"] if seed else []))

        for name, (stage, cfg, block, over, needs) in inits.items():
            S.append(Step(name, self.final(name), self._train(stage, cfg, name, over + [f"stage.block_size={block}"]),
                          needs))
            S.append(Step(f"dmd_{name}", self.final(f"dmd_{name}"), dmd(name, block), [name, "bidirectional"]))
        S.append(Step("eval-bidirectional", self.p("eval", "bidirectional", "summary.json"),
                      self._evaluate("bidirectional", bidir, "bidirectional", 1), ["bidirectional", *evaluation]))
        for mode, block in (("framewise", 1), ("chunkwise", 3)):
            S.append(Step(f"eval-ar-{mode}", self.p("eval", f"ar_{mode}", "summary.json"),
                          self._evaluate(f"ar_{mode}", self.final(f"ar_{mode}"), "autoregressive", block),
                          [f"ar-{mode}", *evaluation]))
        for name, (_, _, block, _, _) in inits.items():
            # The 4-step DMD students (the key comparison) and the causal inits (candidates for shipping too) over
            # `self.seeds` seeds; other inits and fewer steps once.
            init_seeds = self.seeds if name in SHIP_INITS else 1
            for model, seeds in ((name, init_seeds), (f"dmd_{name}", self.seeds)):
                S.append(Step(f"eval-{model}", self.p("eval", model, "summary.json"),
                              self._evaluate(model, self.final(model), "causal", block, seeds=seeds),
                              [model, *evaluation]))
            for steps in (2, 1):  # the DMD students with the released fewer-step lists (trained at 4 steps)
                model = f"dmd_{name}"
                S.append(Step(f"eval-{model}-{steps}step", self.p("eval", f"{model}_{steps}step", "summary.json"),
                              self._evaluate(f"{model}_{steps}step", self.final(model), "causal", block, steps),
                              [model, *evaluation]))
        # The key comparison over training seeds too: the DMD stage of both frame-wise inits run again with
        # train.seed = 1, 2, ... (same init, same settings), each evaluated with sampling seed 0.
        for k in range(1, self.train_seeds):
            for name in KEY_INITS:
                run = f"dmd_{name}_train{k}"
                S.append(Step(f"dmd_{name}-train{k}", self.final(run), dmd(name, 1, k), [name, "bidirectional"]))
                S.append(Step(f"eval-dmd_{name}-train{k}", self.p("eval", run, "summary.json"),
                              self._evaluate(run, self.final(run), "causal", 1, replica_of=f"dmd_{name}",
                                             train_seed=k), [f"dmd_{name}-train{k}", *evaluation]))
        # Shipping and the report use whatever has been trained and evaluated: when other steps run in the same
        # call they wait for them all, but they need none of them.
        before = [s.name for s in S]
        S.append(Step("ship", self.p("pipelines", "shipped.json"), self._ship, after=before))
        S.append(Step("report", self.p("report", "scores.md"), self._report, after=[*before, "ship"]))
        return S

    def _ship(self) -> None:
        """Pipeline folders of the models to bundle, sharing one VAE folder: ``pipelines/shapes_vae``,
        ``pipelines/shapes_framewise`` and ``pipelines/shapes_chunkwise``, each the best-scoring causal model of its
        block size among the causal inits of ``SHIP_CANDIDATES`` and their DMD students (``report.choose_shipped``:
        in-distribution Total, with held-out Total deciding between models within seed noise of the best), with the
        first-frame model (step ``first-frame``) in ``pipelines/shapes_first_frame``, which both pipelines name, the
        prefix model (step ``prefix-tune``) in ``pipelines/shapes_prefix``, which both name for latent frames
        1..PREFIX_FRAMES-1, and the layout model (step ``layout``) in ``pipelines/shapes_layout``, which places the
        objects of an assembled frame 0. Copy the six folders into ``causal_forcing/assets/`` to bundle them;
        ``shipped.json`` records what was chosen and its scores (measured without the first-frame model)."""
        from ..checkpoints import load_dit_weights
        from ..checkpoints import save_model_folder
        from ..models.small_vae import SmallVAE
        from ..pipelines.first_frame import FirstFrameSpec
        from ..pipelines.loading import (
            PipelineSpec,
            TextEncoderSpec,
            VAESpec,
            save_pipeline_folder,
        )
        from .report import choose_shipped, collect

        evaluated = {m.name: m for m in collect(self.out)}
        candidates = {folder: (block, [n for init in inits for n in (init, f"dmd_{init}")])
                      for folder, (block, inits) in SHIP_CANDIDATES.items()}
        chosen: dict[str, tuple[str, int]] = {}
        missing: list[str] = []
        for folder, (block, names) in candidates.items():
            ready = [evaluated[n] for n in names if n in evaluated and self.final(n).exists()]
            if ready:
                chosen[folder] = (choose_shipped(ready).name, block)
            else:
                missing.append(folder)
        if not chosen:
            every = [n for _, names in candidates.values() for n in names]
            raise InputError(f"no evaluated causal model to ship (looked for {', '.join(every)})")
        pipes = self.p("pipelines")
        SmallVAE.from_folder(self.p("vae")).save_folder(pipes / "shapes_vae")
        first_frame = None
        if self.final("first_frame").exists():
            state, config = load_dit_weights(self.final("first_frame"))
            save_model_folder(state, config, pipes / "shapes_first_frame")
            first_frame = FirstFrameSpec(path="../shapes_first_frame", steps=4 if self.quick else 20,
                                         text_encoder=FIRST_FRAME_TEXT, compose=FIRST_FRAME_COMPOSE,
                                         compose_candidates=FIRST_FRAME_COMPOSE_CANDIDATES,
                                         compose_layouts=FIRST_FRAME_COMPOSE_LAYOUTS)
        else:
            missing.append("shapes_first_frame")
        with_prefix = first_frame
        if first_frame is not None and self.final("prefix_tune").exists():
            state, config = load_dit_weights(self.final("prefix_tune"))
            save_model_folder(state, config, pipes / "shapes_prefix")
            with_prefix = dataclasses.replace(first_frame, frames=PREFIX_FRAMES, prefix_path="../shapes_prefix",
                                              prefix_text_encoder=PREFIX_TEXT, guidance=PREFIX_PIPELINE_GUIDANCE,
                                              prefix_guidance=PREFIX_GUIDANCE,
                                              compose_prefix=FIRST_FRAME_COMPOSE_PREFIX)
        else:
            missing.append("shapes_prefix")
        if with_prefix is not None and self.final("layout", ema=False).exists():
            from ..models.layout import load_layout_model, save_layout_model
            save_layout_model(load_layout_model(self.final("layout", ema=False)), pipes / "shapes_layout")
            with_prefix = dataclasses.replace(with_prefix, layout_path="../shapes_layout")
        elif with_prefix is not None:
            missing.append("shapes_layout")
        for folder, (model, block) in chosen.items():
            state, config = load_dit_weights(self.final(model))
            spec = PipelineSpec(block_size=block, steps=tuple(FEW_STEP), latent_hw=(8, 8),
                                text_encoder=TextEncoderSpec(kind="minilm", text_len=TEXT_LEN),
                                vae=VAESpec(kind="small", path="../shapes_vae"), first_frame=with_prefix)
            save_pipeline_folder(pipes / folder, spec, state, config=config)
        record = {name: {"model": model, "block_size": block,
                         "in_distribution_total": evaluated[model].stat("in_distribution", "total")[0],
                         "held_out_total": evaluated[model].stat("held_out", "total")[0]}
                  for name, (model, block) in chosen.items()}
        # The step is done (shipped.json) only when every folder has a model; until then the folders that have one
        # are written and the step runs again (seconds) on the next call.
        name = "shipped.partial.json" if missing else "shipped.json"
        tmp = pipes / f"{name}.tmp"
        tmp.write_text(json.dumps({**record, "not_trained_yet": missing} if missing else record, indent=1) + "\n")
        tmp.rename(pipes / name)
        if missing:
            print(f"ship: no trained and evaluated model yet for {', '.join(missing)}; run the recipe again to finish")
        else:
            (pipes / "shipped.partial.json").unlink(missing_ok=True)

    def _report(self) -> None:
        from .report import write_report
        write_report(self.out, sample_models=["bidirectional", "ar_framewise", "self_forcing_ode_framewise",
                                              "dmd_self_forcing_ode_framewise", "causal_ode_framewise",
                                              "dmd_causal_ode_framewise", "causal_cd_framewise",
                                              "dmd_causal_cd_framewise",
                                              "dmd_causal_ode_chunkwise", "causal_cd_chunkwise"])

    def _encode_complete(self) -> None:
        self._encode()
        (self.p("latents") / ".complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    # ---- running ------------------------------------------------------------------------------------
    def select(self, only: list[str] | None = None, until: str | None = None) -> list[Step]:
        names = [s.name for s in self.steps]
        for n in (only or []) + ([until] if until else []):
            if n not in names:
                raise InputError(f"unknown recipe step {n!r} (steps: {', '.join(names)})")
        steps = self.steps
        if until:
            steps = steps[:names.index(until) + 1]
        if only:
            steps = [s for s in steps if s.name in only]
        return steps

    def run(self, only: list[str] | None = None, until: str | None = None, log: Callable[[str], None] = print,
            jobs: int = 1, launch: Callable[[Step, int], Any] | None = None, poll_s: float = 5.0) -> None:
        """Run the selected steps that are not done. ``jobs`` > 1 runs independent steps side by side, each in its
        own process (``launch``, default `_launch`) with the machine's cores shared out (DMD runs and evaluations
        do not keep two threads busy, so two of them side by side take about half the time); a step that every
        step left needs, such as a teacher, gets all the cores."""
        self.out.mkdir(parents=True, exist_ok=True)
        steps = self.select(only, until)
        chosen = {s.name for s in steps}
        by_name = {s.name: s for s in self.steps}
        for step in steps:
            missing = [n for n in step.needs if n not in chosen and not by_name[n].output.exists()]
            if missing and not step.output.exists():
                raise InputError(f"recipe step {step.name} needs {', '.join(missing)}: not done and not selected")
        if jobs > 1:
            self._run_parallel(steps, by_name, jobs, log, launch or self._launch(jobs), poll_s)
            return
        for step in steps:
            if step.output.exists():
                log(f"[skip] {step.name}: {step.output} exists")
                continue
            log(f"[run ] {step.name}")
            t0 = time.perf_counter()
            step.run()
            log(f"[done] {step.name} in {time.perf_counter() - t0:.0f} s")
            with open(self.out / "recipe_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step.name, "seconds": round(time.perf_counter() - t0, 1),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    def _launch(self, jobs: int) -> Callable[[Step, int], Any]:
        """One step in a child process (`recipe shapes --only STEP`, same settings), output to ``logs/STEP.log``,
        with `slots` of the `jobs` shares of the machine's cores."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args = [sys.executable, "-m", "causal_forcing", "recipe", "shapes", "--out", str(self.out),
                "--num-clips", str(self.num_clips), "--workers", str(self.workers), "--seeds", str(self.seeds),
                "--train-seeds", str(self.train_seeds), "--configs", str(self.configs),
                *(["--quick"] if self.quick else []), *(["--graphed-teachers"] if self.graphed_teachers else [])]

        def launch(step: Step, slots: int = 1) -> subprocess.Popen:
            threads = str(max(1, cores * slots // jobs))
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            logs = self.p("logs")
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / f"{step.name}.log", "ab") as f:
                return subprocess.Popen([*args, "--only", step.name], env=env, stdout=f, stderr=subprocess.STDOUT)
        return launch

    def _gates(self, step: Step, others: list[Step], by_name: dict[str, Step]) -> bool:
        """Whether every step of `others` needs `step`, directly or through other steps (its needs and afters)."""
        memo: dict[str, bool] = {}

        def needs_it(name: str) -> bool:
            if name not in memo:
                memo[name] = False   # no cycles in a plan; this only stops a revisit
                s = by_name[name]
                memo[name] = any(n == step.name or needs_it(n) for n in (*s.needs, *s.after))
            return memo[name]
        return all(needs_it(o.name) for o in others if o.name != step.name)

    def _run_parallel(self, steps: list[Step], by_name: dict[str, Step], jobs: int, log: Callable[[str], None],
                      launch: Callable[[Step, int], Any], poll_s: float) -> None:
        pending = []
        for step in steps:
            if step.output.exists():
                log(f"[skip] {step.name}: {step.output} exists")
            else:
                pending.append(step)
        running: dict[str, tuple[Any, float]] = {}
        failed: list[str] = []
        while pending or running:
            # Start, in plan order, every step whose inputs exist and that waits for no step still to run, while
            # there is room and nothing has failed.
            waiting = {s.name for s in pending} | set(running)
            for step in list(pending):
                if failed or len(running) >= jobs:
                    break
                if all(by_name[n].output.exists() for n in step.needs) and not waiting.intersection(step.after):
                    pending.remove(step)
                    # A step that everything left waits for (the teachers) gets the whole machine, not one share.
                    slots = jobs if not running and self._gates(step, pending, by_name) else 1
                    log(f"[run ] {step.name}" + (" (all cores: every step left needs it)" if slots > 1 else ""))
                    running[step.name] = (launch(step, slots), time.perf_counter())
            if not running:
                if pending and not failed:
                    raise InputError(f"recipe steps {', '.join(s.name for s in pending)} cannot start: "
                                     f"the steps they need finished without their outputs")
                break
            time.sleep(poll_s)
            for name, (handle, t0) in list(running.items()):
                rc = handle.poll()
                if rc is None:
                    continue
                del running[name]
                if rc == 0 and by_name[name].output.exists():
                    log(f"[done] {name} in {time.perf_counter() - t0:.0f} s")
                else:
                    failed.append(name)
                    log(f"[fail] {name} (exit code {rc}; log: {self.p('logs', name + '.log')})")
        if failed:
            raise InputError(f"recipe steps failed: {', '.join(failed)} (logs in {self.p('logs')})")
