"""The linear probe (--probe, python common.py probe): it finds what a trained encoder learned, it is deterministic and
reads the selected epoch's weights (best.pt), not the model in memory; every script writes it into its record, the
command gives the same numbers on a finished run, and report shows it."""
import json

import pytest
import torch

import common as C
import train_ait
import train_clip
import train_it
import train_missing
from conftest import check_board
from test_missing import argv as missing_argv
from test_train_ait import TINY_AIT, ait_root  # noqa: F401  (a fixture)
from test_train_it import TINY_IT, it_root  # noqa: F401  (a fixture)


class Views(torch.utils.data.Dataset):
    """Two views: the label is the signs of dims 0 and 1 of `a`, hidden among 30 dims of noise of the same scale;
    `v` is noise alone."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.a, self.v = torch.randn(n, 32, generator=g), torch.randn(n, 8, generator=g)
        self.y = (self.a[:, 0] > 0).long() * 2 + (self.a[:, 1] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.a[i], self.v[i], self.y[i], i


def test_the_probe_of_a_trained_encoder_beats_the_one_at_initialisation_and_draws_nothing():
    torch.manual_seed(0)
    method = C.MLA([C.MLPEncoder(32, 4, 2), C.MLPEncoder(8, 4, 2)], 4, ["a", "v"])
    loaders = {s: C.make_loader(Views(n, seed), 64, False) for s, n, seed in [("train", 512, 0), ("val", 128, 1),
                                                                                ("test", 256, 2)]}
    rng = torch.get_rng_state()
    before = C.linear_probe(method, loaders, "cpu")
    assert before == C.linear_probe(method, loaders, "cpu")              # deterministic: the same numbers again ...
    assert torch.equal(rng, torch.get_rng_state())                        # ... from no random draw
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(8):
        C.train_one_epoch(method, C.make_loader(loaders["train"].dataset, 64, True, seed=epoch), optimizer, epoch, "cpu")
    after = C.linear_probe(method, loaders, "cpu")
    assert before["a"] < 35 and after["a"] > before["a"] + 30, (before, after)    # 4 random features of 32 dims: chance
    assert max(before["v"], after["v"]) < 45                                       # noise: about chance (25)


def test_the_probe_reads_the_selected_epoch_and_the_command_gives_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "PROBE_DECAYS", (1e-3,))          # one fit a modality: the grid is not what is tested here
    [plain] = train_missing.main(missing_argv(tmp_path / "plain", "--epochs", "2"))
    [probed] = train_missing.main(missing_argv(tmp_path / "runs", "--epochs", "2", "--probe", "--tensorboard",
                                               "--tb_every", "1"))
    check_board(probed, next((tmp_path / "runs").rglob("record.json")).parent)
    same = ("epochs", "best_epoch", "test")
    assert [probed[k] for k in same] == [plain[k] for k in same]          # --probe changes nothing of the training
    assert plain["probe"] is None and set(probed["probe"]) == {"audio", "visual", "text"}
    assert all(0 <= v <= 100 for v in probed["probe"].values())
    real = C.load_best

    def broken(run, method):                   # the selected epoch loaded, then the model in memory broken
        real(run, method)
        with torch.no_grad():
            for p in method.parameters():
                p.zero_()
    monkeypatch.setattr(C, "load_best", broken)
    [other] = train_missing.main(missing_argv(tmp_path / "broken", "--epochs", "2", "--probe"))
    assert other["test"] != probed["test"] and other["probe"] == probed["probe"]   # read from best.pt
    monkeypatch.setattr(C, "load_best", real)
    path = next((tmp_path / "runs").rglob("record.json"))
    on_disk = json.loads(path.read_text())
    on_disk["probe"] = None                    # as a run without --probe
    path.write_text(json.dumps(on_disk))
    capsys.readouterr()
    C._cli(["probe", str(tmp_path / "runs"), "--device", "cpu"])
    assert f"{path}: probe {C.fmt_acc(probed['probe'])}" in capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(probed))          # the same record again
    table = C.report(tmp_path / "runs")
    assert "| `mla` |" in table and f"| `mla` probe text | {probed['probe']['text']:.2f} (n=1) |" in table
    assert "probe" not in C.report(tmp_path / "plain")                    # no probe: no probe rows


@pytest.mark.parametrize("script", ["train_it.py", "train_ait.py", "train_clip.py"])
def test_each_script_writes_the_probe_that_the_command_repeats_and_report_shows(script, it_root, ait_root, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(C, "PROBE_DECAYS", (1e-3,))          # one fit a modality: the grid is not what is tested here
    main, extra = {"train_it.py": (train_it.main, ["--data_root", str(it_root), *TINY_IT]),
                   "train_ait.py": (train_ait.main, ["--data_root", str(ait_root), *TINY_AIT]),
                   "train_clip.py": (train_clip.main, ["--toy_train", "24", "--toy_dev", "12", "--toy_test", "12",
                                                       "--toy_pretrain_epochs", "0", "--toy_width", "16",
                                                       "--toy_layers", "1", "--image_size", "16", "--batch_size", "16",
                                                       "--epochs", "1"])}[script]
    [rec] = main(["--out_dir", str(tmp_path), "--probe", "--tensorboard", "--tb_every", "1", *extra])   # both at once
    assert list(rec["probe"]) == rec["modalities"] and all(0 <= v <= 100 for v in rec["probe"].values())
    check_board(rec, next(tmp_path.rglob("record.json")).parent)      # every number of the epochs in tb/
    [(path, again)] = C.probe_runs(tmp_path, "cpu")
    assert again == rec["probe"] and json.loads(path.read_text())["probe"] == rec["probe"]
    row = next(line for line in C.report(tmp_path).splitlines() if line.startswith("| `mla` probe |"))
    assert row.endswith(" | — |") and row.count("(n=1)") == len(rec["modalities"])   # no fused probe
