"""One contract for every method: the registry's classes (MLA included) have the contract's names and signatures; the
loop calls the hooks without probing; a method defined here, registered with one line, trains through a script."""
import importlib
import inspect
import json
import re

import pytest
import torch
import torch.nn.functional as F

import common as C
import train_missing
from conftest import ROOT

CONTRACT = ["train_step", "predict", "schedule", "start_epoch", "end_epoch", "epoch_log", "unimodal_features",
            "encoder_params"]


def signature(f):
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("name", list(C.REGISTRY))
def test_every_registered_method_has_the_contract_names_and_signatures(name):
    cls = C.REGISTRY[name].cls
    for hook in CONTRACT:
        assert signature(getattr(cls, hook)) == signature(getattr(C.Method, hook)), (name, hook)
    assert issubclass(cls, C.Method) or cls is C.MLA                  # MLA meets it on its own


@pytest.mark.parametrize("name", list(C.REGISTRY))
def test_every_registered_method_gives_each_modalitys_features_on_its_present_rows(name):
    torch.manual_seed(0)
    table6 = "missing" in C.REGISTRY[name].scripts and name not in C.methods_of("av")
    d_ins = [6, 7, 8] if table6 else [5, 7]
    method = C.build_method(name, [C.MLPEncoder(d, 8, 2) for d in d_ins], 3, ["a", "b", "c"][:len(d_ins)], 10,
                            **({"code_steps": 2} if name == "cpm_net" else {}))
    xs = [torch.randn(10, d) for d in d_ins]
    mask = torch.rand(10, len(d_ins)) > 0.4
    mask[~mask.any(1), 0] = True
    method.eval()
    with torch.no_grad():
        full = method.unimodal_features(xs)
        present = method.unimodal_features(xs, mask)
    assert [f.shape[0] for f in full] == [10] * len(d_ins) and all(f.ndim == 2 for f in full)
    assert [f.shape[0] for f in present] == mask.sum(0).tolist()         # the rows where each view is present
    if name in C.methods_of("av") or name in ("mla", "late_fusion", "qmf", "mmin", "if_mmin", "tate"):
        for f, x, m, p in zip(method.encoders, xs, range(len(xs)), present):     # an encoder per view: its output
            assert torch.allclose(p, f(x[mask[:, m]]))


def test_the_registry_gives_every_scripts_methods_in_the_papers_order():
    assert C.methods_of("av") == C.methods_of("it") == C.methods_of("ait") == [
        "sum", "concat", "late_fusion", "film", "bigated", "ogm", "ogm_ge", "qmf", "mla", "mmcosine", "mmpareto",
        "agm", "gblending", "pmr", "reconboost"]
    assert C.methods_of("missing") == ["late_fusion", "qmf", "cca", "dcca", "dccae", "ae", "cra", "mmin", "if_mmin",
                                       "cpm_net", "tate", "mla"]
    assert C.methods_of("clip") == ["clip", "mla"]


def test_no_method_is_probed_for_what_it_has():
    for path in [ROOT / "common.py", *ROOT.glob("train_*.py")]:
        found = re.findall(r"hasattr\(method\b|getattr\(method\b|isinstance\(method, ", path.read_text())
        assert not found, (path.name, found)


class SmoothMLA(C.MLA):
    """MLA with label smoothing: one override, its loss. It also notes the hooks the loop calls."""
    made = []

    def __init__(self, encoders, num_classes, modalities=None, smoothing=0.1, **mla):
        super().__init__(encoders, num_classes, modalities, **mla)
        self.smoothing, self.calls = smoothing, []
        SmoothMLA.made.append(self)

    def loss(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=self.smoothing)

    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False):
        self.calls.append(("start", epoch, epochs, sorted(k for k, v in loaders.items() if v is not None)))

    def end_epoch(self, epoch, loaders, device, amp=False):
        self.calls.append(("end", epoch))

    def epoch_log(self):
        return super().epoch_log() | {"smoothing": self.smoothing, "hooks": len(self.calls)}


