"""Table 6: the missing mask, the feature loaders, the methods' behaviour with missing views, and
train_missing.py through its own entry point."""
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import train_missing
from conftest import command_line, options, own_log, step

MODS = ["audio", "visual", "text"]
TINY = ["--toy_train", "64", "--toy_val", "32", "--toy_test", "32", "--toy_dims", "6,7,8", "--hidden", "16",
        "--epochs", "1", "--batch_size", "32", "--code_steps", "2", "--cca_dim", "4", "--dcca_dim", "3", "--ae_widths", "16,8",
        "--ae_blocks", "2", "--tate_heads", "2", "--tate_layers", "1"]


def argv(out, *extra):
    return ["--out_dir", str(out), *TINY, *extra]


# ---------------------------------------------------------------------------------------------- mask

@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.6])
def test_mask_fraction_and_one_view_kept(rate):
    mask = C.missing_mask(997, 3, rate, seed=4)
    assert mask.shape == (997, 3) and mask.dtype == bool
    assert abs((1 - mask.mean()) - rate) < 1e-3                    # round(rate * n * M) entries removed
    assert mask.any(1).all()                                        # every sample keeps a view
    per_view = 1 - mask.mean(0)
    assert np.all(np.abs(per_view - rate) < 0.06)                   # no view is favoured


def test_mask_above_the_cap_keeps_exactly_one_view():
    mask = C.missing_mask(500, 3, 0.7, seed=0)
    assert (mask.sum(1) == 1).all()                                 # (M-1)/M is the most that can go


def test_mask_deterministic_by_seed_and_split():
    a, b = C.missing_mask(200, 3, 0.5, seed=1), C.missing_mask(200, 3, 0.5, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, C.missing_mask(200, 3, 0.5, seed=2))
    assert not np.array_equal(a, C.missing_mask(200, 3, 0.5, seed=1, split=2))


def test_mask_identical_across_methods(tmp_path):
    train_missing.main(argv(tmp_path, "--method", "late_fusion,cca", "--seed", "3"))
    files = [np.load(tmp_path / "toy_missing" / m / "seed3" / "missing0.5" / "missing_mask.npz") for m in ("late_fusion", "cca")]
    assert set(files[0].files) == {"train", "val", "test"}
    for s in ("train", "val", "test"):
        assert np.array_equal(files[0][s], files[1][s])
        assert np.array_equal(files[0][s], C.missing_mask(len(files[0][s]), 3, 0.5, 3, split=["train", "val", "test"].index(s)))


# ---------------------------------------------------------------------------------------------- loaders

