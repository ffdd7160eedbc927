"""Write a second evaluation set in the standard set's format: `n` other canonical prompts (the same sampler,
`shapes.standard_eval_prompts`, with another seed; 10 % held-out), for an estimate on prompts the standard set
does not fix.

    python scripts/run16/fresh_prompts.py OUT_DIR [--n 300] [--seed-offset 16]
"""
import sys

from causal_forcing.data import shapes, shapes_io

if __name__ == "__main__":
    extra = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    n, offset = int(extra.get("--n", 300)), int(extra.get("--seed-offset", 16))
    fresh = shapes.standard_eval_prompts(n=n, seed=shapes.EVAL_SET_SEED + offset)
    shapes_io.shapes.standard_eval_prompts = lambda: fresh   # what write_eval_set renders
    print(shapes_io.write_eval_set(sys.argv[1]))