@pytest.fixture
def smooth_mla_registered():
    C.register("smooth_mla", SmoothMLA, "a test's", "missing", {"smoothing": ("smoothing", "label smoothing")})
    importlib.reload(train_missing)              # as a script imported after the registry line
    yield
    del C.REGISTRY["smooth_mla"]
    importlib.reload(train_missing)


def test_a_method_added_with_one_registry_line_trains_through_a_script(smooth_mla_registered, tmp_path):
    assert train_missing.METHODS[-1] == "smooth_mla"
    small = ["--epochs", "2", "--toy_train", "200", "--toy_val", "50", "--toy_test", "100", "--seed", "3"]
    [rec] = train_missing.main(["--method", "smooth_mla", "--smoothing", "0.3", "--hgm_alpha", "0.05",
                                "--out_dir", str(tmp_path)] + small)
    path = tmp_path / "toy_missing" / "smooth_mla" / "seed3" / "missing0.5" / "record.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(rec))
    [made] = SmoothMLA.made
    assert rec["method"] == "smooth_mla" and rec["args"]["smoothing"] == 0.3 and made.smoothing == 0.3
    assert made.hgm_alpha == 0.05 and made.hgm                      # MLA's flags reach its subclass
    assert made.calls == [("start", 0, 2, ["test", "train", "val"]), ("end", 0),
                          ("start", 1, 2, ["test", "train", "val"]), ("end", 1)]
    assert [(e["smoothing"], e["hooks"]) for e in rec["epochs"]] == [(0.3, 2), (0.3, 4)]
    assert all(e["hgm_p_trace"] < 1 for e in rec["epochs"])          # MLA's own entry: HGM at work
    [plain] = train_missing.main(["--method", "mla", "--hgm_alpha", "0.05", "--out_dir", str(tmp_path)] + small)
    assert rec["epochs"][0]["train_loss"] > plain["epochs"][0]["train_loss"]   # the smoothed loss is what trained


def test_readmes_method_table_follows_the_registry():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## The methods"):text.index("**Adding a method.**")]
    rows = [r.split(" | ") for r in table.splitlines() if r.startswith("| `")]
    names = [n for r in rows for n in re.findall(r"`(\w+)`", r[0])]
    assert names == list(C.REGISTRY)
    for r in rows:
        for n in re.findall(r"`(\w+)`", r[0]):
            assert r[-1].rstrip(" |").split(", ") == list(C.REGISTRY[n].scripts), n


def test_register_refuses_a_duplicate_an_unknown_script_and_a_flag_the_constructor_lacks():
    with pytest.raises(ValueError, match="mla is registered already"):
        C.register("mla", C.MLA, "again", "av")
    with pytest.raises(ValueError, match="scripts 'missng': expected a space-separated list of av, it, ait"):
        C.register("typo", C.Concat, "a typo", "missng")
    with pytest.raises(ValueError, match=r"flags for \['gamma'\], which Concat's constructor does not take"):
        C.register("typo", C.Concat, "a typo", "av", {"gamma": ("typo_gamma", "none")})
    assert "typo" not in C.REGISTRY


def test_a_fusion_method_refuses_missing_views_it_cannot_handle(tiny_encoders):
    m = C.Concat(tiny_encoders(5, 7), 4, ["audio", "video"])
    xs, y = [torch.randn(6, 5), torch.randn(6, 7)], torch.arange(6) % 4
    mask = torch.ones(6, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="Concat trains on complete views"):
        m.train_step(xs, y, torch.optim.SGD(m.parameters(), lr=0.1), mask=mask)
    with pytest.raises(ValueError, match="Concat trains on complete views"):
        m.predict(xs, mask)


def test_mlas_switch_reads_on_by_default_and_its_off_flag_names_the_official_code(capsys):
    with pytest.raises(SystemExit):
        train_missing.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hgm mla: head-gradient projection (HGM) on (default)" in text
    assert "--no_hgm mla: HGM off (what the official code effectively runs)" in text