def write_npz(path, n=20, split=None, **override):
    rng = np.random.RandomState(0)
    arrays = {"audio": rng.randn(n, 3), "visual": rng.randn(n, 4), "text": rng.randn(n, 5),
              "label": np.arange(n) % 2,
              "split": np.array(["train"] * (n - 8) + ["val"] * 4 + ["test"] * 4) if split is None else split}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_features_npz_loads_widths_and_splits(tmp_path):
    d = C.load_features_npz(write_npz(tmp_path / "features.npz"))
    assert [x.shape[1] for x in d["train"][0]] == [3, 4, 5]
    assert [len(d[s][1]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert d["classes"] == ["0", "1"] and d["modalities"] == MODS
    named = C.load_features_npz(write_npz(tmp_path / "f2.npz", label=np.array(["sad", "angry "] * 10)))
    assert named["classes"] == ["angry", "sad"] and named["train"][1][0] == 1      # names stripped
    digits = C.load_features_npz(write_npz(tmp_path / "f3.npz", label=np.array(["10", "2", "9"] * 6 + ["2", "9"])))
    assert digits["classes"] == ["2", "9", "10"] and digits["train"][1][:3].tolist() == [2, 0, 1]
    one_hot = C.load_features_npz(write_npz(tmp_path / "f4.npz", label=np.eye(3)[np.arange(20) % 3]))
    assert one_hot["classes"] == ["0", "1", "2"] and one_hot["train"][1][:4].tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("override, message", [
    ({"text": np.zeros((19, 5))}, r"array text has shape \(19, 5\); expected \(20, width\)"),
    ({"split": np.array(["train"] * 10 + ["dev"] + ["test"] * 9)}, r"split value 'dev' \(row 10\); expected train, val or test"),
    ({"split": np.array(["train"] * 20)}, r"no sample with split 'test'"),
])
def test_features_npz_bad_input_names_file_and_expectation(tmp_path, override, message):
    path = write_npz(tmp_path / "features.npz", **override)
    with pytest.raises(C.DataError, match=f"{tmp_path}.*{message}"):
        C.load_features_npz(path)


def test_features_npz_missing_array(tmp_path):
    np.savez(tmp_path / "features.npz", audio=np.zeros((2, 2)), label=np.zeros(2))
    with pytest.raises(C.DataError, match="features.npz: no array split"):
        C.load_features_npz(tmp_path)
    with pytest.raises(C.DataError, match="features.npz: no array face, split; found audio, label"):
        C.load_features_npz(tmp_path, ["audio", "face"])
    np.savez(tmp_path / "features.npz", audio=np.zeros((2, 2)), label=np.zeros(2), split=np.array(["train", "test"]))
    with pytest.raises(C.DataError, match="features.npz: views audio; the missing-view methods need two or more"):
        C.load_features_npz(tmp_path)


def test_features_npz_views_are_the_other_arrays_in_file_order(tmp_path):
    rng = np.random.RandomState(0)
    split = np.array(["train"] * 12 + ["test"] * 8)
    np.savez(tmp_path / "features.npz", visual=rng.randn(20, 4), label=np.arange(20) % 2, audio=rng.randn(20, 3),
             split=split)
    d = C.load_features_npz(tmp_path)
    assert d["modalities"] == ["visual", "audio"] and [x.shape[1] for x in d["train"][0]] == [4, 3]
    picked = C.load_features_npz(tmp_path, ["audio", "visual"])
    assert picked["modalities"] == ["audio", "visual"] and [x.shape[1] for x in picked["test"][0]] == [3, 4]


def mmin_fixture(root):
    rng = np.random.RandomState(0)
    names = {"trn": ["Ses01_a", "Ses01_b", "Ses01_c"], "val": ["Ses02_a"], "tst": ["Ses03_a", "Ses03_b"]}
    store = {}
    for folder, width in (("A", 3), ("V", 4), ("L", 5)):
        (root / folder).mkdir(parents=True)
        (root / folder / f"feat{folder}.h5").write_bytes(b"")
        store[f"feat{folder}.h5"] = {n: rng.randn(4, width) if folder == "A" else rng.randn(width)
                                     for ns in names.values() for n in ns}
    (root / "target" / "1").mkdir(parents=True)
    for code, ns in names.items():
        np.save(root / "target" / "1" / f"{code}_label.npy", np.eye(4)[np.arange(len(ns)) % 4])   # one-hot
        np.save(root / "target" / "1" / f"{code}_int2name.npy", np.array([[n.encode()] for n in ns]))
    return store


def fake_h5py(store):
    class File(dict):
        def __init__(self, path, mode):
            if store[path.name] is None:                            # as h5py on a truncated or non-HDF5 file
                raise OSError("Unable to open file (file signature not found)")
            super().__init__({k: FakeDataset(v) for k, v in store[path.name].items()})

        def close(self):
            pass

    class FakeDataset:
        def __init__(self, v):
            self.v = v

        def __getitem__(self, key):
            return self.v

    return types.SimpleNamespace(File=File)


def test_mmin_layout_without_h5py_says_how(tmp_path, monkeypatch):
    mmin_fixture(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(C.DataError, match="needs h5py, an optional dependency: pip install h5py"):
        C.load_mmin(tmp_path, fold=1)


def test_mmin_layout_with_h5py(tmp_path, monkeypatch):
    store = mmin_fixture(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", fake_h5py(store))
    d = C.load_mmin(tmp_path, fold=1)
    assert [len(d[s][1]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert [x.shape for x in d["train"][0]] == [(3, 3), (3, 4), (3, 5)]
    assert np.allclose(d["train"][0][0][1], store["featA.h5"]["Ses01_b"].mean(0))   # a (T, d) sequence: its mean
    assert d["train"][1].tolist() == [0, 1, 2] and d["classes"] == ["0", "1", "2", "3"]
    with pytest.raises(C.DataError, match=r"target/2/trn_label.npy: file not found \(fold 2\)"):
        C.load_mmin(tmp_path, fold=2)
    for code, n in (("trn", 3), ("val", 1), ("tst", 2)):           # indices as a column (N, 1): not one-hot
        np.save(tmp_path / "target" / "1" / f"{code}_label.npy", (np.arange(n) % 4 + 1)[:, None])
    d = C.load_mmin(tmp_path, fold=1)
    assert d["train"][1].tolist() == [1, 2, 3] and d["classes"] == ["0", "1", "2", "3"]
    store["featA.h5"]["Ses01_c"] = np.zeros((0, 3))
    with pytest.raises(C.DataError, match=r"featA.h5: entry 'Ses01_c' \(row 2 of .*trn_int2name.npy\) is an empty "
                                          r"sequence \(0, 3\); expected at least one time step"):
        C.load_mmin(tmp_path, fold=1)
    store["featA.h5"]["Ses01_c"] = np.full((2, 3), np.nan)
    with pytest.raises(C.DataError, match=r"featA.h5: entry 'Ses01_c' .* holds non-finite values"):
        C.load_mmin(tmp_path, fold=1)
    store["featA.h5"]["Ses01_c"] = np.zeros((2, 3))
    del store["featL.h5"]["Ses03_b"]
    with pytest.raises(C.DataError, match=r"featL.h5: no entry 'Ses03_b' \(row 1 of .*tst_int2name.npy\)"):
        C.load_mmin(tmp_path, fold=1)
    store["featL.h5"] = None
    with pytest.raises(C.DataError, match=r"featL.h5: not a readable HDF5 file \(Unable to open file .*\); "
                                          r"expected MMIN's features"):
        C.load_mmin(tmp_path, fold=1)


# ---------------------------------------------------------------------------------------------- CCA family

def test_cca_recovers_planted_canonical_correlation():
    rng = np.random.RandomState(0)
    n, rho = 4000, 0.8
    z = rng.randn(n)
    x1 = np.stack([z, rng.randn(n), rng.randn(n)], 1) @ rng.randn(3, 3)
    x2 = np.stack([rho * z + np.sqrt(1 - rho ** 2) * rng.randn(n), rng.randn(n)], 1) @ rng.randn(2, 2)
    xs = [torch.tensor(x1, dtype=torch.float32), torch.tensor(x2, dtype=torch.float32)]
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[:300, 1] = False                                           # missing rows are left out
    Ws, mus, evals = C.multiset_cca(xs, mask, k=1, reg=1e-6)
    assert evals[0].item() - 1 == pytest.approx(rho, abs=0.03)       # two views: lambda = 1 + rho
    p1, p2 = ((x - mu) @ w for x, w, mu in zip(xs, Ws, mus))
    got = np.corrcoef(p1[300:, 0].numpy(), p2[300:, 0].numpy())[0, 1]
    assert got == pytest.approx(rho, abs=0.03)
    assert p1[:, 0].std().item() == pytest.approx(1.0, abs=0.05)     # unit-variance projections


def test_dcca_loss_is_minus_sum_of_canonical_correlations():
    rng = np.random.RandomState(1)
    h1 = rng.randn(40, 3)
    h2 = h1 @ rng.randn(3, 3) * 0.5 + rng.randn(40, 3)
    # numpy, another route: the canonical correlations are the square roots of the eigenvalues of
    # S11^-1 S12 S22^-1 S21
    a, b = h1 - h1.mean(0), h2 - h2.mean(0)
    s11, s22, s12 = a.T @ a / 39, b.T @ b / 39, a.T @ b / 39
    rhos = np.sqrt(np.sort(np.linalg.eigvals(np.linalg.solve(s11, s12) @ np.linalg.solve(s22, s12.T)).real))[::-1]
    t1, t2 = torch.tensor(h1), torch.tensor(h2)
    assert C.cca_correlation(t1, t2, reg=0.0).item() == pytest.approx(rhos.sum(), rel=1e-6)
    assert C.cca_correlation(t1, t2, k=2, reg=0.0).item() == pytest.approx(rhos[:2].sum(), rel=1e-6)
    enc = [C.MLPEncoder(3, 3, 1), C.MLPEncoder(3, 3, 1)]
    dcca = C.DCCA(enc, 2, ["audio", "text"], dim=3, reg=0.0)
    loss = dcca.correlation_loss([t1, t2], torch.ones(40, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(-rhos.sum(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- imputation

@pytest.fixture(scope="module")
def toy_features(tmp_path_factory):
    path = C.make_toy_features(tmp_path_factory.mktemp("feat") / "features.npz", n_train=800, n_val=0, n_test=300,
                               dims=(12, 14, 16), recipe=C.ToyFeatures(noise=0.2))
    d = C.load_features_npz(path)
    return [torch.tensor(x) for x in d["train"][0]], torch.tensor(d["train"][1]), \
        [torch.tensor(x) for x in d["test"][0]]


def build(name, encoders, num_train=800):
    table6 = dict(layers=2, recon_weight=1.0, hide_prob=0.5, ae_widths=[32, 16], ae_blocks=2, cca_dim=4, dcca_dim=3,
                  cca_reg=1e-3, cmd_weight=1.0, cmd_order=3, cpm_lambda=1.0, code_lr=0.05, code_steps=5, tate_heads=2,
                  tate_layers=1)
    return C.build_method(name, encoders, 4, MODS, num_train, **options(name, **table6))


@pytest.mark.parametrize("name", ["ae", "cra", "mmin"])
def test_imputation_beats_zero_filling(name, toy_features):
    torch.manual_seed(0)
    xs, y, test = toy_features
    m = build(name, [C.MLPEncoder(x.shape[1], 32, 2) for x in xs])
    mask = torch.from_numpy(C.missing_mask(len(y), 3, 0.3, seed=0))
    xs = C.zero_missing(xs, mask)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    with C.torch_threads(1):                                        # tiny layers: one thread is the fastest
        for epoch in range(25):
            for b in torch.randperm(len(y)).split(64):
                step(m, [x[b] for x in xs], y[b], b, opt, epoch=epoch, mask=mask[b])
    m.eval()
    hidden = torch.ones(len(test[0]), 3, dtype=torch.bool)
    hidden[:, 0] = False                                            # audio planted missing, the others present
    with torch.no_grad():
        guess = m.impute(C.zero_missing(test, hidden), hidden)[0]
        if name == "mmin":                                          # MMIN imagines embeddings
            truth, zero = m.encoders[0](test[0]), m.encoders[0](torch.zeros_like(test[0]))
        else:
            truth, zero = test[0], torch.zeros_like(test[0])
    err, zero_err = ((guess - truth) ** 2).mean().item(), ((zero - truth) ** 2).mean().item()
    assert err < 0.9 * zero_err, f"{name}: imputation MSE {err:.4f} vs zero-filling {zero_err:.4f}"


def test_cpm_net_infers_test_codes_with_networks_frozen(toy_features):
    torch.manual_seed(0)
    xs, y, test = toy_features
    m = build("cpm_net", [C.MLPEncoder(x.shape[1], 32, 2) for x in xs])
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for b in torch.arange(len(y)).split(100):
        step(m, [x[b] for x in xs], y[b], b, opt, epoch=0)
    m.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mask = torch.from_numpy(C.missing_mask(len(test[0]), 3, 0.5, seed=1))
    batch = C.zero_missing(test, mask)
    m.eval()                                                          # as evaluate() does: no dropout
    fused, unis = m.predict(batch, mask)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # networks and training codes untouched
    assert all(p.grad is None for p in m.parameters())               # not even a gradient
    h = m.infer_codes(batch, mask)
    zero = torch.zeros_like(h)
    assert m.code_loss(h, batch, mask).mean() < m.code_loss(zero, batch, mask).mean()   # they explain the views
    assert torch.equal(fused, m.scores(h)) and fused.shape == (len(mask), 4)


# ---------------------------------------------------------------------------------------------- authors' formulas

def test_residual_ae_is_mmins_leaky_linear_bottleneck_and_transition():
    """MMIN's ResidualAE: block k reads x + the earlier blocks' outputs, its encoder has LeakyReLU(0.01)
    between layers and a linear bottleneck, and x_last + out_last passes the transition. IF-MMIN's
    (autoencoder_2): block 0 reads x + add, block k > 0 decoder k-1's output + add; transition(out_last)."""
    torch.manual_seed(0)
    ae = C.CascadedResidualAE(6, widths=(5, 4), blocks=2)
    enc = ae.enc[0]
    assert [type(l).__name__ for l in enc] == ["Linear", "LeakyReLU", "Linear"] and enc[1].negative_slope == 0.01
    x, add = torch.randn(7, 6), torch.randn(7, 6)
    o1 = ae.dec[0](ae.enc[0](x))
    o2 = ae.dec[1](ae.enc[1](x + o1))
    out, latent = ae(x)
    assert torch.allclose(out, ae.transition(x + o1 + o2), atol=1e-6)
    assert latent.shape == (7, 8) and (latent < 0).any()                 # no activation on the bottleneck
    ae = C.CascadedResidualAE(6, widths=(5, 4), blocks=3)
    o1 = ae.dec[0](ae.enc[0](x + add))
    o2 = ae.dec[1](ae.enc[1](o1 + add))
    o3 = ae.dec[2](ae.enc[2](o2 + add))
    out, latent = ae(x, add)
    assert torch.allclose(out, ae.transition(o3), atol=1e-6)
    assert torch.allclose(latent, torch.cat([ae.enc[0](x + add), ae.enc[1](o1 + add), ae.enc[2](o2 + add)], 1), atol=1e-6)
    out.sum().backward()                                                # every decoder feeds the output
    assert all(d[-1].weight.grad is not None and d[-1].weight.grad.abs().sum() > 0 for d in ae.dec)


def mmin_batch(n=16):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, d, generator=g) for d in (5, 6, 7)]
    mask = torch.from_numpy(C.missing_mask(n, 3, 0.3, seed=0))
    return C.zero_missing(xs, mask), torch.randint(0, 4, (n,), generator=g), mask


def test_mmin_cycle_target_is_detached():
    """The official cycle loss: mse(feat_fusion_miss.detach(), recon_cycle): the encoders get no gradient
    through the cycle target."""
    torch.manual_seed(0)
    m = build("mmin", [C.MLPEncoder(d, 8, 2) for d in (5, 6, 7)])
    xs, y, mask = mmin_batch()
    seen = C.hide_views(mask, 0.5)

    def grads(detach):
        m.zero_grad()
        es = m.embed(xs, seen)
        imagined, latent = m.imagine(es, seen)
        target = [t.detach() for t in m.embed(xs, mask)]
        cat = torch.cat(es, 1)
        loss = (F.cross_entropy(m.classifier(latent), y) + C.view_mse(C.split_views(imagined, m.sizes), target, mask)
                + F.mse_loss(m.backward_ae(imagined)[0], cat.detach() if detach else cat))
        loss.backward()
        return [p.grad.clone() for p in m.encoders.parameters()]

    m.zero_grad()
    m.imagination_loss(xs, y, mask, seen)[0].backward()
    ours = [p.grad.clone() for p in m.encoders.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, grads(detach=True)))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, grads(detach=False)))


def test_if_mmin_adds_invariant_features_and_averages_cmd_over_pairs():
    torch.manual_seed(0)
    m = build("if_mmin", [C.MLPEncoder(d, 8, 2) for d in (5, 6, 7)])
    m.hide_prob = 0.0                                              # seen = mask: a computation by hand
    xs, y, mask = mmin_batch()
    es = m.embed(xs, mask)
    inv = [m.invariant(e) for e in es]
    assert torch.equal(m.imagine(es, mask)[0], m.forward_ae(torch.cat(es, 1), torch.cat(inv, 1))[0])
    base = m.imagination_loss(xs, y, mask, mask)[0]
    match = F.mse_loss(torch.cat(inv, 1), torch.cat(inv, 1).detach())    # 0: nothing hidden
    pairs = [(0, 1), (0, 2), (1, 2)]
    cmds = [C.cmd(inv[i][mask[:, i] & mask[:, j]], inv[j][mask[:, i] & mask[:, j]], 3) for i, j in pairs]
    expected = base + match + 1.0 * sum(cmds) / 3                    # cmd_weight 1, the authors' loss / 3.0
    assert torch.allclose(m.objective(xs, y, mask), expected, atol=1e-5)


def test_cpm_net_leave_one_out_scores_and_its_classification_loss():
    """CPM-Net's classification loss (util/model.py): class means of the other samples' codes (the sample's
    own left out, its class count minus one), loss = 1[argmax != y] + max_c s_c - s_y; the reconstruction
    error summed over the present views' dimensions."""
    torch.manual_seed(0)
    m = build("cpm_net", [C.MLPEncoder(d, 4, 2) for d in (5, 6, 7)], num_train=6)
    m.codes.copy_(torch.randn(6, 4))
    m.labels.copy_(torch.tensor([0, 0, 1, 1, 2, 3]))
    idx = torch.tensor([0, 2, 5])
    h = torch.randn(3, 4)
    s = m.scores(h, idx)
    for b, i in enumerate(idx.tolist()):
        for c in range(4):
            others = [j for j in range(6) if m.labels[j] == c and j != i]
            mean = m.codes[others].mean(0) if others else torch.zeros(4)
            assert torch.allclose(s[b, c], h[b] @ mean, atol=1e-6)
    y = torch.tensor([0, 1, 3])
    wrong = s.argmax(1) != y
    expected = wrong.float() + s.max(1).values - s[torch.arange(3), y]
    loss = m.class_loss(h, y, idx)
    assert torch.allclose(loss, expected) and torch.all(loss[~wrong] == 0) and torch.all(loss[wrong] >= 1)
    xs = [torch.randn(3, d) for d in (5, 6, 7)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    m.eval()                                                      # no dropout
    recon = sum(((g(h) - x) ** 2).sum(1) * mask[:, v] for v, (g, x) in enumerate(zip(m.decoders, xs)))
    assert torch.allclose(m.code_loss(h, xs, mask), recon)
    assert all(isinstance(g[0], nn.Linear) and isinstance(g[1], nn.Linear) for g in m.decoders)   # linear


def test_tate_tags_mark_exactly_the_missing_views():
    patterns = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1) if a + b + c], dtype=torch.bool)
    tags = C.TATE.tags(patterns)
    assert len(set(tags.tolist())) == len(patterns)                  # one tag per pattern
    bits = torch.stack([(tags >> m) & 1 for m in range(3)], 1).bool()
    assert torch.equal(bits, ~patterns)
    m = build("tate", [C.MLPEncoder(d, 8, 1) for d in (3, 4, 5)])
    seen = []
    m.tag.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    m.classify([torch.randn(7, d) for d in (3, 4, 5)], patterns)
    assert torch.equal(seen[0], tags)


# ---------------------------------------------------------------------------------------------- skipping views

class Spy(nn.Module):
    """Wraps an encoder and records every input it is given."""

    def __init__(self, enc):
        super().__init__()
        self.enc, self.dim, self.seen = enc, enc.dim, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.enc(x)


def nan_batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) for d in (3, 4, 5)]
    mask = torch.from_numpy(C.missing_mask(n, 3, 0.5, seed=seed))
    xs = [torch.where(mask[:, m:m + 1], x, torch.full_like(x, float("nan"))) for m, x in enumerate(xs)]
    return xs, torch.randint(0, 4, (n,), generator=g), torch.arange(n), mask


@pytest.mark.parametrize("name", ["late_fusion", "qmf", "mla"])
def test_encoders_never_see_a_missing_view(name):
    torch.manual_seed(0)
    spies = [Spy(C.MLPEncoder(d, 8, 2)) for d in (3, 4, 5)]
    m = C.build_method(name, spies, 4, MODS, 24)                      # mla: HGM on, the official alpha, dynamic
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    xs, y, idx, mask = nan_batch()
    loss = step(m, xs, y, idx, opt, epoch=0, batch=0, steps=1, mask=mask)
    fused, unis = m.predict(xs, mask=mask)
    assert torch.isfinite(loss) and torch.isfinite(fused).all()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    for k, spy in enumerate(spies):
        assert spy.seen and all(torch.isfinite(x).all() for x in spy.seen)
        assert all(len(x) == mask[:, k].sum() for x in spy.seen)     # exactly the present rows
    # the fused prediction is made of the present views only
    w = mask.float()
    if name == "late_fusion":
        expected = sum(w[:, k:k + 1] * u for k, u in enumerate(unis)) / w.sum(1, keepdim=True)
    elif name == "qmf":
        expected = sum(w[:, k:k + 1] * m.confidence(u)[:, None] * u for k, u in enumerate(unis))
    else:
        lam = C.fusion_weights(unis, "dynamic", mask=mask)
        assert torch.allclose(lam.sum(1), torch.ones(len(mask))) and (lam[~mask] == 0).all()
        expected = sum(lam[:, k:k + 1] * u for k, u in enumerate(unis))
    assert torch.allclose(fused, expected, atol=1e-6)
    assert all((u[~mask[:, k]] == 0).all() for k, u in enumerate(unis))


def test_mla_skips_a_modality_absent_from_the_batch():
    torch.manual_seed(0)
    m = C.MLA([C.MLPEncoder(d, 8, 2) for d in (3, 4, 5)], 4, MODS)
    xs, y, idx, mask = nan_batch()
    mask[:, 1] = False
    mask[:, 0] = True
    before = [p.clone() for p in m.encoders[1].parameters()]
    m.train_step(xs, y, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2), mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(before, m.encoders[1].parameters()))
    assert all(p.grad is None for p in m.encoders[1].parameters())


