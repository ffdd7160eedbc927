"""Stream a video 10x the training length with a rolling KV cache and an attention sink; time and memory per block.

Streams ``--latent-frames`` (default 210 = 10 x 21) frame-wise through ``InteractiveStream`` with a window of
``--window-frames`` (default 21, the trained length) whose first ``--sink-frames`` stay, decoding every block, and
records per block: sampling and decode time, the process's resident memory (VmRSS) and the KV cache's size.
Prints a summary and every 10th block, writes ``OUT.json`` and a plot ``OUT.png`` (matplotlib).

The model is a random shapes-size pipeline (64x64 frames, latent 8x8, a 4-layer dim-256 DiT, Wan VAE with
base_dim 8, MiniLM text) unless ``--model`` names a pipeline folder. Example:

    python benchmarks/bench_long_video.py --threads 2 --out outputs/long_video
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from causal_forcing.config import ModelConfig
from causal_forcing.models.vae import pixel_frames_for
from causal_forcing.models.wan import WanDiT
from causal_forcing.pipelines.interactive import InteractiveStream
from causal_forcing.pipelines.loading import PipelineSpec, TextEncoderSpec, load_pipeline, save_pipeline_folder

PROMPT = "a red circle moves to the right on a white background"
SHAPES_DIT = ModelConfig(dim=256, ffn_dim=1024, text_dim=384, text_len=32, num_heads=4, num_layers=4)
SHAPES_SPEC = PipelineSpec(block_size=1, steps=(1000, 750, 500, 250), latent_hw=(8, 8),
                           text_encoder=TextEncoderSpec("minilm", 32), num_frames=81, fps=16)


def write_random_pipeline(folder: Path, config: ModelConfig = SHAPES_DIT, spec: PipelineSpec = SHAPES_SPEC,
                          seed: int = 0) -> Path:
    """A pipeline folder with random weights: a DiT of ``config`` and a Wan VAE with base_dim 8."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    dit = WanDiT(config)
    dit.init_weights()
    with torch.no_grad():  # Wan's init zeroes the head; give it weights so frames are not constant
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    return save_pipeline_folder(folder, spec, dit.eval(), vae=AutoencoderKLWan(base_dim=8).eval())


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace, folder: Path) -> dict:
    pipeline = load_pipeline(folder)
    pipeline.generate(PROMPT, num_frames=5)  # warm-up (first-call allocations, text encoder)
    pipeline.text_encoder.clear()
    records = []
    began = time.perf_counter()
    with InteractiveStream(pipeline, PROMPT, seed=args.seed, window_frames=args.window_frames,
                           sink_frames=args.sink_frames) as stream:
        cache = stream.latents.cache
        while stream.latents.frame < args.latent_frames:
            frames = stream.next_block()
            block = stream.timing.recent[-1]
            records.append({"block": block.index, "latent_frame": stream.latents.frame - 1,
                            "pixel_frames": len(frames), "denoise_ms": 1e3 * block.denoise_s,
                            "decode_ms": 1e3 * block.decode_s, "latency_ms": 1e3 * block.latency_s,
                            "rss_mib": rss_mib(), "kv_cache_mib": cache.memory_bytes() / 2**20,
                            "cached_frames": cache.local_end // cache.tokens_per_frame})
            if block.index % 10 == 0:
                r = records[-1]
                print(f"block {r['block']:>4}  {r['latency_ms']:7.1f} ms  rss {r['rss_mib']:7.1f} MiB  "
                      f"kv cache {r['kv_cache_mib']:.2f} MiB ({r['cached_frames']} frames)")
        total = time.perf_counter() - began
        setup = stream.timing.setup_s
    window = args.window_frames
    early, late = records[1:window], records[-window:]

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    steady = records[window - 1:]  # from the block that filled the window on
    rss_slope = statistics.linear_regression([r["latent_frame"] for r in steady], [r["rss_mib"] for r in steady]).slope
    height, width = pipeline.frame_size
    return {
        "command": "python benchmarks/bench_long_video.py " + " ".join(args.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": pipeline.description, "frame_size": [width, height],
        "latent_frames": len(records), "pixel_frames": pixel_frames_for(len(records)),
        "window_frames": window, "sink_frames": args.sink_frames, "train_length_frames": args.train_frames,
        "setup_s": setup, "total_s": total, "fps": pixel_frames_for(len(records)) / total,
        "summary": {
            "median_latency_ms_first_window": median(early, "latency_ms"),
            "median_latency_ms_last_window": median(late, "latency_ms"),
            "rss_mib_when_window_full": records[window - 1]["rss_mib"],
            "rss_mib_at_end": records[-1]["rss_mib"],
            "rss_mib_range_after_window_full": [min(r["rss_mib"] for r in steady), max(r["rss_mib"] for r in steady)],
            "rss_trend_mib_per_100_frames_after_window_full": 100 * rss_slope,
            "kv_cache_mib": records[-1]["kv_cache_mib"],
            "kv_cache_sizes_seen": sorted({r["kv_cache_mib"] for r in records}),
        },
        "blocks": records,
    }


def plot(result: dict, path: Path) -> None:
    """Two panels against the latent frame: time per block (sampling, decode) and the process's RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["blocks"][1:]  # block 0 decodes the first frame only
    xs = [r["latent_frame"] for r in rows]
    figure, (times, memory) = plt.subplots(2, 1, figsize=(9, 5.6), sharex=True, constrained_layout=True)
    times.plot(xs, [r["denoise_ms"] for r in rows], label="sampling (4 steps + commit)", lw=1)
    times.plot(xs, [r["decode_ms"] for r in rows], label="VAE decode", lw=1)
    times.set_ylabel("ms per block")
    times.legend(loc="upper right")
    memory.plot(xs, [r["rss_mib"] for r in rows], color="tab:green", lw=1, label="process RSS")
    memory.set_ylabel("MiB")
    memory.set_xlabel("latent frame")
    memory.legend(loc="upper right", title=f"KV cache: {result['summary']['kv_cache_mib']:.2f} MiB, constant")
    for axis in (times, memory):
        axis.axvline(result["window_frames"] - 1, color="grey", ls="--", lw=0.8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{result['latent_frames']} latent frames ({result['pixel_frames']} pixel frames) = "
                    f"{result['latent_frames'] / result['train_length_frames']:.0f}x the training length; window "
                    f"{result['window_frames']}, sink {result['sink_frames']} (dashed: window full)", fontsize=10)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a pipeline folder (default: a random shapes-size one)")
    parser.add_argument("--latent-frames", type=int, default=210, help="latent frames to stream (default 210)")
    parser.add_argument("--train-frames", type=int, default=21, help="the training length in latent frames")
    parser.add_argument("--window-frames", type=int, default=21, help="rolling KV cache, latent frames")
    parser.add_argument("--sink-frames", type=int, default=1, help="attention-sink frames kept in the window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", default="outputs/long_video", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.latent_frames <= args.window_frames:
        parser.error("--latent-frames must exceed --window-frames (the point is a stream longer than the window)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else write_random_pipeline(Path(tmp) / "shapes-random")
        result = run(args, folder)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    s = result["summary"]
    print(f"{result['latent_frames']} latent frames in {result['total_s']:.1f} s ({result['fps']:.1f} fps); "
          f"median latency {s['median_latency_ms_first_window']:.1f} ms (first window) vs "
          f"{s['median_latency_ms_last_window']:.1f} ms (last window); RSS {s['rss_mib_when_window_full']:.1f} MiB "
          f"when the window filled, {s['rss_mib_at_end']:.1f} MiB at the end (range "
          f"{s['rss_mib_range_after_window_full'][0]:.1f}-{s['rss_mib_range_after_window_full'][1]:.1f}, trend "
          f"{s['rss_trend_mib_per_100_frames_after_window_full']:+.1f} MiB per 100 frames); "
          f"KV cache {s['kv_cache_mib']:.2f} MiB throughout")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
