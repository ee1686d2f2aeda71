import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

collect_ignore = ["bench"]       # benchmark scripts are run by hand, never collected


def pytest_configure(config):
    # torch 2.11's own torch.utils.mkldnn, imported on the compile path, uses a deprecated decorator
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class TinyEncoder(nn.Module):
    """A small stand-in encoder with the interface of the real ones (a `dim` attribute)."""

    def __init__(self, d_in, dim=8):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_encoders():
    torch.manual_seed(0)
    return lambda *d_ins, dim=8: [TinyEncoder(d, dim) for d in d_ins]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A tiny toy A-V set on disk, shared by the script tests."""
    import common as C
    root = tmp_path_factory.mktemp("toy_av")
    C.make_toy_av(root, seed=0, n_train=48, n_test=24, frames=2, px=24)
    return root


TINY = ["--image_size", "16", "--frames", "2", "--audio_len", "32", "--num_mel_bins", "16",
        "--batch_size", "16", "--epochs", "1"]