def test_accuracy_of_a_view_no_sample_has_is_none_not_zero(tmp_path):
    """A split where one view is absent everywhere: its accuracy is None (printed n/a, a gap in the
    report), not 0.0; the others are counted over their present samples."""
    torch.manual_seed(0)
    m = C.MLA([C.MLPEncoder(d, 8, 2) for d in (3, 4, 5)], 4, MODS)
    xs, y, _, mask = nan_batch()
    mask[:, 1] = False
    mask[:, 0] = True
    xs = [torch.nan_to_num(x) for x in xs]
    loader = C.make_loader(C.FeatureDataset(xs, mask, y), 8, False)
    acc = C.evaluate(m, loader, "cpu")
    _, unis = m.predict(xs, mask=mask)
    assert acc[MODS[1]] is None
    assert acc[MODS[0]] == round(100.0 * (unis[0].argmax(1) == y).float().mean().item(), 4)
    present = mask[:, 2]
    assert acc[MODS[2]] == round(100.0 * (unis[2][present].argmax(1) == y[present]).float().mean().item(), 4)
    assert f"{MODS[1]}   n/a" in C.fmt_acc(acc)
    from test_report import record
    for seed, (b, c) in enumerate([(None, None), (40.0, None), (None, None)]):
        record(tmp_path, "train_av.py", "cremad", "mla", seed, {"a": 50.0, "b": b, "c": c, "multi": 60.0})
    rows = {r["column"]: r for r in C.report_rows(C.load_records(tmp_path))}
    assert [(rows[k]["mean"], rows[k]["n"], rows[k]["n_na"]) for k in "abc"] == [(50.0, 3, 0), (40.0, 1, 2), (None, 0, 3)]
    assert "| `mla` | 50.00 ± 0.00 (n=3) | 40.00 (n=1 of 3) | n/a (no sample had this view) |" in C.report(tmp_path)
    path = tmp_path / "cremad" / "mla" / "seed0" / "record.json"
    rec = json.loads(path.read_text())
    rec["epochs"][0]["val"]["c"] = None
    path.write_text(json.dumps(rec))
    if importlib.util.find_spec("matplotlib"):                      # a gap in the curve, not a crash
        assert C.plot_curves(tmp_path, tmp_path / "curves.png").stat().st_size > 5000


