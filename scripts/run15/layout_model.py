"""Run 15 prototype: a learned layout model for frame 0, i.e. where each object of a caption starts, sampled.

    python scripts/run15/layout_model.py train OUT.pt [--clips 40000] [--steps 3000]
    python scripts/run15/layout_model.py eval --layout OUT.pt ARGS     # ARGS as for `causal-forcing eval model`

`train` reads rendered training-distribution clips (their frame-0 object positions, canonical clauses; held-out
combinations excluded) and fits a small MLP over an 8 x 8 grid of box centres, object after object:
p(cell of object 1 | its clause, the other clause), p(cell of object 2 | its clause, the other clause, cell 1). The
clauses are MiniLM token states mean-pooled. `eval` patches the sampler's layout choice
(`FirstFrameSampler._choose_layout`): for each multi-clause prompt it samples cells (uniform inside the cell),
moves each clause drawing's object there and lets `place_layers` assemble the frame (resampling up to 20 times
when objects would touch, else the sampler's own choice).
"""
import sys
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from causal_forcing.data import shapes
from causal_forcing.models.text import build_text_encoder, split_clauses
from causal_forcing.pipelines import compose
from causal_forcing.pipelines import first_frame as ff

GRID = 8
TEXT = build_text_encoder("minilm", text_len=32, device="cpu", cache_size=0)
_EMB: dict[str, torch.Tensor] = {}


def embed(clauses):
    missing = [c for c in dict.fromkeys(clauses) if c not in _EMB]
    if missing:
        states = TEXT.encode(missing).float()
        used = (states.abs().sum(-1) > 0).float()
        pooled = (states * used[..., None]).sum(1) / used.sum(1, keepdim=True).clamp(min=1)
        _EMB.update(zip(missing, pooled))
    return torch.stack([_EMB[c] for c in clauses])


class LayoutNet(nn.Module):
    def __init__(self, dim=384, hidden=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim + 1 + GRID * GRID, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, GRID * GRID))

    def forward(self, own, other, has_other, previous):
        return self.net(torch.cat([own, other, has_other[:, None], previous], dim=1))


def cell_of(obj):
    side = shapes.side_pixels(obj.attrs.size, 64) / 64
    cx, cy = obj.x0 + side / 2, obj.y0 + side / 2
    return min(GRID - 1, int(cy * GRID)) * GRID + min(GRID - 1, int(cx * GRID))


def train(out, clips=40000, steps=3000):
    torch.manual_seed(0)
    rows = []                                   # (own clause, other clause or None, previous cell or -1, cell)
    seed = 9_000_000
    while len(rows) < clips:
        spec = shapes.sample_clip(seed, 64, 81)
        seed += 1
        if spec.held_out:
            continue
        objs = spec.objects
        clauses = [shapes.canonical_caption([o.attrs]) for o in objs]
        if len(objs) == 1:
            rows.append((clauses[0], None, -1, cell_of(objs[0])))
        else:
            rows.append((clauses[0], clauses[1], -1, cell_of(objs[0])))
            rows.append((clauses[1], clauses[0], cell_of(objs[0]), cell_of(objs[1])))
    own = embed([r[0] for r in rows])
    other = torch.stack([embed([r[1]])[0] if r[1] else torch.zeros(own.shape[1]) for r in rows])
    has = torch.tensor([float(r[1] is not None) for r in rows])
    prev = torch.tensor([r[2] for r in rows])
    target = torch.tensor([r[3] for r in rows])
    n_val = 2000
    model = LayoutNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def onehot(p):
        return F.one_hot(p.clamp(min=0), GRID * GRID).float() * (p >= 0).float()[:, None]

    for step in range(steps):
        idx = torch.randint(n_val, len(rows), (512,))
        loss = F.cross_entropy(model(own[idx], other[idx], has[idx], onehot(prev[idx])), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            with torch.no_grad():
                v = slice(0, n_val)
                val = F.cross_entropy(model(own[v], other[v], has[v], onehot(prev[v])), target[v]).item()
            print(step, round(loss.item(), 3), "val", round(val, 3), flush=True)
    torch.save(model.state_dict(), out)


def patch(path):
    model = LayoutNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    state = {}
    _first_frame, _assemble, _choose = (ff.FirstFrameSampler.first_frame, ff.FirstFrameSampler._assemble,
                                        ff.FirstFrameSampler._choose_layout)

    def first_frame(self, context, noise, prompts=None):
        state["prompts"] = prompts
        return _first_frame(self, context, noise, prompts)

    def assemble(self, first, drawn, plan, extra):
        state["rows"], state["at"] = [row for row, _, _ in plan], 0
        return _assemble(self, first, drawn, plan, extra)

    @torch.no_grad()
    def choose_layout(self, layouts, drawings):
        row = state["rows"][state["at"]]
        state["at"] += 1
        clauses = split_clauses(state["prompts"][row])
        used = [next((d for d in clause if compose.object_box(compose._rgb(d).amax(0) > compose.OBJECT_LEVEL)
                      is not None), None) for clause in drawings]
        if len(clauses) != 2 or any(d is None for d in used):
            return _choose(self, layouts, drawings)
        e = embed(clauses)
        gen = torch.Generator().manual_seed(zlib.crc32(state["prompts"][row].encode()))
        for _ in range(20):
            cells, prev = [], torch.zeros(1, GRID * GRID)
            for k in range(2):
                logits = model(e[k:k + 1], e[1 - k:2 - k], torch.ones(1), prev)
                cell = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
                cells.append(cell)
                prev = F.one_hot(torch.tensor([cell]), GRID * GRID).float()
            synthetic = torch.full_like(used[0], -1.0)
            for drawing, cell in zip(used, cells):
                box = compose.object_box(compose._rgb(drawing).amax(0) > compose.OBJECT_LEVEL)
                u = torch.rand(2, generator=gen).tolist()
                cy, cx = ((cell // GRID + u[0]) * 64 / GRID, (cell % GRID + u[1]) * 64 / GRID)
                dy = max(-box[0], min(63 - box[1], round(cy - (box[0] + box[1] + 1) / 2)))
                dx = max(-box[2], min(63 - box[3], round(cx - (box[2] + box[3] + 1) / 2)))
                synthetic = torch.maximum(synthetic, torch.roll(drawing.float(), shifts=(dy, dx), dims=(-2, -1)))
            placement = compose.place_layers(synthetic, drawings)
            if placement is not None:
                state["learned"] = state.get("learned", 0) + 1
                return placement
        return _choose(self, layouts, drawings)

    ff.FirstFrameSampler.first_frame = first_frame
    ff.FirstFrameSampler._assemble = assemble
    ff.FirstFrameSampler._choose_layout = choose_layout
    return state


if __name__ == "__main__":
    if sys.argv[1] == "train":
        extra = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        train(sys.argv[2], int(extra.get("--clips", 40000)), int(extra.get("--steps", 3000)))
    else:
        from causal_forcing.cli import main
        args = sys.argv[2:]
        i = args.index("--layout")
        state = patch(args[i + 1])
        del args[i:i + 2]
        try:
            main(["eval", "model", *args])
        finally:
            print({"placed_by_the_layout_model": state.get("learned", 0)}, file=sys.stderr)
