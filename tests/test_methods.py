"""Behaviour of the methods' updates (MLA, OGM/OGM-GE, QMF, late fusion) on small encoders."""
import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common as C
from conftest import step

MODS = ["audio", "video"]


def batch(n=12, d_a=5, d_v=7, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, d_a, generator=g), torch.randn(n, d_v, generator=g)],
            torch.randint(0, classes, (n,), generator=g), torch.arange(n))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- MLA

class SpyOptimizer(torch.optim.SGD):
    """SGD that records, at every step, which parameters had a gradient and which moved."""

    def __init__(self, method, **kw):
        super().__init__(method.parameters(), **kw)
        self.method, self.log = method, []

    def step(self, closure=None):
        before = [params(e) for e in self.method.encoders]
        had_grad = [any(p.grad is not None for p in e.parameters()) for e in self.method.encoders]
        super().step(closure)
        moved = [not same(b, params(e)) for b, e in zip(before, self.method.encoders)]
        self.log.append((had_grad, moved))


def test_mla_step_moves_only_its_own_encoder(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(5, 7), 4, MODS)
    opt = SpyOptimizer(m, lr=0.1, momentum=0.9, weight_decay=1e-2)   # momentum and decay would leak
    for s in range(3):
        xs, y, idx = batch(seed=s)
        step(m, xs, y, idx, opt, epoch=0, batch=s, steps=3)
    assert len(opt.log) == 6                                           # two steps per batch
    for i, (had_grad, moved) in enumerate(opt.log):
        mod = i % 2
        assert had_grad == [j == mod for j in range(2)]
        assert moved == [j == mod for j in range(2)], f"step {i}: only encoder {mod} may move"


def test_mla_projection_protects_earlier_direction(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(5, 7), 4, MODS, hgm_alpha=1e-3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)                      # plain SGD: dW = -lr * grad
    xs, y, idx = batch()
    hbars, grads, Ws = [], [], []
    orig = m.project_head_grad

    def spy(hbar, alpha, mod=0):     # called inside each modality's step, before its optimizer step
        hbars.append(hbar.clone())
        grads.append(m.head.weight.grad.clone())
        Ws.append(m.head.weight.detach().clone())
        orig(hbar, alpha, mod)

    m.project_head_grad = spy
    step(m, xs, y, idx, opt, epoch=0, batch=0, steps=1)
    dW1, dW2 = Ws[1] - Ws[0], m.head.weight.detach() - Ws[1]
    # first step of the run: P is the identity, the gradient is unchanged
    assert torch.allclose(dW1, -0.5 * grads[0], atol=1e-6)
    h1 = hbars[0]
    rel = (dW2 @ h1).norm() / (dW2.norm() * h1.norm())
    assert dW2.norm() > 0
    assert rel < 1e-2, f"second step's head update not orthogonal to the first step's features ({rel:.3g})"
    # without projection the same update would not be orthogonal
    raw_rel = (grads[1] @ h1).norm() / (grads[1].norm() * h1.norm())
    assert raw_rel > 10 * rel


def test_mla_P_symmetric_finite_and_never_renormalised(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(5, 7), 4, MODS)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for s in range(20):
        xs, y, idx = batch(seed=s)
        step(m, xs, y, idx, opt, epoch=0, batch=s, steps=20)
    P = m.P
    assert torch.isfinite(P).all()
    assert torch.equal(P, P.T)
    assert not torch.allclose(P, torch.eye(P.shape[0]))
    assert torch.linalg.eigvalsh(P.double()).min() > -1e-4            # stays positive semi-definite
    assert "P" in m.state_dict()                                        # checkpointed with the model


def test_mla_absorb_formula():
    enc = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    for e in enc:
        e.dim = 4
    m = C.MLA(enc, 3, MODS)
    m.head.weight.grad = torch.randn(3, 4)
    g0 = m.head.weight.grad.clone()
    P0 = torch.eye(4) - 0.1 * torch.ones(4, 4)
    m.P.copy_(P0)
    h, alpha = torch.tensor([1.0, 2.0, 0.5, -1.0]), 0.3
    m.project_head_grad(h, alpha)
    assert torch.allclose(m.head.weight.grad, g0 @ P0)                  # projected with the old P
    k = P0 @ h
    assert torch.allclose(m.P, P0 - torch.outer(k, k) / (alpha + h @ k))


def linear_mla(**kw):
    enc = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    for e in enc:
        e.dim = 4
    return C.MLA(enc, 3, MODS, **kw)


def test_mla_forgetting_factor_divides_the_absorbed_P():
    m = linear_mla(hgm_forget=0.9)
    m.head.weight.grad = torch.randn(3, 4)
    P0 = torch.eye(4) - 0.1 * torch.ones(4, 4)
    m.P.copy_(P0)
    h, alpha = torch.tensor([1.0, 2.0, 0.5, -1.0]), 0.3
    m.project_head_grad(h, alpha)
    k = P0 @ h
    assert torch.allclose(m.P, (P0 - torch.outer(k, k) / (alpha + h @ k)) / 0.9)


