"""Tests of causal_forcing.checkpoints against the reference parity files and diffusers' own Wan code."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file

from causal_forcing import checkpoints as ck
from causal_forcing.config import ModelConfig, model_preset
from causal_forcing.errors import CheckpointError, ConfigError
from causal_forcing.models.wan import WanDiT

PARITY = Path("/work/shared/reference/parity")
WEIGHTS = PARITY / "weights.safetensors"
RELEASED = PARITY / "checkpoint_like.pt"
TINY = model_preset("tiny")

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, as published.
DIFFUSERS_1_3B_CONFIG = {
    "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": None,
    "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
    "image_dim": None, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096,
}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(WEIGHTS)


@pytest.fixture(scope="module")
def ema_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA weights rebuilt as the parity README describes (seed 1, state_dict order, v + 0.01 N(0,1))."""
    order = list(meta_wan(TINY).state_dict())
    torch.manual_seed(1)
    return {k: weights[k] + 0.01 * torch.randn(weights[k].shape) for k in order}


def assert_same_state_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def meta_diffusers(config: ModelConfig) -> WanTransformer3DModel:
    with torch.device("meta"):
        return WanTransformer3DModel(**ck.model_config_to_diffusers(config))


def meta_wan(config: ModelConfig) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(config)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- released checkpoints -----------------------------------------------------------------------------------
def test_released_generator_equals_weights(weights):
    sd, config = ck.load_dit_weights(RELEASED)
    assert config is None
    assert_same_state_dict(sd, weights)


def test_released_ema_equals_reconstructed_ema(weights, ema_weights):
    sd, _ = ck.load_dit_weights(RELEASED, ema=True)
    assert_same_state_dict(sd, ema_weights)
    assert not torch.equal(sd["head.head.weight"], weights["head.head.weight"])


def test_select_generator_prefers_generator_then_model(weights):
    prefixed = {"model." + k: v for k, v in weights.items()}
    only_model = ck.select_generator({"model": prefixed, "critic": {}})
    assert_same_state_dict(only_model, weights)
    marked = {k: v + 1 for k, v in prefixed.items()}
    both = ck.select_generator({"model": marked, "generator": prefixed})
    assert_same_state_dict(both, weights)


def test_missing_ema_lists_what_is_present(tmp_path, weights):
    path = ck.save_released_pt(tmp_path / "g.pt", generator=weights)
    with pytest.raises(CheckpointError, match=r"generator_ema.*present: 'generator'") as e:
        ck.load_dit_weights(path, ema=True)
    assert "\n" not in str(e.value)
    only_ema = ck.save_released_pt(tmp_path / "e.pt", generator_ema=weights)
    with pytest.raises(CheckpointError, match=r"'generator' or 'model'.*present: 'generator_ema'"):
        ck.load_dit_weights(only_ema, ema=False)


def test_nested_fsdp_segments_are_removed(weights):
    nested = {"model._fsdp_wrapped_module." + k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module."): v
              for k, v in weights.items()}
    assert_same_state_dict(ck.select_generator({"generator_ema": nested}, ema=True), weights)


def test_non_tensor_entry_is_rejected(weights):
    with pytest.raises(CheckpointError, match="'step'"):
        ck.select_generator({"generator": {**weights, "step": 3}})


# ---- corrupt / missing files --------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [WEIGHTS, RELEASED])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files_raise_one_line_error(tmp_path, source, damage):
    data = source.read_bytes()
    bad = tmp_path / f"bad{source.suffix}"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        ck.load_dit_weights(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        ck.load_dit_weights(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unrecognised.*w.npz"):
        ck.load_dit_weights(tmp_path / "w.npz")


def test_missing_shard_names_the_shard(tmp_path, weights):
    index = ck.save_safetensors(weights, tmp_path / "m.safetensors", max_shard_bytes=200_000)
    (tmp_path / "m-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found.*m-00002-of-00004.safetensors"):
        ck.load_dit_weights(index)


# ---- key maps -----------------------------------------------------------------------------------------------
def test_wan_diffusers_round_trip_keeps_tensors(weights):
    diffusers_sd = ck.wan_to_diffusers(weights)
    assert ck.detect_layout(diffusers_sd) == "diffusers"
    back = ck.diffusers_to_wan(diffusers_sd)
    assert back.keys() == weights.keys()
    assert all(back[k] is weights[k] for k in weights)


def test_key_map_agrees_with_diffusers_converter(weights):
    theirs = convert_wan_transformer_to_diffusers(dict(weights))
    ours = ck.wan_to_diffusers(weights)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "tiny"])
