"""Training stages of Causal Forcing / Causal Forcing++ and the shared trainer.

Each stage is one module with a ``Config`` dataclass (the YAML ``stage:`` section) and a ``Stage`` class run
by ``trainer.Trainer`` (or, for data-generation stages, a ``run(cfg)`` function).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError

STAGES: dict[str, tuple[str, str]] = {
    "bidirectional": ("bidirectional", "flow-matching training of a bidirectional base/teacher model"),
    "ar-diffusion": ("ar_diffusion", "stage 1: block-causal AR diffusion by teacher forcing"),
    "ode-data": ("ode_data", "stage 2a data: ODE trajectories of the AR (or bidirectional) teacher"),
    "causal-ode": ("causal_ode", "stage 2a: ODE regression of the few-step causal student"),
    "causal-cd": ("causal_cd", "stage 2b (CF++): causal consistency distillation"),
    "dmd": ("dmd", "stage 3: asymmetric DMD with self-forcing rollout"),
    "vae": ("vae", "train the small ShapesWorld VAE"),
    "matcher": ("matcher", "train the text-frame matcher that picks the best of N frame-0 candidates"),
    "layout": ("layout", "train the layout model that places the objects of an assembled frame 0"),
}


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ConfigError(f"unknown training stage {name!r} (known: {', '.join(STAGES)})")
    return importlib.import_module(f"{__name__}.{STAGES[name][0]}")


def load_stage_config(name: str, path: str | Path | None = None, overrides: list[str] | None = None):
    from .config import load_config
    return load_config(stage_module(name).Config, path, overrides)


def run_stage(name: str, path: str | Path | None = None, overrides: list[str] | None = None, *,
              resume: bool = False) -> Path:
    """Validate the config, then run the stage; returns its output folder."""
    mod = stage_module(name)
    cfg = load_stage_config(name, path, overrides)
    if hasattr(mod, "run"):
        return mod.run(cfg, resume=resume)
    from .trainer import Trainer
    return Trainer(cfg, mod.Stage(), resume=resume).run()