def test_mla_alpha_scale_absorbs_the_same_share_at_any_feature_scale():
    """With hgm_alpha_scale, alpha is multiplied by the running mean of hbar'hbar (the first value, then
    momentum 0.1): features 1000 times larger give the same P; with a plain alpha they do not."""
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(4, generator=g) for _ in range(5)]
    Ps = {}
    for scaled in (False, True):
        for unit in (1.0, 1000.0):
            m = linear_mla(hgm_alpha_scale=scaled)
            for i, h in enumerate(hs):
                m.head.weight.grad = torch.ones(3, 4)
                m.project_head_grad(unit * h, 0.1, i % 2)
            Ps[scaled, unit] = m.P.clone()
            if scaled:           # modality 0 saw hs[0], hs[2], hs[4]
                r = (unit * hs[0]).square().sum()
                for h in (hs[2], hs[4]):
                    r = 0.9 * r + 0.1 * (unit * h).square().sum()
                assert torch.allclose(m.hbar_sq[0], r, rtol=1e-5)
    assert torch.allclose(Ps[True, 1.0], Ps[True, 1000.0], atol=1e-5)
    assert not torch.allclose(Ps[False, 1.0], Ps[False, 1000.0], atol=1e-3)
    assert "hbar_sq" in linear_mla(hgm_alpha_scale=True).state_dict()      # resumed with the model
    assert "hbar_sq" not in linear_mla().state_dict()                      # the paper's checkpoints unchanged


