import os
from pathlib import Path

import pytest
import torch

from causal_forcing.config import ModelConfig
from causal_forcing.models.wan import WanDiT

PARITY_DIR = Path(os.environ.get("CF_PARITY_DIR", Path(__file__).parent / "data" / "parity"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (restored afterwards): on a shared CPU more threads only
    contend. Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def fan_in_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with N(0, 1/fan_in) matrices and O(0.1) biases/modulations, so every path matters
    (with a small init the text path collapses and tests could not see a cross-attention bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny_model():
    cfg = ModelConfig(dim=64, ffn_dim=128, freq_dim=256, text_dim=32, text_len=8, num_heads=2, num_layers=2)
    return fan_in_init(WanDiT(cfg)).eval()
