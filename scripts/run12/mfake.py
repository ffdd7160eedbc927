"""Run 12 experiment: first-frame model samples for the dataset's own captions (the 'generated' negatives)."""

import sys
import time
import torch
from causal_forcing.eval import models as M
from causal_forcing.pipelines.first_frame import FirstFrameSampler, FirstFrameSpec

torch.set_num_threads(2)
d = torch.load("runs/r12/mdata_train.pt", weights_only=False)
n = int(sys.argv[1])
start = 1000
model = M.load_model_folder("causal_forcing/assets/shapes_first_frame").eval()
sampler = FirstFrameSampler(model, FirstFrameSpec(steps=20, guidance=3.0))
out = []
t = time.time()
for i in range(start, start + n, 200):
    ctx = d["text"][i : i + 200, 0].float()
    noise = torch.randn(len(ctx), 1, 16, 8, 8, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        out.append(sampler(ctx, noise)[:, 0].half())
    print(i, time.time() - t, flush=True)
torch.save({"start": start, "latents": torch.cat(out)}, "runs/r12/mfake.pt")