def test_mla_no_hgm_leaves_gradient(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(5, 7), 4, MODS, hgm=False)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    xs, y, idx = batch()
    step(m, xs, y, idx, opt, epoch=0, batch=0, steps=1)
    # reference: the same two plain CE steps by hand
    W = ref.head.weight.detach().clone()
    for f, x in zip(ref.encoders, xs):
        ref.zero_grad()
        F.cross_entropy(ref.head(f(x)), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
    assert torch.allclose(m.head.weight, ref.head.weight, atol=1e-6)
    assert not torch.allclose(m.head.weight, W)
    assert torch.equal(m.P, torch.eye(8))


def test_dynamic_fusion_weights_per_sample():
    torch.manual_seed(0)
    sharp = torch.tensor([[8.0, 0, 0, 0]] * 3 + [[0.1, 0, 0, 0]] * 3)   # audio: confident on 0..2
    flat = torch.tensor([[0.1, 0, 0, 0]] * 3 + [[0, 9.0, 0, 0]] * 3)    # video: confident on 3..5
    w = C.fusion_weights([sharp, flat], "dynamic")
    assert w.shape == (6, 2)
    assert torch.allclose(w.sum(1), torch.ones(6))
    assert (w[:3, 0] > 0.5).all() and (w[3:, 1] > 0.5).all()             # lower entropy wins
    # the same sample in another batch gets the same weight; the batch-axis variant does not
    a, v = torch.randn(10, 4), torch.randn(10, 4)
    other_a, other_v = torch.cat([a[:1], 5 * torch.randn(9, 4)]), torch.cat([v[:1], torch.randn(9, 4)])
    assert torch.allclose(C.fusion_weights([a, v], "dynamic")[0], C.fusion_weights([other_a, other_v], "dynamic")[0])
    wb1, wb2 = C.fusion_weights([a, v], "dynamic_batch"), C.fusion_weights([other_a, other_v], "dynamic_batch")
    assert wb1.shape == (2,) and not torch.allclose(wb1, wb2)
    # formula: lambda_m = exp(max e - e_m) / sum_j exp(max e - e_j)
    e = torch.stack([-(u.softmax(1) * u.log_softmax(1)).sum(1) for u in (a, v)], 1)
    lam = torch.exp(e.max(1, keepdim=True).values - e)
    assert torch.allclose(C.fusion_weights([a, v], "dynamic"), lam / lam.sum(1, keepdim=True))


def test_mla_fixed_fusion_and_predict(tiny_encoders):
    m = C.MLA(tiny_encoders(5, 7), 4, MODS, fusion="fixed")
    xs, _, _ = batch()
    fused, (ua, uv) = m.predict(xs)
    assert torch.allclose(fused, 0.5 * ua + 0.5 * uv)
    m3 = C.MLA(tiny_encoders(5, 7, 3), 4, ["audio", "image", "text"], fusion="fixed")
    assert m3.fixed_weights == [0.35, 0.25, 0.4]


# ---------------------------------------------------------------------------------------------- OGM

def ogm_reference(method, xs, y):
    """The OGM-GE coefficients computed by hand from the concat head."""
    zs = [z.detach() for z in method.encode(xs)]
    W, b, d = method.head.weight.detach(), method.head.bias.detach(), zs[0].shape[1]
    out_a = zs[0] @ W[:, :d].T + b
    out_v = zs[1] @ W[:, d:].T + b
    s_a = out_a.softmax(1)[torch.arange(len(y)), y].sum().item()
    s_v = out_v.softmax(1)[torch.arange(len(y)), y].sum().item()
    alpha = method.alpha
    if s_a / s_v > 1:
        return [1 - math.tanh(alpha * s_a / s_v), 1.0]
    return [1.0, 1 - math.tanh(alpha * s_v / s_a)]


def grads_after_plain_backward(method, xs, y):
    ref = copy.deepcopy(method)
    F.cross_entropy(ref.fuse(ref.encode(xs)), y).backward()
    return [[p.grad.clone() for p in e.parameters()] for e in ref.encoders]


def test_ogm_scales_damped_encoder_only(tiny_encoders):
    torch.manual_seed(1)
    m = C.OGM(tiny_encoders(5, 7), 4, MODS, alpha=0.8)
    xs, y, idx = batch(n=32)
    with torch.no_grad():      # make audio dominant so that it is the damped one
        m.head.weight[:, :8] *= 6
    coeff = ogm_reference(m, xs, y)
    assert coeff[0] < 1 and coeff[1] == 1.0
    orig = grads_after_plain_backward(m, xs, y)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    step(m, xs, y, idx, opt, epoch=0, batch=0, steps=1)
    for e, (enc, g0) in enumerate(zip(m.encoders, orig)):
        for p, g in zip(enc.parameters(), g0):
            assert torch.allclose(p.grad, coeff[e] * g, atol=1e-7), f"encoder {e}"
    assert m.last_coeffs == pytest.approx(coeff)


def test_ogm_inactive_outside_modulation_epochs(tiny_encoders):
    m = C.OGM(tiny_encoders(5, 7), 4, MODS, alpha=0.8, starts=2, ends=3)
    xs, y, idx = batch()
    orig = grads_after_plain_backward(m, xs, y)
    step(m, xs, y, idx, torch.optim.SGD(m.parameters(), lr=0.0), epoch=4, batch=0, steps=1)
    assert all(torch.equal(p.grad, g) for e, g0 in zip(m.encoders, orig) for p, g in zip(e.parameters(), g0))


def test_ogm_ge_noise_has_gradient_std(tiny_encoders):
    torch.manual_seed(2)
    encs = tiny_encoders(5, 7, dim=64)
    m = C.OGM(encs, 4, MODS, alpha=0.5, ge=True)
    xs, y, idx = batch(n=64)
    coeff = ogm_reference(m, xs, y)
    orig = grads_after_plain_backward(m, xs, y)
    step(m, xs, y, idx, torch.optim.SGD(m.parameters(), lr=0.0), epoch=0, batch=0, steps=1)
    for e, (enc, g0) in enumerate(zip(m.encoders, orig)):
        w, g = enc.net[2].weight, g0[2]                       # a 64 x 16 weight: 1024 noise draws
        noise = w.grad - coeff[e] * g
        assert noise.std().item() == pytest.approx(g.std().item(), rel=0.15)
        assert abs(noise.mean().item()) < 0.2 * g.std().item()


def test_ogm_three_modality_coefficients():
    # rho_m = s_m / (sum of the others): only modality 2 exceeds 1
    s = [3.0, 2.0, 10.0]
    c = C.ogm_coefficients(s, 0.3)
    assert c[:2] == [1.0, 1.0]
    assert c[2] == pytest.approx(1 - math.tanh(0.3 * 10 / 5))
    # two modalities reduce to rho = s_a / s_v
    assert C.ogm_coefficients([6.0, 2.0], 0.5) == pytest.approx([1 - math.tanh(1.5), 1.0])
    assert C.ogm_coefficients([2.0, 6.0], 0.5) == pytest.approx([1.0, 1 - math.tanh(1.5)])


# ---------------------------------------------------------------------------------------------- QMF

def test_qmf_confidence_is_detached_energy(tiny_encoders):
    m = C.QMF(tiny_encoders(5, 7), 4, MODS, num_train=12)
    ua, uv = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    m.heads = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    fused, _ = m.logits([ua, uv])
    ca, cv = torch.logsumexp(ua, 1) / 10, torch.logsumexp(uv, 1) / 10
    assert torch.allclose(fused, ca[:, None] * ua + cv[:, None] * uv)
    fused.sum().backward()
    # d fused / d logits is the confidence alone: no gradient flows through it
    assert torch.allclose(ua.grad, ca.detach()[:, None].expand(6, 4))
    assert torch.allclose(uv.grad, cv.detach()[:, None].expand(6, 4))


def test_qmf_rank_loss_zero_for_equal_histories(tiny_encoders):
    m = C.QMF(tiny_encoders(5, 7), 4, MODS, num_train=12)
    conf = torch.randn(12) * 5
    idx = torch.arange(12)
    m.history.fill_(3.0)
    assert m.rank_loss(conf, idx, 0).item() == 0.0
    # unequal histories: the harder sample (higher loss history) must be less confident
    m.history[0] = torch.arange(12, dtype=torch.float64)
    conf_bad = torch.arange(12, dtype=torch.float32)            # confidence rises with difficulty
    assert m.rank_loss(conf_bad, idx, 0).item() > 0
    conf_good = -torch.arange(12, dtype=torch.float32) * 2       # falls with it, by more than the margin
    pairs = torch.arange(11)                                     # the wrap-around pair is (11, 0)
    assert m.rank_loss(conf_good[pairs], pairs, 0).item() == 0.0


def test_qmf_code_rank_subtracts_the_margin(tiny_encoders):
    """QingyangZhang/QMF: rank_input2 + rank_margin / rank_target_nonzero with target -rank_target is
    relu(t (c_i - c_j) - m): zero until the harder sample is more confident by more than the margin."""
    paper = C.QMF(tiny_encoders(5, 7), 4, MODS, num_train=6)
    code = C.QMF(tiny_encoders(5, 7), 4, MODS, num_train=6, rank="code")
    h = torch.tensor([0.0, 4.0, 1.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    paper.history[0], code.history[0] = h, h
    conf, idx = torch.tensor([0.2, 0.9, -0.3, 0.1, 0.5, 0.0]), torch.arange(6)
    hn = (h - h.min()) / (h.max() - h.min())
    t, margin = torch.sign(hn - hn.roll(-1)).float(), (hn - hn.roll(-1)).abs().float()
    diff = conf - conf.roll(-1)
    assert torch.allclose(code.rank_loss(conf, idx, 0), F.relu(t * diff - margin).mean())
    assert torch.allclose(paper.rank_loss(conf, idx, 0), F.relu(t * diff + margin).mean())
    assert code.rank_loss(conf, idx, 0) < paper.rank_loss(conf, idx, 0)


def test_qmf_history_accumulates_across_epochs(tiny_encoders):
    torch.manual_seed(0)
    m = C.QMF(tiny_encoders(5, 7), 4, MODS, num_train=20)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    xs, y, _ = batch(n=6)
    idx = torch.tensor([3, 5, 7, 11, 13, 19])
    with torch.no_grad():
        per = [F.cross_entropy(u, y, reduction="none").double() for u in m.logits(m.encode(xs))[1]]
    for epoch in range(3):
        step(m, xs, y, idx, opt, epoch=epoch, batch=0, steps=1)
        for k in range(2):
            assert torch.allclose(m.history[k, idx], (epoch + 1) * per[k], atol=1e-6)
    others = torch.ones(20, dtype=torch.bool)
    others[idx] = False
    assert (m.history[:, others] == 0).all()
    assert "history" in m.state_dict()


# ---------------------------------------------------------------------------------------------- others

def test_late_fusion_branches_independent(tiny_encoders):
    torch.manual_seed(0)
    m = C.LateFusion(tiny_encoders(5, 7), 4, MODS)
    xs, y, idx = batch()
    grads = []
    for v in (xs[1], 100 * torch.randn_like(xs[1])):
        mm = copy.deepcopy(m)
        step(mm, [xs[0], v], y, idx, torch.optim.SGD(mm.parameters(), lr=0.0), epoch=0)
        grads.append([p.grad.clone() for p in list(mm.encoders[0].parameters()) + list(mm.heads[0].parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("name", ["concat", "film", "bigated", "ogm"])
def test_fused_feature_methods_unimodal_zeroes_others(name, tiny_encoders):
    m = C.build_method(name, tiny_encoders(5, 7), 4, MODS, 12)
    xs, _, _ = batch()
    zs = m.encode(xs)
    fused, (ua, uv) = m.predict(xs)
    assert torch.allclose(fused, m.fuse(zs))
    assert torch.allclose(ua, m.fuse([zs[0], torch.zeros_like(zs[1])]))
    assert torch.allclose(uv, m.fuse([torch.zeros_like(zs[0]), zs[1]]))


def test_sum_method_fused_is_sum_of_heads(tiny_encoders):
    m = C.Sum(tiny_encoders(5, 7), 4, MODS)
    xs, _, _ = batch()
    fused, (ua, uv) = m.predict(xs)
    zs = m.encode(xs)
    assert torch.allclose(ua, m.heads[0](zs[0])) and torch.allclose(fused, ua + uv)


def test_encoders_of_different_widths_are_a_clear_error(tiny_encoders):
    with pytest.raises(ValueError, match=r"encoders of widths \[8, 4\]; the methods expect one width"):
        C.MLA([*tiny_encoders(5, dim=8), *tiny_encoders(7, dim=4)], 3, ["a", "b"])
    assert C.MLA([*tiny_encoders(5, dim=8), C.Projected(*tiny_encoders(7, dim=4), 8)], 3, ["a", "b"]).dim == 8


# ---------------------------------------------------------------------------------------------- MMCosine, MMPareto

def test_mmcosine_logits_are_scaled_cosines_summed():
    encoders = [torch.nn.Identity(), torch.nn.Identity()]
    for e in encoders:
        e.dim = 2
    m = C.MMCosine(encoders, 2, MODS)
    with torch.no_grad():
        m.heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        m.heads[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    fused, unis = m.logits([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 5.0]])])
    assert torch.allclose(unis[0], torch.tensor([[6.0, 8.0]])) and torch.allclose(unis[1], torch.tensor([[10.0, 0.0]]))
    assert torch.allclose(fused, torch.tensor([[16.0, 8.0]]))
    assert all(h.bias is None for h in m.heads)
    again, _ = m.logits([torch.tensor([[30.0, 40.0]]), torch.tensor([[0.0, 0.5]])])     # scale-free
    assert torch.allclose(again, fused)


@pytest.mark.parametrize("g, u, expected", [
    ([1.0, 0.0], [-1.0, 1.0], [0.6708, 1.3416]),     # conflict: min-norm c = 0.6, scaled to |g + u|, x 1.5
    ([1.0, 0.0], [1.0, 1.0], [3.0, 1.5]),            # agreement: c = 1/2, n = g + u, x 1.5
])
def test_mmpareto_gradient_by_hand(g, u, expected):
    [out] = C.pareto_grads([torch.tensor(g)], [torch.tensor(u)])
    assert torch.allclose(out, torch.tensor(expected), atol=1e-4)


def test_mmpareto_step_sets_encoder_gradients_from_its_two_losses(tiny_encoders):
    torch.manual_seed(0)
    m = C.MMPareto(tiny_encoders(5, 7), 4, MODS)
    ref = copy.deepcopy(m)
    xs, y, _ = batch()
    seen = {}
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    opt.step = lambda closure=None: seen.update({n: p.grad.clone() for n, p in m.named_parameters()})
    m.train_step(xs, y, opt)
    fused, unis = ref.logits(ref.encode(xs))
    losses = [F.cross_entropy(fused, y)] + [F.cross_entropy(u, y) for u in unis]
    for k, f in enumerate(ref.encoders):
        ps = list(f.parameters())
        g = torch.autograd.grad(losses[0], ps, retain_graph=True)
        u = torch.autograd.grad(losses[1 + k], ps, retain_graph=True)
        for (name, _), want in zip(f.named_parameters(), C.pareto_grads(list(g), list(u))):
            assert torch.allclose(seen[f"encoders.{k}.{name}"], want, atol=1e-6)
    heads = [(n, p) for n, p in ref.named_parameters() if not n.startswith("encoders")]
    for (name, p), want in zip(heads, torch.autograd.grad(sum(losses), [p for _, p in heads])):
        assert torch.allclose(seen[name], want, atol=1e-6)


def test_mla_alpha_scale_with_a_zero_first_hbar_keeps_P_finite():
    m = linear_mla(hgm_alpha_scale=True)
    m.head.weight.grad = torch.ones(3, 4)
    m.project_head_grad(torch.zeros(4), 0.1, 0)
    m.project_head_grad(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.1, 0)
    assert torch.isfinite(m.P).all() and m.P[0, 0] < 1


# ---------------------------------------------------------------------------------------------- AGM

def test_agm_coefficients_by_hand():
    c = C.agm_coefficients(torch.tensor([0.5, 1.5]).double(), torch.tensor([0.8, 1.2]).double(), 1.0)
    assert torch.allclose(c, torch.tensor([0.293330, 1.353157]).double(), atol=1e-6)
    c3 = C.agm_coefficients(torch.tensor([0.5, 1.0, 1.5]).double(), torch.tensor([0.9, 1.0, 1.1]).double(), 1.0)
    assert torch.allclose(c3, torch.tensor([0.384748, 1.0, 1.474533]).double(), atol=1e-6)


class Lin(torch.nn.Linear):
    def __init__(self, d_in, dim):
        super().__init__(d_in, dim, bias=False)      # zero input -> zero features: an additive model
        self.dim = dim


def test_agm_shapley_responses_and_scaled_gradients():
    """Additive model: phi_m = W_m z_m + b / M, sum = the full output; a step scales the gradient reaching
    modality m by c_m (the running means start at 0, so eta = 1), and the running means become the scores."""
    torch.manual_seed(0)
    m = C.AGM([Lin(5, 3), Lin(7, 3)], 4, MODS)
    xs, y, _ = batch()
    xs = [0.1 * x for x in xs]                                   # small: no clipping
    zs = m.encode(xs)
    W, b = m.head.weight, m.head.bias
    phis = m.responses(xs)
    assert torch.allclose(phis[0], zs[0] @ W[:, :3].T + b / 2, atol=1e-6)
    assert torch.allclose(sum(phis), m.fuse(zs), atol=1e-6)
    s = torch.stack([F.cross_entropy(p, y) for p in phis]).double()
    c = C.agm_coefficients(s, torch.zeros(2).double(), 1.0)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    m.train_step(xs, y, opt)
    F.cross_entropy(ref.fuse(ref.encode(xs)), y).backward()
    for k in range(2):
        assert torch.allclose(m.encoders[k].weight.grad, c[k].float() * ref.encoders[k].weight.grad, atol=1e-6)
    assert torch.allclose(m.running, s, atol=1e-6) and m.steps == 1


def test_agm_clips_to_norm_1_only_when_a_head_gradient_exceeds_1():
    for scale, clipped in ((100.0, True), (0.01, False)):
        torch.manual_seed(0)
        m = C.AGM([Lin(5, 3), Lin(7, 3)], 4, MODS)
        xs, y, _ = batch()
        seen = {}
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        opt.step = lambda closure=None: seen.update(norm=nn_utils_norm(m))
        m.train_step([scale * x for x in xs], y, opt)
        if clipped:
            assert abs(seen["norm"] - 1.0) < 1e-4
        else:                                   # small gradients stay as they came (their values: the test above)
            assert 0 < seen["norm"] < 1.0


def nn_utils_norm(m):
    return float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None]))


def test_agm_holds_its_last_coefficients_after_its_epochs():
    """After `epochs` (20: epochs 0..19), as the authors' hooks: the coefficients (2, 0.5) stay and still scale
    the gradients; the head's bias, reached by the full pass (x (2 + 0.5) / 2) and the two dropped ones
    (x (2 - 0.5) / 2 and (0.5 - 2) / 2), gets 1.25 x plain concat's."""
    torch.manual_seed(0)
    m = C.AGM([Lin(5, 3), Lin(7, 3)], 4, MODS)
    m.schedule(19, 0, 1)
    assert m.active
    xs, y, _ = batch()
    xs = [0.1 * x for x in xs]                                   # small: no clipping
    m.coeffs.copy_(torch.tensor([2.0, 0.5]))
    ref = copy.deepcopy(m)
    step(m, xs, y, None, torch.optim.SGD(m.parameters(), lr=0.0), epoch=20)
    assert not m.active and m.coeffs.tolist() == [2.0, 0.5] and m.steps == 0
    F.cross_entropy(ref.fuse(ref.encode(xs)), y).backward()
    assert torch.allclose(m.head.bias.grad, 1.25 * ref.head.bias.grad, atol=1e-6)
    for k, c in enumerate((2.0, 0.5)):
        assert torch.allclose(m.encoders[k].weight.grad, c * ref.encoders[k].weight.grad, atol=1e-6)


def test_agm_caps_the_gap_at_7_with_three_modalities():
    """Running means (0, 0, 12): eta = exp(1.5 x 4) = 403.4 for the first two, over the scores' r = 1 by more than
    the cap 7 (the authors' URFunny script; 10 with two modalities): c = exp(7); the third exp(exp(-12) - 1)."""
    assert C.AGM([Lin(5, 3), Lin(7, 3)], 4, MODS).cap == 10
    assert C.AGM([Lin(5, 3), Lin(7, 3), Lin(6, 3)], 4, MODS + ["text"]).cap == 7
    c = C.agm_coefficients(torch.tensor([4.0, 4.0, 4.0]).double(), torch.tensor([0.0, 0.0, 12.0]).double(), 1.0, 7)
    assert torch.allclose(c, torch.tensor([math.exp(7), math.exp(7), math.exp(math.exp(-12) - 1)]).double())


def test_agm_runs_the_full_pass_first_then_the_dropped_ones_in_eval_mode():
    """The authors' order: BatchNorm's statistics take this batch's full pass before the eval-mode passes use them."""
    m = C.AGM([Lin(5, 3), Lin(7, 3)], 4, MODS)
    seen = []
    m.head.register_forward_hook(lambda mod, inp, out: seen.append((mod.training, inp[0].split(3, 1)[0].any().item(),
                                                                     inp[0].split(3, 1)[1].any().item())))
    m.responses(batch()[0])
    assert seen == [(True, True, True), (False, True, False), (False, False, True)] and m.training


# ---------------------------------------------------------------------------------------------- G-Blending, PMR, ReconBoost

class Pairs(torch.utils.data.Dataset):
    """(x_audio, x_video, label, index) items, as the scripts' data sets give them."""

    def __init__(self, n=40, seed=0):
        (self.a, self.v), self.y, _ = batch(n=n, seed=seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.a[i], self.v[i], self.y[i], i


def test_gblending_weights_by_hand():
    start = torch.tensor([[1.8, 1.9], [1.6, 1.75], [1.5, 1.7]]).double()      # (train, val) loss per head
    end = torch.tensor([[1.4, 1.7], [0.9, 1.35], [0.6, 1.4]]).double()        # audio, video, fused
    assert torch.allclose(C.gb_weights(start, end), torch.tensor([0.4865, 0.4324, 0.0811]).double(), atol=1e-4)
    worse = end.clone()
    worse[0, 1] = 1.95                          # audio's validation loss rose: no gain, a weight of ~0
    w = C.gb_weights(start, worse)
    assert w[0] < 1e-6 and abs(float(w.sum()) - 1) < 1e-12


def test_gblending_abs_gain_weighs_a_rising_validation_loss_by_its_rise():
    """--gb_abs_gain (BalanceBenchmark's |G| / O^2): branch 0's validation loss rose by 0.5 with its gap grown by 1
    (0.5 / 1); branch 1 gained 0.2 with its gap grown by 0.4 (0.2 / 0.16 = 1.25): 2/7 and 5/7; by default ~0 and ~1."""
    start = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).double()
    end = torch.tensor([[0.5, 1.5], [0.4, 0.8]]).double()
    assert torch.allclose(C.gb_weights(start, end, abs_gain=True), torch.tensor([2 / 7, 5 / 7]).double())
    assert torch.allclose(C.gb_weights(start, end), torch.tensor([0.0, 1.0]).double(), atol=1e-7)
    m = C.build_method("gblending", [Lin(5, 3), Lin(7, 3)], 4, MODS, super_epoch=3, abs_gain=True)
    assert (m.super_epoch, m.abs_gain) == (3, True)


def test_gblending_step_is_the_weighted_sum_of_the_heads_ces(tiny_encoders):
    m = C.GBlending(tiny_encoders(5, 7), 4, MODS)
    m.weights.copy_(torch.tensor([0.2, 0.5, 0.3]))
    xs, y, _ = batch()
    fused, unis = m.logits(m.encode(xs))
    want = 0.2 * F.cross_entropy(unis[0], y) + 0.5 * F.cross_entropy(unis[1], y) + 0.3 * F.cross_entropy(fused, y)
    assert torch.allclose(m.train_step(xs, y, torch.optim.SGD(m.parameters(), lr=0.0)), want)
    assert torch.equal(m.predict(xs)[0], fused.detach())                       # predicts with the fused head


def test_gblending_estimates_its_weights_on_copies_every_super_epoch(tiny_encoders):
    torch.manual_seed(0)
    m = C.GBlending(tiny_encoders(5, 7), 4, MODS, super_epoch=2)
    loaders = {s: C.make_loader(Pairs(seed=i), 8, False) for i, s in enumerate(("train", "val"))}   # fixed order
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    ref = copy.deepcopy(m)
    m.start_epoch(0, 4, loaders, opt, "cpu")
    assert same(params(ref), params(m)) and not opt.state           # the copies trained, not the model

    @torch.no_grad()
    def mean_ce(model, k, split):
        model.eval()
        return sum(F.cross_entropy(model.branch([a, v], k), y, reduction="sum") for a, v, y, _ in loaders[split]) / 40

    start, end = [[mean_ce(ref, k, s) for s in ("train", "val")] for k in range(3)], []
    for k in range(3):                                              # by hand: branch k alone for the super-epoch
        twin = copy.deepcopy(ref)
        sgd = torch.optim.SGD(twin.branch_params(k), lr=0.1, momentum=0.9)
        for _ in range(2):
            for a, v, y, _ in loaders["train"]:
                C.optimizer_step(sgd, F.cross_entropy(twin.branch([a, v], k), y))
        end.append([mean_ce(twin, k, s) for s in ("train", "val")])
    want = C.gb_weights(torch.tensor(start).double(), torch.tensor(end).double())
    assert torch.allclose(m.weights, want.float(), atol=1e-6) and not torch.allclose(want, torch.full((3,), 1 / 3).double())
    w = m.weights.clone()
    m.start_epoch(1, 4, loaders, opt, "cpu")                     # within the super-epoch: kept
    assert torch.equal(m.weights, w) and m.epoch_log() == {"gb_weights": [round(v, 6) for v in w.tolist()]}
    assert "weights" in m.state_dict()                              # saved with the model: --resume keeps them
    with pytest.raises(ValueError, match="validation split"):
        m.start_epoch(2, 4, {"train": loaders["train"], "val": None}, opt, "cpu")


class Ident(torch.nn.Identity):
    dim = 2


def test_pmr_loss_by_hand():
    """Features a, v (identity encoders) and prototypes as below: CE(fused) 0.302637; prototype scores give
    rho_audio = 1.124158, so video is the weaker (its PCE 0.441716 x 0.124158) and audio's entropy (summed over
    the batch: 1.166188) is raised with the same coefficient x mu while epoch <= entropy_ends."""
    m = C.PMR([Ident(), Ident()], 2, MODS)
    with torch.no_grad():
        m.head.weight.copy_(torch.tensor([[1.0, 0, 0.5, 0.5], [0, 1.0, -0.5, -0.5]]))
        m.head.bias.copy_(torch.tensor([0.1, -0.1]))
        m.prototypes.copy_(torch.tensor([[[1.0, 0], [0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]]]))
    xs, y = [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.5, 0.2], [0.1, -0.3]])], torch.tensor([0, 1])
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    assert abs(float(step(m, xs, y, None, opt, epoch=0)) - 0.356031) < 1e-6
    assert abs(float(step(m, xs, y, None, opt, epoch=11)) - (0.302637 + 0.124158 * 0.441716)) < 1e-6
    assert abs(float(step(m, xs, y, None, opt, epoch=70)) - (0.302637 + 0.124158 * 0.441716)) < 1e-6
    assert abs(float(step(m, xs, y, None, opt, epoch=71)) - 0.302637) < 1e-6      # after --pmr_ends 70: CE only
    rho, weak, dominant = C.pmr_coefficients(torch.tensor([1.0, 2.0, 3.0]))       # three modalities
    assert torch.allclose(rho, torch.tensor([0.4, 1.0, 2.0])) and weak.tolist() == [1, 0, 0]
    assert dominant.tolist() == [0, 0, 1]
    _, weak, dominant = C.pmr_coefficients(torch.tensor([1.456350, 1.295503]), binary=True)   # the released script
    assert weak.tolist() == [0, 1] and dominant.tolist() == [1, 0]


