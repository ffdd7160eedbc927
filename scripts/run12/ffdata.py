import torch
from causal_forcing.data.latents import LatentDataset, LatentWriter

src = LatentDataset("runs/r11/latents_mini1")
d = torch.load("runs/r12/mdata_train.pt", weights_only=False)
meta = dict(src.meta)
meta["source"] = "runs/r11/latents_mini1 + runs/r12/mdata_train.pt"
with LatentWriter("runs/r12/ff_data", kind="latents", shard_size=256, meta=meta) as w:
    for i in range(len(src)):
        it = src[i]
        rec = dict(it["record"])
        rec["id"] = f"orig-{i}"
        w.add(it["latents"], rec, it["context"])
    for i in range(1000, d["latents"].shape[0]):  # the first 1000 stay unseen (matcher validation)
        w.add(
            d["latents"][i].float()[None], {"id": f"new-{i}", "caption": d["captions"][i][0]}, d["text"][i, 0].float()
        )
print(len(src), d["latents"].shape[0] - 1000)
