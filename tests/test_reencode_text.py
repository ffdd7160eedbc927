"""data.encode.reencode_text: a second text encoding of a latent dataset (the prefix model's clause-wise captions),
checked against encoding each caption alone and against the source's latents."""
from __future__ import annotations

import pytest
import torch

from causal_forcing.data.encode import reencode_text
from causal_forcing.data.latents import LatentDataset, LatentWriter
from causal_forcing.errors import InputError
from causal_forcing.models.text import build_text_encoder

CAPTIONS = ["a small red circle moving right", "a big blue square moving up and a small green triangle standing still",
            "one little green disc moving to the right", "a medium purple square moving left next to a big red circle",
            "a large yellow circle moving down"]


@pytest.fixture(scope="module")
def clauses():
    return build_text_encoder("minilm-clauses", text_len=24, cache_size=0)


def _source(folder):
    g = torch.Generator().manual_seed(0)
    with LatentWriter(folder, shard_size=2, meta={"vae": "shapes", "text_encoder": "minilm-24", "text_len": 24,
                                                   "latent_channels": 4}) as w:
        for i, caption in enumerate(CAPTIONS):
            w.add(torch.randn(6, 4, 2, 2, generator=g), {"id": f"c{i}", "caption": caption},
                  torch.zeros(24, 384))
    return LatentDataset(folder)


def test_reencoded_contexts_are_each_caption_encoded_alone(tmp_path, clauses):
    src = _source(tmp_path / "src")
    summary = reencode_text(tmp_path / "src", tmp_path / "out", clauses, text_encoder_name="minilm-clauses-24",
                            max_frames=3, shard_size=2, batch_size=2)
    assert (summary.total, summary.encoded, summary.skipped) == (5, 5, 0)
    out = LatentDataset(tmp_path / "out")
    assert out.meta["text_encoder"] == "minilm-clauses-24" and out.meta["vae"] == "shapes"
    by_id = {out[i]["record"]["id"]: out[i] for i in range(len(out))}
    for i in range(len(src)):
        item = src[i]
        got = by_id[item["record"]["id"]]
        assert got["record"] == item["record"]
        torch.testing.assert_close(got["latents"], item["latents"][:3], atol=0, rtol=0)   # stored fp16 both times
        alone = clauses.encode([item["record"]["caption"]])[0].float()
        torch.testing.assert_close(got["context"], alone, atol=2e-3, rtol=2e-3)   # fp16 storage; batching


def test_reencoding_resumes_and_refuses_another_encoder(tmp_path, clauses):
    _source(tmp_path / "src")
    opts = {"text_encoder_name": "minilm-clauses-24", "max_frames": 2, "shard_size": 2, "batch_size": 2}
    reencode_text(tmp_path / "src", tmp_path / "whole", clauses, **opts)

    def interrupt(done, total):
        if done >= 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        reencode_text(tmp_path / "src", tmp_path / "resumed", clauses, progress=interrupt, **opts)
    assert len(LatentDataset(tmp_path / "resumed")) == 2
    summary = reencode_text(tmp_path / "src", tmp_path / "resumed", clauses, **opts)
    assert (summary.encoded, summary.skipped) == (3, 2)
    whole, resumed = LatentDataset(tmp_path / "whole"), LatentDataset(tmp_path / "resumed")
    want = {whole[i]["record"]["id"]: whole[i] for i in range(len(whole))}
    for i in range(len(resumed)):
        item = resumed[i]
        assert torch.equal(item["latents"], want[item["record"]["id"]]["latents"])
        assert torch.equal(item["context"], want[item["record"]["id"]]["context"])
    with pytest.raises(InputError, match="text_encoder"):
        reencode_text(tmp_path / "src", tmp_path / "resumed", clauses, **{**opts, "text_encoder_name": "other"})