def test_key_sets_match_diffusers_model(preset):
    config = model_preset(preset)
    ours = meta_wan(config).state_dict()
    theirs = meta_diffusers(config).state_dict()
    converted = ck.wan_to_diffusers(ours)
    assert converted.keys() == theirs.keys()
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    assert ck.diffusers_to_wan(theirs).keys() == ours.keys()


def test_detect_layout_rejects_foreign_keys(weights):
    assert ck.detect_layout(weights) == "wan"
    with pytest.raises(CheckpointError, match="'encoder.block.0.weight'"):
        ck.detect_layout({**weights, "encoder.block.0.weight": torch.zeros(1)})
    mixed = {**weights, "proj_out.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="'proj_out.weight'.*closest layout, 'wan'"):
        ck.detect_layout(mixed)
    with pytest.raises(CheckpointError, match="empty"):
        ck.detect_layout({})


# ---- configs ------------------------------------------------------------------------------------------------
def test_published_diffusers_config_is_the_1_3b_preset():
    assert ck.model_config_from_diffusers(DIFFUSERS_1_3B_CONFIG) == model_preset("wan2.1-t2v-1.3b")
    ours = ck.model_config_to_diffusers(model_preset("wan2.1-t2v-1.3b"))
    assert ours == {k: v for k, v in DIFFUSERS_1_3B_CONFIG.items() if not k.startswith("_")} | {
        "pos_embed_seq_len": None}


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "tiny"])
def test_config_round_trip(preset):
    config = model_preset(preset)
    d = ck.model_config_to_diffusers(config)
    assert ck.model_config_from_diffusers(d, text_len=config.text_len) == config


def test_i2v_or_unknown_diffusers_config_is_rejected():
    with pytest.raises(ConfigError, match="image_dim"):
        ck.model_config_from_diffusers({**DIFFUSERS_1_3B_CONFIG, "image_dim": 1280})
    with pytest.raises(ConfigError, match="'foo'"):
        ck.model_config_from_diffusers({**DIFFUSERS_1_3B_CONFIG, "foo": 1})


# ---- strict loading -----------------------------------------------------------------------------------------
def test_load_into_reports_missing_unexpected_misshaped(weights):
    model = WanDiT(TINY)
    missing = {k: v for k, v in weights.items() if k != "blocks.1.ffn.0.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing, 0 unexpected, 0 mis-shaped.*'blocks.1.ffn.0.weight'"):
        ck.load_into(model, missing)
    with pytest.raises(CheckpointError, match=r"0 missing, 1 unexpected, 0 mis-shaped.*'extra'"):
        ck.load_into(model, {**weights, "extra": torch.zeros(1)})
    bad = {**weights, "head.modulation": torch.zeros(1, 3, 64)}
    with pytest.raises(CheckpointError, match=r"1 mis-shaped.*'head.modulation'.*\(1, 3, 64\).*\(1, 2, 64\)") as e:
        ck.load_into(model, bad)
    assert "\n" not in str(e.value)


def test_load_into_casts_to_model_dtype(weights):
    model = WanDiT(TINY).to(torch.bfloat16)
    ck.load_into(model, weights)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, weights[k].to(torch.bfloat16)), k


def test_load_into_meta_model_with_assign(weights):
    model = meta_wan(TINY)
    ck.load_into(model, weights, assign=True)
    assert_same_state_dict(model.state_dict(), weights)
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())


# ---- writing and round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_single_safetensors_round_trip(tmp_path, weights, layout):
    path = ck.save_safetensors(weights, tmp_path / "w.safetensors", layout=layout)
    assert ck.detect_layout(load_file(path)) == layout
    sd, config = ck.load_dit_weights(path)
    assert config is None
    assert_same_state_dict(sd, weights)


