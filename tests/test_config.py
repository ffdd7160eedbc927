import pytest
import torch

from causal_forcing.config import PRESETS, ModelConfig, model_preset
from causal_forcing.errors import ConfigError
from causal_forcing.models.wan import WanDiT


def test_presets_and_derived_values():
    c = model_preset("wan2.1-t2v-1.3b")
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.text_dim, c.text_len) == (1536, 8960, 12, 30, 4096, 512)
    assert c.head_dim == 128 and c.rope_split == (44, 42, 42)
    assert c.tokens_per_frame(60, 104) == 1560 and c.tokens_per_frame(8, 8) == 16
    c14 = model_preset("wan2.1-t2v-14b")
    assert (c14.dim, c14.ffn_dim, c14.num_heads, c14.num_layers) == (5120, 13824, 40, 40)
    assert "tiny" in PRESETS


def test_official_config_json_loads():
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                "num_layers": 30, "out_dim": 16, "text_len": 512}
    assert ModelConfig.from_dict(official) == model_preset("wan2.1-t2v-1.3b")


@pytest.mark.parametrize("bad,match", [({"dimm": 3}, "unknown model config key 'dimm'"),
                                       ({"dim": 100, "num_heads": 12}, "divisible"),
                                       ({"num_layers": 0}, "num_layers"),
                                       ({"model_type": "i2v"}, "model_type")])
def test_bad_config_is_one_line_error(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_dict(bad)
    assert "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("wan3")


def test_no_hard_coded_sizes():
    """A model of a non-Wan shape (3 layers, head_dim 48, odd latent size) runs through every layout."""
    cfg = ModelConfig(dim=96, ffn_dim=64, text_dim=8, text_len=4, num_heads=2, num_layers=3)
    m = WanDiT(cfg).eval()
    x = torch.randn(1, 3, 16, 6, 10)
    with torch.no_grad():
        assert m(x, torch.tensor([500.0]), torch.randn(1, 4, 8)).shape == x.shape
    assert m.tokens_per_frame((6, 10)) == 15
