"""Run 12 experiment: train the frame-text matcher on mdata tensors."""

import sys
import time
import torch
import torch.nn.functional as F
from causal_forcing.models.matcher import FrameTextMatcher, MatcherConfig, save_matcher

torch.set_num_threads(2)
torch.manual_seed(0)
d = torch.load(sys.argv[1], weights_only=False)
steps = int(sys.argv[2])
out = sys.argv[3]
Z, T = d["latents"].float(), d["text"]
n = Z.shape[0]
nv = 1000
model = FrameTextMatcher(MatcherConfig())
print("params", sum(p.numel() for p in model.parameters()))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps, pct_start=0.05)
B = 96
t0 = time.time()


def val():
    model.eval()
    with torch.no_grad():
        z = Z[:nv]
        s = torch.stack([model(z, T[:nv, k].float()) for k in range(3)], 1)
    model.train()
    return (
        (s[:, 0] > s[:, 1:].max(1).values).float().mean().item(),
        (s[:, 0] > 0).float().mean().item(),
        (s[:, 1:] < 0).float().mean().item(),
    )


for step in range(steps):
    idx = torch.randint(nv, n, (B,))
    z = Z[idx]
    z = z + torch.randn_like(z) * torch.rand(B, 1, 1, 1) * 0.3
    z3 = z.repeat(3, 1, 1, 1)
    txt = torch.cat([T[idx, k] for k in range(3)]).float()
    y = torch.cat([torch.ones(B), torch.zeros(2 * B)])
    logits = model(z3, txt)
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(2.0))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 250 == 0 or step == steps - 1:
        print(
            step,
            f"{loss.item():.3f}",
            "val(rank,pos,neg)",
            [round(v, 3) for v in val()],
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
save_matcher(model, out)
