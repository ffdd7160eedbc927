"""Load test of `causal-forcing serve`: concurrent sessions over loopback, abrupt disconnects, garbage messages.

Starts the server in a subprocess on a free loopback port (a random tiny pipeline unless ``--model``), runs one
warm-up session per slot at once (worker threads and their memory pools come up), takes the server's resident
memory (VmRSS) as the baseline once they closed, then runs ``--sessions`` client
slots for ``--duration`` seconds. Each slot connects, starts an endless stream and reads frames; every 0.2-1 s it
sends garbage (malformed JSON, unknown types, bad fields, out-of-order messages, oversized text, junk binary) or a
valid prompt switch; after 1-5 s it drops the TCP connection without a close frame (70%) or stops and closes
cleanly, then reconnects (a "busy" answer is retried). The load runs in ``--rounds`` rounds; after each, every
slot has closed and the server's memory is read again once it reports no session.

Checks (exit code 1 if any fails): the server logged no error and sent no ``internal`` error; every garbage
message got an ``error`` reply and no connection broke because of it; every connection that lived 2 s or more
received frames with no gap over ``--max-gap`` seconds; the server's sessions went back to 0 after every round;
its RSS after the last round is within ``--rss-tolerance`` MiB of the baseline and within half that of its RSS
after the first round (no growth with time). Example:

    python benchmarks/load_test_server.py --sessions 4 --duration 60 --json outputs/load_test.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_long_video import write_random_pipeline  # noqa: E402

from causal_forcing.config import ModelConfig  # noqa: E402
from causal_forcing.pipelines.loading import PipelineSpec, TextEncoderSpec  # noqa: E402

TINY_DIT = ModelConfig(dim=64, ffn_dim=128, text_dim=384, text_len=16, num_heads=2, num_layers=2)
TINY_SPEC = PipelineSpec(block_size=1, steps=(1000, 750, 500, 250), latent_hw=(4, 6),
                         text_encoder=TextEncoderSpec("minilm", 16), num_frames=9, fps=8)
PROMPTS = ["a red circle moves right", "a blue square falls down", "two green triangles spin", "a yellow star"]
GARBAGE: list[str | bytes] = [
    "{not json", "[1, 2]", '"just a string"', '{"kind": "start"}', '{"type": "launch"}', '{"type": 7}',
    '{"type": "prompt"}', '{"type": "prompt", "prompt": ""}', '{"type": "start", "prompt": "x"}',
    '{"type": "start", "prompt": "x", "frames": 10}', '{"type": "prompt", "prompt": "x", "recache": "yes"}',
    '{"type": "start", "prompt": "x", "image": true}', '{"type": "stop", "now": 1}', "x" * 20_000,
    b"\x00\x01 junk bytes, not an image", b"\x89PNG\r\n\x1a\n" + bytes(64),
]
# The loader registers the `serve` command even before `causal_forcing.cli` lists it.
SERVER_CODE = ("import sys\nfrom causal_forcing import cli\nname = 'causal_forcing.cli.serve'\n"
               "cli.COMMAND_MODULES += () if name in cli.COMMAND_MODULES else (name,)\n"
               "sys.exit(cli.main(sys.argv[1:]))")


@dataclass
class Totals:
    connections: int = 0
    busy_retries: int = 0
    abrupt_disconnects: int = 0
    clean_closes: int = 0
    frames: int = 0
    garbage_sent: int = 0
    garbage_answered: int = 0
    prompt_switches: int = 0
    internal_errors: int = 0
    unexpected_closes: int = 0
    long_connections: int = 0
    starved_connections: int = 0
    max_gap_s: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as response:
        return json.loads(response.read())


async def session(url: str, rng: random.Random, until: float, totals: Totals, max_gap: float,
                  churn: bool) -> None:
    """One connection: stream, mix in garbage and switches, then drop abruptly or close cleanly."""
    async with connect(url, max_size=2**22, open_timeout=10, close_timeout=2) as ws:
        hello = json.loads(await ws.recv())
        if hello["type"] == "busy":
            totals.busy_retries += 1
            await asyncio.sleep(0.2)
            return
        totals.connections += 1
        await ws.send(json.dumps({"type": "start", "prompt": rng.choice(PROMPTS), "seed": rng.randrange(1000)}))
        opened = time.monotonic()
        end = min(until, opened + rng.uniform(1.0, 5.0)) if churn else until
        last_frame, pending_garbage, next_poke = None, 0, opened + rng.uniform(0.2, 1.0)
        while (now := time.monotonic()) < end:
            if now >= next_poke:
                next_poke = now + rng.uniform(0.2, 1.0)
                if rng.random() < 0.25:
                    await ws.send(json.dumps({"type": "prompt", "prompt": rng.choice(PROMPTS),
                                              "recache": rng.random() < 0.5}))
                    totals.prompt_switches += 1
                else:
                    await ws.send(rng.choice(GARBAGE))
                    totals.garbage_sent += 1
                    pending_garbage += 1
            try:
                message = await asyncio.wait_for(ws.recv(), timeout=max(0.01, min(next_poke, end) - now))
            except asyncio.TimeoutError:
                continue
            if isinstance(message, bytes):
                totals.frames += 1
                if last_frame is not None:
                    totals.max_gap_s = max(totals.max_gap_s, time.monotonic() - last_frame)
                last_frame = time.monotonic()
                continue
            data = json.loads(message)
            if data["type"] == "error":
                totals.error_codes[data["code"]] = totals.error_codes.get(data["code"], 0) + 1
                totals.internal_errors += data["code"] == "internal"
                if pending_garbage:
                    pending_garbage -= 1
                    totals.garbage_answered += 1
        while pending_garbage:  # every garbage message is answered before this connection ends
            message = await asyncio.wait_for(ws.recv(), timeout=30)
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                pending_garbage -= 1
                totals.garbage_answered += 1
        lived = time.monotonic() - opened
        if lived >= 2.0:
            totals.long_connections += 1
            if last_frame is None or time.monotonic() - last_frame > max_gap:
                totals.starved_connections += 1
        if churn and time.monotonic() < until and rng.random() < 0.7:
            ws.transport.abort()  # no close frame: the TCP connection just goes away
            totals.abrupt_disconnects += 1
            return
        await ws.send(json.dumps({"type": "stop"}))
        while not (isinstance(message := await asyncio.wait_for(ws.recv(), timeout=30), str)
                   and json.loads(message)["type"] == "stopped"):
            pass
        totals.clean_closes += 1


async def slot(url: str, seed: int, until: float, totals: Totals, max_gap: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            await session(url, rng, until, totals, max_gap, churn=True)
        except (ConnectionClosed, InvalidHandshake, OSError, asyncio.TimeoutError) as e:
            totals.unexpected_closes += 1
            print(f"slot {seed}: connection failed: {type(e).__name__}: {e}", file=sys.stderr)
            await asyncio.sleep(0.2)


async def warm_up(url: str) -> None:
    async with connect(url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "prompt": PROMPTS[0], "frames": 17}))
        while not (isinstance(m := await ws.recv(), str) and json.loads(m)["type"] == "stopped"):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a pipeline folder (default: a random tiny one)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent client slots = --max-sessions")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in all")
    parser.add_argument("--rounds", type=int, default=2, help="rounds the load is split into (memory is read "
                                                              "after each, all sessions closed)")
    parser.add_argument("--max-gap", type=float, default=5.0, help="longest allowed wait between frames (s)")
    parser.add_argument("--rss-tolerance", type=float, default=32.0, help="allowed RSS growth after the run, MiB")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else write_random_pipeline(Path(tmp) / "tiny", TINY_DIT, TINY_SPEC)
        port = free_port()
        log_path = Path(tmp) / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        command = [sys.executable, "-c", SERVER_CODE, "serve", "--model", str(folder), "--port", str(port),
                   "--max-sessions", str(args.sessions)]
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    status(port)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start:\n{log_path.read_text()}") from None
                    time.sleep(0.2)
            url = f"ws://127.0.0.1:{port}/ws"

            async def warm_up_all() -> None:  # every slot once, so worker threads and their pools exist
                await asyncio.gather(*(warm_up(url) for _ in range(args.sessions)))

            asyncio.run(warm_up_all())
            while status(port)["sessions"]:
                time.sleep(0.2)
            time.sleep(1.0)
            baseline = rss_mib(server.pid)
            totals = Totals()
            peak = baseline

            async def load(seconds: float, round_index: int) -> None:
                nonlocal peak
                until = time.monotonic() + seconds
                slots = [asyncio.create_task(slot(url, (args.seed * 10 + round_index) * 100 + i, until, totals,
                                                  args.max_gap)) for i in range(args.sessions)]
                while not all(t.done() for t in slots):
                    peak = max(peak, rss_mib(server.pid))
                    await asyncio.sleep(0.5)
                await asyncio.gather(*slots)

            began = time.monotonic()
            after, sessions_after = [], []
            for round_index in range(args.rounds):  # memory is read between rounds, with every session closed
                asyncio.run(load(args.duration / args.rounds, round_index))
                deadline = time.monotonic() + 30
                while status(port)["sessions"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                sessions_after.append(status(port)["sessions"])
                time.sleep(2.0)
                after.append(rss_mib(server.pid))
            elapsed = time.monotonic() - began
        finally:
            server.terminate()
            server.wait(30)
        log_text = log_path.read_text()

    server_errors = [line for line in log_text.splitlines() if "Traceback" in line or line.startswith("ERROR")]
    checks = {
        "no server error logged": not server_errors,
        "no internal error sent": totals.internal_errors == 0,
        "every garbage message answered": totals.garbage_answered == totals.garbage_sent,
        "no connection broken by the server": totals.unexpected_closes == 0,
        "every connection of 2 s or more kept receiving frames":
            totals.long_connections > 0 and totals.starved_connections == 0 and totals.max_gap_s <= args.max_gap,
        "sessions back to 0 after every round": not any(sessions_after),
        "RSS back near baseline": after[-1] - baseline <= args.rss_tolerance,
        "RSS not growing from round to round": after[-1] - after[0] <= args.rss_tolerance / 2,
    }
    result = {"command": "python benchmarks/load_test_server.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "sessions": args.sessions, "duration_s": elapsed, "totals": asdict(totals),
              "frames_per_s": totals.frames / elapsed,
              "rss_mib": {"baseline": baseline, "peak": peak, "after_each_round": after},
              "sessions_after": sessions_after, "server_errors": server_errors, "checks": checks}
    t = totals
    print(f"{args.sessions} slots for {elapsed:.1f} s: {t.connections} connections ({t.abrupt_disconnects} dropped "
          f"abruptly, {t.clean_closes} closed cleanly, {t.busy_retries} busy retries), {t.frames} frames "
          f"({t.frames / elapsed:.1f}/s), longest gap {t.max_gap_s:.2f} s, {t.prompt_switches} prompt switches, "
          f"{t.garbage_sent} garbage messages ({t.garbage_answered} answered: {t.error_codes})")
    print(f"server RSS: baseline {baseline:.1f} MiB, peak {peak:.1f} MiB, after each round "
          f"{', '.join(f'{a:.1f}' for a in after)} MiB; open sessions after each round: {sessions_after}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
