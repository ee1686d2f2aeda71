"""The Table 5 methods with three modalities (audio, image, text): OGM, MLA's steps and projection, fusion."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common as C
from conftest import step
from test_methods import SpyOptimizer, grads_after_plain_backward, params, same

MODS = ["audio", "image", "text"]
D_IN = (5, 7, 6)


def batch(n=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for d in D_IN], torch.randint(0, classes, (n,), generator=g), torch.arange(n)


def test_ogm_three_modalities_damps_the_dominant_encoder_by_hand_computed_coefficient(tiny_encoders):
    torch.manual_seed(1)
    m = C.OGM(tiny_encoders(*D_IN), 4, MODS, alpha=0.8)
    xs, y, idx = batch(n=32)
    with torch.no_grad():            # make the text dominant: it names the class, and its head part reads it
        xs[2] = torch.cat([F.one_hot(y, 4).float(), torch.zeros(32, 2)], 1)
        m.encoders[2] = torch.nn.Linear(6, 8)
        m.encoders[2].weight.copy_(torch.eye(8, 6))
        m.head.weight[:, 16:] = 6 * torch.eye(4, 8)
    zs = [z.detach() for z in m.encode(xs)]
    W, b = m.head.weight.detach(), m.head.bias.detach()
    s = [(z @ W[:, 8 * k:8 * k + 8].T + b).softmax(1)[torch.arange(32), y].sum().item() for k, z in enumerate(zs)]
    rho = [s[k] / (sum(s) - s[k]) for k in range(3)]           # each score over the sum of the other two
    assert rho[2] > 1 and rho[0] < 1 and rho[1] < 1
    coeff = [1.0, 1.0, 1 - math.tanh(0.8 * rho[2])]
    orig = grads_after_plain_backward(m, xs, y)
    step(m, xs, y, idx, torch.optim.SGD(m.parameters(), lr=0.0), epoch=0, batch=0, steps=1)
    assert m.last_coeffs == pytest.approx(coeff)
    for e, (enc, g0) in enumerate(zip(m.encoders, orig)):
        for p, g in zip(enc.parameters(), g0):
            assert torch.allclose(p.grad, coeff[e] * g, atol=1e-7), f"encoder {e}"
    # by hand on given scores: rho = (2/9, 3/8, 6/5); only the text is damped
    assert C.ogm_coefficients([2.0, 3.0, 6.0], 0.3) == pytest.approx([1.0, 1.0, 1 - math.tanh(0.3 * 6 / 5)])
    assert C.ogm_coefficients([3.0, 3.0, 3.0], 0.3) == [1.0, 1.0, 1.0]       # balanced: nobody is damped


def test_mla_three_steps_each_move_only_their_own_encoder_and_the_head(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(*D_IN), 4, MODS)
    opt = SpyOptimizer(m, lr=0.1, momentum=0.9, weight_decay=1e-2)        # momentum and decay would leak
    heads, Ps = [], []
    real_step = opt.step

    def spy_step(closure=None):
        before = params(m.head)
        real_step(closure)
        heads.append(not same(before, params(m.head)))
        Ps.append(m.P.clone())

    opt.step = spy_step
    for s in range(2):
        xs, y, idx = batch(seed=s)
        step(m, xs, y, idx, opt, epoch=0, batch=s, steps=2)
    assert len(opt.log) == 6                                  # three steps per batch
    for i, (had_grad, moved) in enumerate(opt.log):
        mod = i % 3
        assert had_grad == [j == mod for j in range(3)], f"step {i}: only encoder {mod} may get a gradient"
        assert moved == [j == mod for j in range(3)], f"step {i}: only encoder {mod} may move"
    assert all(heads), "every step updates the shared head"
    assert all(not torch.equal(a, b) for a, b in zip(Ps, Ps[1:])), "every step absorbs its features into P"


def test_mla_projection_protects_the_features_of_both_earlier_steps(tiny_encoders):
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(*D_IN), 4, MODS, hgm_alpha=1e-3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)             # plain SGD: dW = -lr * grad
    xs, y, idx = batch()
    hbars, grads, Ws = [], [], []
    orig = m.project_head_grad

    def spy(hbar, alpha, mod=0):         # called inside each modality's step, before its optimizer step
        hbars.append(hbar.clone())
        grads.append(m.head.weight.grad.clone())
        Ws.append(m.head.weight.detach().clone())
        orig(hbar, alpha, mod)

    m.project_head_grad = spy
    step(m, xs, y, idx, opt, epoch=0, batch=0, steps=1)
    h1, h2 = hbars[0], hbars[1]
    dW2, dW3 = Ws[2] - Ws[1], m.head.weight.detach() - Ws[2]
    rel = lambda dW, h: ((dW @ h).norm() / (dW.norm() * h.norm())).item()
    assert dW3.norm() > 0 and dW2.norm() > 0
    assert rel(dW2, h1) < 1e-2                                 # step 2 protects step 1
    assert rel(dW3, h1) < 1e-2 and rel(dW3, h2) < 1e-2, "step 3's head update must be orthogonal to h1 and h2"
    # the unprojected gradient of step 3 is not orthogonal to them
    assert rel(grads[2], h1) > 10 * rel(dW3, h1) and rel(grads[2], h2) > 10 * rel(dW3, h2)


def test_fusion_weights_over_three_modalities(tiny_encoders):
    torch.manual_seed(0)
    a, i, t = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    t[:3] = torch.tensor([9.0, 0, 0, 0])                       # the text is sure on samples 0..2
    a[3:] = torch.tensor([0, 9.0, 0, 0])                       # the audio on 3..5
    w = C.fusion_weights([a, i, t], "dynamic")
    assert w.shape == (6, 3) and torch.allclose(w.sum(1), torch.ones(6))
    assert (w[:3].argmax(1) == 2).all() and (w[3:].argmax(1) == 0).all()
    e = torch.stack([-(u.softmax(1) * u.log_softmax(1)).sum(1) for u in (a, i, t)], 1)
    lam = torch.exp(e.max(1, keepdim=True).values - e)
    assert torch.allclose(w, lam / lam.sum(1, keepdim=True))
    assert C.fusion_weights([a, i, t], "dynamic_batch").shape == (3,)
    # fixed: the paper's audio / image / text weights by default, or the given ones
    m = C.MLA(tiny_encoders(*D_IN), 4, MODS, fusion="fixed")
    xs, _, _ = batch()
    fused, (ua, ui, ut) = m.predict(xs)
    assert m.fixed_weights == [0.35, 0.25, 0.4]
    assert torch.allclose(fused, 0.35 * ua + 0.25 * ui + 0.4 * ut)
    m = C.MLA(tiny_encoders(*D_IN), 4, MODS, fusion="fixed", fusion_weights=[0.2, 0.3, 0.5])
    fused, (ua, ui, ut) = m.predict(xs)
    assert torch.allclose(fused, 0.2 * ua + 0.3 * ui + 0.5 * ut)
    with pytest.raises(ValueError, match="has 2 values; expected 3"):
        C.fusion_weights([a, i, t], "fixed", [0.5, 0.5])


def test_film_and_bigated_condition_on_audio_and_modulate_both_others(tiny_encoders):
    args = dict(condition="audio")
    xs, _, _ = batch()
    film = C.build_method("film", tiny_encoders(*D_IN), 4, MODS, 12, **args)
    za, zi, zt = film.encode(xs)
    gamma, beta = film.film(za).chunk(2, 1)
    assert film.condition == 0 and film.head.in_features == 16
    assert torch.allclose(film.fuse([za, zi, zt]), film.head(torch.cat([gamma * zi + beta, gamma * zt + beta], 1)))
    gated = C.build_method("bigated", tiny_encoders(*D_IN), 4, MODS, 12, **args)
    za, zi, zt = gated.encode(xs)
    g = torch.sigmoid(gated.hidden[0](za))
    expected = gated.head(torch.cat([g * gated.hidden[1](zi), g * gated.hidden[2](zt)], 1))
    assert torch.allclose(gated.fuse([za, zi, zt]), expected)


@pytest.mark.parametrize("name", ["concat", "film", "bigated", "ogm"])
def test_fused_feature_methods_unimodal_zeroes_the_two_others(name, tiny_encoders):
    m = C.build_method(name, tiny_encoders(*D_IN), 4, MODS, 12,
                       **({"condition": "audio"} if name in ("film", "bigated") else {}))
    xs, _, _ = batch()
    zs = m.encode(xs)
    fused, unis = m.predict(xs)
    assert torch.allclose(fused, m.fuse(zs))
    for k in range(3):
        alone = [z if j == k else torch.zeros_like(z) for j, z in enumerate(zs)]
        assert torch.allclose(unis[k], m.fuse(alone))


def test_per_head_methods_fuse_three_heads(tiny_encoders):
    xs, y, idx = batch()
    s = C.Sum(tiny_encoders(*D_IN), 4, MODS)
    fused, unis = s.predict(xs)
    assert len(unis) == 3 and torch.allclose(fused, unis[0] + unis[1] + unis[2])
    lf = C.LateFusion(tiny_encoders(*D_IN), 4, MODS)
    fused, unis = lf.predict(xs)
    assert torch.allclose(fused, (unis[0] + unis[1] + unis[2]) / 3)
    q = C.QMF(tiny_encoders(*D_IN), 4, MODS, num_train=12)
    assert q.history.shape == (3, 12)
    step(q, xs, y, idx, torch.optim.SGD(q.parameters(), lr=0.0), epoch=0, batch=0, steps=1)
    assert (q.history > 0).all(), "every modality's history grows"
    fused, unis = q.predict(xs)
    conf = [torch.logsumexp(u, 1, keepdim=True) / 10 for u in unis]
    assert torch.allclose(fused, sum(c * u for c, u in zip(conf, unis)), atol=1e-6)


def test_late_fusion_three_branches_independent(tiny_encoders):
    torch.manual_seed(0)
    m = C.LateFusion(tiny_encoders(*D_IN), 4, MODS)
    xs, y, idx = batch()
    grads = []
    for noise in (xs[2], 100 * torch.randn_like(xs[2])):       # another text changes nothing for the audio
        mm = copy.deepcopy(m)
        step(mm, [xs[0], xs[1], noise], y, idx, torch.optim.SGD(mm.parameters(), lr=0.0), epoch=0)
        grads.append([p.grad.clone() for p in list(mm.encoders[0].parameters()) + list(mm.heads[0].parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