def test_mla_fixed_weights_renormalised_over_present_views():
    unis = [torch.randn(3, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    w = C.fusion_weights(unis, "fixed", [0.35, 0.25, 0.4], mask)
    assert torch.allclose(w[0], torch.tensor([0.35, 0.25, 0.4]))
    assert torch.allclose(w[1], torch.tensor([0.35, 0, 0.4]) / 0.75)
    assert torch.allclose(w[2], torch.tensor([0.0, 1.0, 0.0]))


# ---------------------------------------------------------------------------------------------- train_missing.py

@pytest.mark.parametrize("method", C.methods_of("missing"))
def test_every_method_trains_one_toy_epoch_and_writes_record(method, tmp_path):
    [rec] = train_missing.main(argv(tmp_path, "--method", method, "--missing_rate", "0.3"))
    run_dir = tmp_path / "toy_missing" / method / "seed0" / "missing0.3"
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert tuple(on_disk) == C.RECORD_KEYS and on_disk == json.loads(json.dumps(rec))
    assert on_disk["script"] == "train_missing.py" and on_disk["method"] == method
    assert on_disk["modalities"] == MODS and on_disk["args"]["missing_rate"] == 0.3
    assert set(on_disk["args"]) == set(vars(train_missing.get_args([]))) | {"revision"}     # + the method's revision
    assert set(on_disk["test"]) == set(MODS) | {"multi"}
    assert all(0 <= v <= 100 for v in on_disk["test"].values())
    assert [set(e) for e in on_disk["epochs"]] == [{"epoch", "lr", "train_loss", "val"} | own_log(method)]
    assert np.isfinite(on_disk["epochs"][0]["train_loss"])
    assert (run_dir / "best.pt").is_file() and (run_dir / "missing_mask.npz").is_file()


def test_rate_sweep_writes_one_record_per_rate_and_report_reads_them(tmp_path, capsys):
    recs = train_missing.main(argv(tmp_path, "--method", "late_fusion", "--missing_rates", "0.1,0.7"))
    assert [r["args"]["missing_rate"] for r in recs] == [0.1, 0.7]
    mask = np.load(tmp_path / "toy_missing" / "late_fusion" / "seed0" / "missing0.7" / "missing_mask.npz")["train"]
    assert (mask.sum(1) == 1).all()
    assert "[2/2] late_fusion seed 0 missing_rate 0.7: test" in capsys.readouterr().out
    again = train_missing.main(argv(tmp_path, "--method", "late_fusion", "--missing_rates", "0.1,0.7"))
    assert again == recs and "skipped" in capsys.readouterr().out   # finished runs are not rerun
    text = C.report(tmp_path)
    assert "train_missing.py · toy · Table 6 shape" in text and "| method | 10 | 70 |" in text


def test_bad_data_is_one_clear_line(tmp_path):
    code, err = command_line("train_missing.py", "--dataset", "features", "--data_root", str(tmp_path / "absent"),
                             cwd=tmp_path)
    assert code != 0 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'absent' / 'features.npz'}: file not found")
    with pytest.raises(SystemExit):
        train_missing.get_args(["--missing_rates", "0.1,x"])
    with pytest.raises(SystemExit):
        train_missing.get_args(["--method", "cca,nope"])


def test_mmin_runs_of_each_fold_have_their_own_folder():
    path = lambda *a: train_missing.run_folder(train_missing.get_args(["--data_root", "somewhere", *a]))
    assert path("--dataset", "mmin", "--fold", "3", "--missing_rate", "0.3").parts[-4:] == \
        ("mla", "seed0", "fold3", "missing0.3")
    assert path("--dataset", "features", "--missing_rate", "0.3").parts[-3:] == ("mla", "seed0", "missing0.3")


def write_features_at_real_scales(path, n=240, seed=0):
    """Three views as a real feature set comes: widths 76, 64 and 47; the first spans about 0.001 to 778
    (mean about 88), the second 0 to 0.8, the third about unit scale; four classes, each view informative."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 4
    pattern = lambda d: rng.rand(4, d)[y]
    wide = np.clip(rng.gamma(0.5, 176, (n, 76)) * (0.5 + pattern(76)), 0.001, 778)
    unit = np.clip(0.4 * rng.rand(n, 64) + 0.4 * pattern(64), 0, 0.8)
    normal = rng.randn(n, 47) + 2 * pattern(47)
    split = np.array(["train"] * (n // 2 + n // 6) + ["val"] * (n // 6) + ["test"] * (n - n // 2 - 2 * (n // 6)))
    np.savez(path, audio=wide.astype(np.float32), visual=unit.astype(np.float32), text=normal.astype(np.float32),
             label=y, split=split)
    return path


@pytest.mark.parametrize("method", C.methods_of("missing"))
def test_every_method_trains_finite_on_features_at_any_scale(method, tmp_path):
    """At the paper's settings (lr 1e-3, batch 64, the default --feature_norm train), no Table 6 method gives
    a non-finite loss on views of very different scales; the statistics are those of the training split."""
    path = write_features_at_real_scales(tmp_path / "features.npz")
    [rec] = train_missing.main(["--dataset", "features", "--data_root", str(path), "--method", method,
                                "--epochs", "2", "--out_dir", str(tmp_path / "runs"), "--code_steps", "5"])
    assert rec["args"]["feature_norm"] == "train" and rec["args"]["lr"] == 1e-3
    assert all(np.isfinite(e["train_loss"]) for e in rec["epochs"]) and len(rec["epochs"]) == 2
    best = torch.load(tmp_path / "runs" / "features" / method / "seed0" / "missing0.5" / "best.pt", weights_only=False)
    raw = np.load(path)
    train = raw["split"] == "train"
    mask = np.load(tmp_path / "runs" / "features" / method / "seed0" / "missing0.5" / "missing_mask.npz")["train"]
    present = raw["audio"][train][mask[:, 0]]
    assert np.allclose(best["state_dict"]["feature_norm.mean0"].numpy(), present.mean(0), rtol=1e-4)
    assert np.allclose(best["state_dict"]["feature_norm.std0"].numpy(), present.std(0), rtol=1e-3)


def test_two_view_feature_set_trains_every_method(tmp_path):
    rng = np.random.RandomState(0)
    y = np.arange(120) % 3
    np.savez(tmp_path / "features.npz", audio=rng.randn(120, 6) + y[:, None], visual=rng.randn(120, 5) - y[:, None],
             label=y, split=np.array(["train"] * 80 + ["val"] * 20 + ["test"] * 20))
    recs = train_missing.main(["--dataset", "features", "--data_root", str(tmp_path), "--method", "all", "--epochs",
                               "1", "--out_dir", str(tmp_path / "runs"), "--hidden", "16", "--code_steps", "2"])
    assert [r["method"] for r in recs] == C.methods_of("missing")
    assert all(r["modalities"] == ["audio", "visual"] and set(r["test"]) == {"audio", "visual", "multi"} for r in recs)


def test_a_rate_above_the_cap_says_what_it_removes(tmp_path, capsys):
    [rec] = train_missing.main(argv(tmp_path, "--method", "late_fusion", "--missing_rate", "0.8"))
    assert "--missing_rate 0.8 removes 66.7% of the 3 views" in capsys.readouterr().out
    assert rec["args"]["missing_rate"] == 0.8


def test_ctrl_c_exits_130_with_how_to_resume(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        C.script_main(interrupted)
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
