"""Every trainable parameter of every registered method learns: through a method's whole cycle (its start-of-run
fit, start-of-epoch work, the steps of an epoch as the scripts run them, its end-of-epoch fit), each parameter
either receives a finite nonzero gradient at some optimizer step or moves. Plain SGD (no momentum, no decay),
so a parameter that moves has had a gradient or a closed-form fit. A formula test alone let IF-MMIN's decoders
0..B-2 sit without a gradient; this catches such a part in any method."""
import pytest
import torch

import common as C
from conftest import options

N, DIMS, CLASSES = 24, (5, 6, 7), 4


class PlainFeatures(C.FeatureDataset):
    """(*views, label, index): the batch layout of the Table 5 scripts (no mask)."""
    masked = False

    def __getitem__(self, i):
        return (*[x[i] for x in self.xs], self.y[i], i)


def loaders(num_views, masked):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % CLASSES                                   # every class in every split
    xs = [torch.randn(N, d, generator=g) + y[:, None].float() for d in DIMS[:num_views]]
    mask = torch.from_numpy(C.missing_mask(N, num_views, 0.3, seed=0)) if masked else torch.ones(N, num_views, dtype=bool)
    data = (C.FeatureDataset if masked else PlainFeatures)(xs, mask, y)
    return {"train": C.make_loader(data, 8, True, seed=0), "val": C.make_loader(data, 8, False),
            "test": C.make_loader(data, 8, False)}


def learned(name, num_views, masked, epochs=1, **kw):
    """{parameter name: did it learn} over `epochs` epochs of `name` on tiny data."""
    torch.manual_seed(0)
    mods = ["audio", "visual", "text"][:num_views]
    encoders = [C.MLPEncoder(d, 8, 2) for d in DIMS[:num_views]]
    flags = dict(ae_widths=(8, 4), ae_blocks=3, cca_dim=3, dcca_dim=2, code_steps=2, tate_heads=2, tate_layers=1)
    method = C.build_method(name, encoders, CLASSES, mods, N, **(options(name, **flags) | kw))
    method.apply(C.init_weights)
    ls = loaders(num_views, masked)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    names = {p: n for n, p in method.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for p, n in names.items()}
    got_grad = set()

    def spy(optimizer, *_):
        for p, n in names.items():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient of {n}"
                if p.grad.abs().sum() > 0:
                    got_grad.add(n)

    opt.register_step_pre_hook(spy)
    for epoch in range(epochs):                          # as the scripts: the CCA family's closed-form fits included
        method.start_epoch(epoch, epochs, ls, opt, "cpu")
        C.train_one_epoch(method, ls["train"], opt, epoch, "cpu")
        method.end_epoch(epoch, ls, "cpu")
    after = dict(method.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values()), f"{name}: non-finite parameters"
    return {n: n in got_grad or not torch.equal(before[n], after[n].detach()) for n in before}


# ReconBoost trains one modality per stage, then all: stages of 1 epoch, so M + 1 epochs cover every phase
PHASES = {"reconboost": dict(stage_epochs=1, correct_epochs=1, hidden=8)}


@pytest.mark.parametrize("num_views", [2, 3])
@pytest.mark.parametrize("name", C.methods_of("av"))
def test_every_parameter_of_a_table5_method_learns(name, num_views):
    epochs = 2 * num_views if name == "reconboost" else 1
    ok = learned(name, num_views, masked=False, epochs=epochs, **PHASES.get(name, {}))
    assert all(ok.values()), f"{name} ({num_views} modalities): never learned: {[n for n, v in ok.items() if not v]}"


@pytest.mark.parametrize("name", C.methods_of("missing"))
def test_every_parameter_of_a_table6_method_learns_with_missing_views(name):
    ok = learned(name, 3, masked=True)
    assert all(ok.values()), f"{name}: never learned: {[n for n, v in ok.items() if not v]}"