def test_pmr_prototypes_are_class_means_of_a_tenth_of_the_training_batches():
    m = C.PMR([Ident(), Ident()], 4, MODS, momentum=0.5)
    data = Pairs(n=40)
    data.a, data.v = data.a[:, :2], data.v[:, :2]
    loaders = {"train": C.make_loader(data, 2, False)}         # unshuffled: batches 0 and 1 are items 0-3
    m.start_epoch(0, 2, loaders, None, "cpu")
    y = data.y[:4]
    for k in range(4):
        want = data.a[:4][y == k].mean(0) if (y == k).any() else torch.zeros(2)    # unseen: kept (0)
        assert torch.allclose(m.prototypes[0, k], want)
    old = m.prototypes.clone()
    data.a = data.a + 1.0
    seen = torch.bincount(y, minlength=4) > 0
    m.start_epoch(1, 3, loaders, None, "cpu")              # after epoch 0: the new means (as the authors')
    assert torch.allclose(m.prototypes[0, seen], old[0, seen] + 1.0)
    data.a = data.a + 1.0
    m.start_epoch(2, 3, loaders, None, "cpu")              # then momentum 0.5 of the old prototype
    assert torch.allclose(m.prototypes[0, seen], old[0, seen] + 1.5)
    assert torch.equal(m.prototypes[0, ~seen], old[0, ~seen])


