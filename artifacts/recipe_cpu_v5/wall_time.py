"""Sum the recipe's running wall time from wall.log: each invocation runs from its `start` line to its `end` line
(or, for one the session end killed, to the `stop-previous-session last-heartbeat T` line), minus the time between
`pause` and `resume` lines. Prints each invocation and the total.

    python artifacts/recipe_cpu_v5/wall_time.py runs/recipe_v5_wall.log [--now]

--now counts a still-running last invocation up to now."""
from __future__ import annotations

import sys
from datetime import datetime, timezone


def parse(lines: list[str], now: datetime | None) -> list[tuple[datetime, datetime, float]]:
    runs, start, paused, pause_at = [], None, 0.0, None
    for line in lines:
        words = line.split()
        if not words:
            continue
        kind = words[0]
        if kind == "start":
            start, paused, pause_at = datetime.fromisoformat(words[1]), 0.0, None
        elif kind == "pause" and start is not None:
            pause_at = datetime.fromisoformat(words[1])
        elif kind == "resume" and start is not None and pause_at is not None:
            paused += (datetime.fromisoformat(words[1]) - pause_at).total_seconds()
            pause_at = None
        elif kind in ("end", "stop-previous-session") and start is not None:
            stop = datetime.fromisoformat(words[1] if kind == "end" else words[2])
            if pause_at is not None and pause_at < stop:   # killed while paused: count up to the pause
                stop = pause_at
            runs.append((start, stop, paused))
            start = None
    if start is not None and now is not None:
        stop = pause_at or now
        runs.append((start, stop, paused))
    return runs


def main() -> None:
    path = sys.argv[1]
    now = datetime.now(timezone.utc) if "--now" in sys.argv else None
    total = 0.0
    for start, stop, paused in parse(open(path).read().splitlines(), now):
        active = (stop - start).total_seconds() - paused
        total += active
        print(f"{start.isoformat()} -> {stop.isoformat()}: {active / 60:7.1f} min running ({paused / 60:.1f} paused)")
    print(f"total {total / 60:.1f} min = {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
