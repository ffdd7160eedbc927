"""Run 12 experiment: fine-tune the matcher with generated frames as extra negatives (discriminator-style)."""

import sys
import time
import torch
import torch.nn.functional as F
from causal_forcing.models.matcher import load_matcher, save_matcher

torch.set_num_threads(2)
torch.manual_seed(0)
d = torch.load("runs/r12/mdata_train.pt", weights_only=False)
fk = torch.load("runs/r12/mfake.pt", weights_only=False)
steps = int(sys.argv[1])
out = sys.argv[2]
init = sys.argv[3]
fake_w = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
Z, T = d["latents"].float(), d["text"]
FZ, fs = fk["latents"].float(), fk["start"]
nf = FZ.shape[0]
nv = 1000
model = load_matcher(init).train()
opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=steps, pct_start=0.05)
B = 64
t0 = time.time()
for step in range(steps):
    idx = torch.randint(nv, Z.shape[0], (B,))
    z = Z[idx]
    z = z + torch.randn_like(z) * torch.rand(B, 1, 1, 1) * 0.3
    fi = torch.randint(0, nf, (B,))
    zf = FZ[fi]
    zs = torch.cat([z, z, z, zf])
    txt = torch.cat([T[idx, 0], T[idx, 1], T[idx, 2], T[fi + fs, 0]]).float()
    y = torch.cat([torch.ones(B), torch.zeros(3 * B)])
    w = torch.cat([2 * torch.ones(B), torch.ones(2 * B), fake_w * torch.ones(B)])
    loss = (F.binary_cross_entropy_with_logits(model(zs, txt), y, reduction="none") * w).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 200 == 0 or step == steps - 1:
        print(step, f"{loss.item():.3f}", f"{time.time() - t0:.0f}s", flush=True)
save_matcher(model.eval(), out)