def test_pmr_val_prototypes_are_class_means_of_the_whole_validation_split():
    m = C.PMR([Ident(), Ident()], 4, MODS, val_prototypes=True)
    train, val = Pairs(n=40), Pairs(n=40, seed=1)
    for d in (train, val):
        d.a, d.v = d.a[:, :2], d.v[:, :2]
    m.start_epoch(0, 2, {"train": C.make_loader(train, 2, False), "val": C.make_loader(val, 2, False)}, None, "cpu")
    for k in range(4):                                         # every validation item, none of the training ones
        assert torch.allclose(m.prototypes[1, k], val.v[val.y == k].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="--pmr_val_prototypes takes the prototypes from the validation split"):
        m.start_epoch(1, 2, {"train": C.make_loader(train, 2, False), "val": None}, None, "cpu")


def test_reconboost_loss_by_hand():
    z0 = torch.tensor([[2.0, 0.5, -1.0], [0.2, 0.1, 1.5]])          # the others' ensemble (detached)
    z1 = torch.tensor([[0.3, 1.2, -0.4], [1.0, -0.5, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = C.reconboost_loss(z1, z0, y)
    assert abs(loss.item() - 2.025647) < 1e-6
    loss.backward()
    assert torch.allclose(z1.grad, torch.tensor([[-0.524856, 0.436690, 0.088166],
                                                 [0.454819, 0.101484, -0.556303]]), atol=1e-6)
    first = C.reconboost_loss(z1, None, y)                           # stage 0: no ensemble yet, q_y = 1
    assert torch.allclose(first, (5 - 1) / 3 * F.cross_entropy(z1, y))


def test_reconboost_stages_then_rectification_with_fresh_optimizer_state(tiny_encoders):
    torch.manual_seed(0)
    m = C.ReconBoost(tiny_encoders(5, 7), 4, MODS, stage_epochs=2, correct_epochs=1)
    opt = SpyOptimizer(m, lr=0.1, momentum=0.9, weight_decay=1e-2)
    clears = []

    class State(collections.defaultdict):       # the optimizer's state, counting when it is cleared
        def clear(self):
            clears.append(len(opt.log))
            super().clear()
    opt.state = State(dict)
    members, boost = [], []
    for epoch in range(6):
        for s in range(2):
            xs, y, idx = batch(seed=s)
            head = params(m.head)
            step(m, xs, y, idx, opt, epoch=epoch, batch=s, steps=2)
            assert not same(head, params(m.head))                   # the shared head trains in every phase
            boost.append(m.boost_rate.grad is not None)
        members.append(m.members.tolist())
    assert boost == [False] * 4 + [True] * 2 + [False] * 4 + [True] * 2      # boost_rate: the rectification's
    # audio's stage, the rectification of the ensemble so far (audio alone), video's stage, both
    trained = [[True, False]] * 6 + [[False, True]] * 4 + [[True, True]] * 2
    assert [had for had, _ in opt.log] == trained and [moved for _, moved in opt.log] == trained
    assert clears == [0, 4, 6, 10]                   # each phase (stage or rectification) starts afresh
    assert members == [[True, False]] * 3 + [[True, True]] * 3
    fused, unis = m.predict(xs)
    assert torch.allclose(fused, m.boost_rate * (unis[0] + unis[1]))
