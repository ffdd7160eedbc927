"""Run 15 prototype: the student sampled on another timestep list (the CD student is a consistency function of
the teacher's grid, so any list on it is valid). `STEPS=1000,750,500,250,100 python scripts/run15/steps.py ARGS`,
ARGS as for `causal-forcing eval model`; the schedule is patched for this process only."""
import os
import sys

from causal_forcing.cli import main
from causal_forcing.eval import models
from causal_forcing.schedulers.flow import FewStepSchedule

STEPS = [float(s) for s in os.environ["STEPS"].split(",")]


class Patched:
    @staticmethod
    def from_config(steps, first_block_steps=None):
        return FewStepSchedule.from_config(STEPS, first_block_steps)


models.FewStepSchedule = Patched
sys.exit(main(["eval", "model", *sys.argv[1:]]))