def test_sharded_safetensors_round_trip(tmp_path, weights):
    max_bytes = 200_000  # the tiny model holds 161,536 fp32 parameters = 646,144 bytes
    index = ck.save_safetensors(weights, tmp_path / "w.safetensors", max_shard_bytes=max_bytes)
    assert index.name == "w.safetensors.index.json" and not (tmp_path / "w.safetensors").exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert weight_map.keys() == weights.keys()
    shards = sorted(set(weight_map.values()))
    assert shards == [f"w-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) >= 4  # 646,144 bytes cannot fit in 3 shards of 200,000
    for shard in shards:
        tensors = load_file(tmp_path / shard)
        assert sum(v.numel() * v.element_size() for v in tensors.values()) <= max_bytes
    assert_same_state_dict(ck.load_dit_weights(index)[0], weights)


def test_released_pt_round_trip(tmp_path, weights, ema_weights):
    path = ck.save_released_pt(tmp_path / "model.pt", generator=weights, generator_ema=ema_weights)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"generator", "generator_ema"}
    assert all(k.startswith("model.") for k in raw["generator"])
    assert_same_state_dict(ck.load_dit_weights(path)[0], weights)
    assert_same_state_dict(ck.load_dit_weights(path, ema=True)[0], ema_weights)


def test_own_folder_round_trip(tmp_path, weights):
    model = WanDiT(TINY)
    ck.load_into(model, weights)
    folder = ck.save_model_folder(model, TINY, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    sd, config = ck.load_dit_weights(folder)
    assert config == TINY
    assert_same_state_dict(sd, weights)


def test_reads_folder_written_by_diffusers(tmp_path, weights):
    model = WanTransformer3DModel(**ck.model_config_to_diffusers(TINY))
    model.load_state_dict(ck.wan_to_diffusers(weights), strict=True)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for name in ("single", "sharded"):
        sd, config = ck.load_dit_weights(tmp_path / name)
        assert config == TINY.replace(text_len=512)  # diffusers does not store text_len
        assert_same_state_dict(sd, weights)


def test_reads_official_wan_folder(tmp_path, weights):
    folder = tmp_path / "Wan2.1-tiny"
    ck.save_safetensors(weights, folder / "diffusion_pytorch_model.safetensors", layout="wan")
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", **TINY.to_dict()}
    (folder / "config.json").write_text(json.dumps(official))
    sd, config = ck.load_dit_weights(folder)
    assert config == TINY
    assert_same_state_dict(sd, weights)


def test_diffusers_loads_our_sharded_export(tmp_path, weights, monkeypatch):
    folder = ck.save_diffusers_folder(weights, TINY, tmp_path / "export", max_shard_bytes=200_000)
    # Without `accelerate` installed, from_pretrained refuses classes with fp32-pinned modules; in fp32 the pinning
    # is a no-op, so switch it off to exercise diffusers' own sharded-checkpoint reader.
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    model = WanTransformer3DModel.from_pretrained(folder, low_cpu_mem_usage=False)
    assert_same_state_dict(ck.diffusers_to_wan(model.state_dict()), weights)


def test_resave_unsharded_removes_stale_index(tmp_path, weights):
    ck.save_safetensors(weights, tmp_path / "w.safetensors", max_shard_bytes=200_000)
    single = ck.save_safetensors(ck.wan_to_diffusers(weights), tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors.index.json").exists()
    assert_same_state_dict(ck.load_dit_weights(single)[0], weights)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, weights, monkeypatch):
    path = ck.save_safetensors(weights, tmp_path / "w.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_safetensors({k: v * 2 for k, v in weights.items()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ---- parameter counts ---------------------------------------------------------------------------------------
def test_parameter_counts():
    assert numel(meta_wan(model_preset("wan2.1-t2v-1.3b"))) == 1_418_996_800
    config_14b = model_preset("wan2.1-t2v-14b")
    assert numel(meta_wan(config_14b)) == numel(meta_diffusers(config_14b))
    assert numel(meta_wan(TINY)) == 161_536


# ---- numerical equivalence with diffusers ---------------------------------------------------------------------
def test_diffusers_model_with_converted_weights_matches_wandit(weights, ema_weights):
    ref = load_file(PARITY / "bidirectional.safetensors")
    x, t, context = ref["x"], ref["t"], ref["context"]
    ours = WanDiT(TINY).eval()
    theirs = WanTransformer3DModel(**ck.model_config_to_diffusers(TINY)).eval()
    for sd, expected in ((weights, ref["output"]), (ema_weights, ref["output_ema"])):
        ck.load_into(ours, sd)
        ck.load_into(theirs, ck.wan_to_diffusers(sd))
        with torch.no_grad():
            out_ours = ours(x, t, context)
            out_theirs = theirs(x.transpose(1, 2), t, context, return_dict=False)[0].transpose(1, 2)
        assert (out_ours - expected).abs().max() <= 1e-4
        assert (out_theirs - expected).abs().max() <= 1e-4
        assert (out_theirs - out_ours).abs().max() <= 1e-4
