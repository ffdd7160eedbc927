"""Run 15 prototype: the student with a local attention window (rolling KV cache) during evaluation.
`WINDOW=8 SINK=4 python scripts/run15/window.py ARGS`, ARGS as for `causal-forcing eval model`; the stream config
is patched for this process only."""
import os
import sys

from causal_forcing.cli import main
from causal_forcing.eval import models
from causal_forcing.pipelines.streaming import StreamConfig

WINDOW, SINK = int(os.environ["WINDOW"]), int(os.environ.get("SINK", "0"))


def patched(**kw):
    return StreamConfig(window_frames=WINDOW, sink_frames=SINK, **kw)


models.StreamConfig = patched
sys.exit(main(["eval", "model", *sys.argv[1:]]))
