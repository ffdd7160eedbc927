"""Mean ± std (sample std over seeds, n - 1) of `eval model` score folders: `python aggregate.py NAME DIR [DIR ...]`.

Prints in-distribution Total / semantic / quality / all_correct, one- and two-object all_correct, and held-out
Total; with `--json OUT` also writes them.
"""
import argparse
import json
import statistics
from pathlib import Path


def summarise(folders):
    rows = []
    for folder in folders:
        scores = json.loads((Path(folder) / "scores.json").read_text())
        inside = [c for c in scores["clips"] if not c["held_out"]]
        by_count = {n: [c["all_correct"] for c in inside if len(c["objects"]) == n] for n in (1, 2)}
        ind = scores["in_distribution"]
        rows.append({"total": ind["total"], "semantic": ind["semantic"], "quality": ind["quality"],
                     "all_correct": ind["all_correct"], "one_object_all_correct": statistics.mean(by_count[1]),
                     "two_object_all_correct": statistics.mean(by_count[2]),
                     "held_out_total": scores["held_out"]["total"]})
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {key: {"mean": statistics.mean(r[key] for r in rows), "std": spread([r[key] for r in rows]),
                  "seeds": [r[key] for r in rows]} for key in rows[0]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--json")
    args = parser.parse_args()
    summary = summarise(args.folders)
    print(args.name, "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in summary.items()))
    if args.json:
        path = Path(args.json)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[args.name] = {"folders": args.folders, **summary}
        path.write_text(json.dumps(data, indent=1) + "\n")
