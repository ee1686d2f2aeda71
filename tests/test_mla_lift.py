"""The MLA block of common.py (fusion_weights and the MLA class) lifts out: it needs nothing but torch."""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from conftest import TinyEncoder


def lifted_mla():
    source = inspect.getsource(C.fusion_weights) + "\n\n" + inspect.getsource(C.MLA)
    scope = {"torch": torch, "nn": nn, "F": F}
    exec(compile(source, "lifted_mla.py", "exec"), scope)
    return source, scope["MLA"]


def test_the_mla_block_is_at_most_100_lines_and_runs_with_only_torch():
    source, MLA = lifted_mla()
    assert len(source.strip().splitlines()) <= 100
    assert MLA is not C.MLA and MLA.__module__ != "common"
    torch.manual_seed(0)
    xs, y = [torch.randn(64, 5), torch.randn(64, 7)], torch.randint(0, 3, (64,))
    mask = torch.rand(64, 2) > 0.3
    mask[~mask.any(1), 0] = True
    runs = []
    for cls in (MLA, C.MLA):                        # the lifted copy trains exactly as common.MLA
        torch.manual_seed(1)
        model = cls([TinyEncoder(5), TinyEncoder(7)], 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for step in range(30):
            model.alpha = 0.1 ** (1 + step / 30)    # the paper's schedule, set by the caller
            losses.append(float(model.train_step(xs, y, optimizer, mask=mask if step % 2 else None)))
        fused, unis = model.predict(xs, mask=mask)
        runs.append((losses, fused, model.P.clone()))
        assert losses[-1] < 0.9 * losses[0]         # it learns the batch
        assert not torch.equal(model.P, torch.eye(model.dim)) and torch.allclose(model.P, model.P.T, atol=1e-6)
        assert fused.shape == (64, 3) and len(unis) == 2
        assert torch.all(unis[1][~mask[:, 1]] == 0)    # a missing view gives no logits
    (la, fa, pa), (lb, fb, pb) = runs
    assert la == lb and torch.equal(fa, fb) and torch.equal(pa, pb)


def test_schedule_sets_the_official_alpha_or_the_constant():
    _, MLA = lifted_mla()
    m = MLA([TinyEncoder(5), TinyEncoder(7)], 3)
    m.schedule(0, 5, 10)
    assert abs(m.alpha - 0.1 ** 1.5) < 1e-12
    c = MLA([TinyEncoder(5), TinyEncoder(7)], 3, hgm_alpha=0.02)
    c.schedule(3, 5, 10)
    assert c.alpha == 0.02
