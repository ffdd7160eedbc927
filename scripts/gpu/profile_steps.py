"""Where a training step's time goes on one device: model step (synthetic batch) per attention layout and
backend, and the latent batch loader alone. Prints one line per case (ms per step, median of timed steps).

    python scripts/gpu/profile_steps.py [--steps N] [--preset shapes]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from causal_forcing.config import model_preset
from causal_forcing.data.latents import BatchStream, LatentDataset, write_dataset
from causal_forcing.models.wan import BlockCausal, Bidirectional, TeacherForcing, WanDiT


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_it(fn, dev, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--scale", type=int, default=1, help="divide the batch sizes (CPU smoke runs)")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_preset(a.preset)
    model = WanDiT(cfg).to(dev)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(f"device {dev} {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''} torch {torch.__version__}")

    def case(name: str, B: int, F: int, layout, backend: str, no_grad: bool = False) -> None:
        B = max(1, B // a.scale)
        model.attn_backend = backend
        x = torch.randn(B, F, cfg.in_dim, 8, 8, device=dev)
        ctx = torch.randn(B, cfg.text_len, cfg.text_dim, device=dev)
        t = torch.rand(B, F, device=dev) * 1000
        kw = {"layout": layout}
        if isinstance(layout, TeacherForcing):
            kw.update(clean_x=torch.randn_like(x))

        def step() -> None:
            if no_grad:
                with torch.no_grad():
                    model(x, t, ctx, **kw)
                return
            loss = model(x, t, ctx, **kw).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            ms = time_it(step, dev, a.steps)
            print(f"{name:<44} B={B:<4} F={F:<3} backend={backend:<5} {ms:8.1f} ms/step")
        except Exception as e:  # noqa: BLE001
            print(f"{name:<44} B={B:<4} F={F:<3} backend={backend:<5} FAILED {type(e).__name__}: {e}"[:300])

    case("bidirectional train step", 128, 9, Bidirectional(), "auto")
    case("bidirectional train step", 8, 9, Bidirectional(), "auto")
    case("bidirectional train step", 64, 21, Bidirectional(), "auto")
    for backend in ("auto", "sdpa"):
        case("teacher forcing (frame-wise) train step", 64, 21, TeacherForcing(1), backend)
        case("teacher forcing (frame-wise) train step", 8, 21, TeacherForcing(1), backend)
        case("block-causal (frame-wise) forward only", 64, 21, BlockCausal(1), backend, no_grad=True)
    # the loader alone: random latents in the dataset format, batches of 128 first 9 frames
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        n = 1024 // a.scale
        write_dataset(d, ((torch.randn(21, 16, 8, 8, generator=g).half(), {"id": str(i), "caption": "c"},
                           torch.randn(cfg.text_len, cfg.text_dim, generator=g).half()) for i in range(n)),
                      shard_size=64)
        for B in (8, 128):
            stream = BatchStream(LatentDataset(d, max_frames=9), max(1, B // a.scale), seed=0)
            ms = time_it(stream.next, torch.device("cpu"), a.steps)
            print(f"{'latent batch loader (9 frames)':<44} B={max(1, B // a.scale):<4}              {ms:8.1f} ms/batch")


if __name__ == "__main__":
    main()
