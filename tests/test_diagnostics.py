"""What a run shows while it trains: each method's diagnostics per epoch (OGM's are its coefficients by hand, the
loop's gradient norm that of the encoders' gradients by hand), --tensorboard's event files from every script (every
number of the epoch entries, the step losses, a resumed run without a step twice, a one-line error without the
package) and a run with them the same as one without."""
import copy
import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common as C
import train_ait
import train_clip
import train_it
import train_missing
from conftest import check_board, step
from test_missing import TINY as TINY_MISSING
from test_train_ait import TINY_AIT, ait_root  # noqa: F401  (a fixture)
from test_train_clip import TINY_CLIP, saved  # noqa: F401  (a fixture)
from test_train_it import TINY_IT, it_root  # noqa: F401  (a fixture)


def batches(n=3, rows=16):
    g = torch.Generator().manual_seed(1)
    return [([torch.randn(rows, 5, generator=g), torch.randn(rows, 7, generator=g)],
             torch.randint(0, 4, (rows,), generator=g)) for _ in range(n)]


def test_ogm_diagnostics_are_its_coefficients_and_ratios_by_hand(tiny_encoders):
    m = C.build_method("ogm", tiny_encoders(5, 7), 4, ["audio", "video"], alpha=0.3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    keys, coeffs, ratios = list(m.state_dict()), [], []
    for xs, y in batches():
        with torch.no_grad():                       # the batch's scores before its step: s_m = sum softmax_y of
            zs = [f(x) for f, x in zip(m.encoders, xs)]    # the head on modality m's features, the other's zeroed
            s = [m.head(torch.cat([z if j == k else 0 * z for j, z in enumerate(zs)], 1)).softmax(1)
                 .gather(1, y[:, None]).sum().item() for k in range(2)]
        ratios.append([s[0] / s[1], s[1] / s[0]])
        coeffs.append([1 - math.tanh(0.3 * r) if r > 1 else 1.0 for r in ratios[-1]])
        step(m, xs, y, torch.arange(len(y)), opt)
        m.predict(xs)                               # evaluation adds nothing
    mean = lambda rows: {"audio": sum(r[0] for r in rows) / len(rows), "video": sum(r[1] for r in rows) / len(rows)}
    log = m.epoch_log()
    assert log == {"ogm_coeff": pytest.approx(mean(coeffs), abs=2e-6), "ogm_ratio": pytest.approx(mean(ratios), abs=2e-6)}
    assert all(min(c) < 1 == max(c) for c in coeffs) and min(log["ogm_coeff"].values()) < 1    # the dominant damped
    none = {"ogm_coeff": {"audio": None, "video": None}, "ogm_ratio": {"audio": None, "video": None}}
    assert m.epoch_log() == none                    # read once: the next epoch starts over
    xs, y = batches(1)[0]
    step(m, xs, y, torch.arange(len(y)), opt, epoch=51)      # past --modulation_ends 50: nothing modulated
    assert m.epoch_log() == none and list(m.state_dict()) == keys     # no checkpoint key added


def test_grad_norm_is_the_norm_of_each_encoders_gradient_by_hand(tiny_encoders):
    m = C.build_method("concat", tiny_encoders(5, 7), 4, ["audio", "video"])
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    norms, want = C.GradNorms(m, opt), []
    for xs, y in batches():
        twin = copy.deepcopy(m)                     # the gradient of the same step, by hand
        F.cross_entropy(twin.head(torch.cat([f(x) for f, x in zip(twin.encoders, xs)], 1)), y).backward()
        want.append([math.sqrt(sum(p.grad.square().sum().item() for p in f.parameters())) for f in twin.encoders])
        step(m, xs, y, torch.arange(len(y)), opt)
    assert norms.read() == {"grad_norm": pytest.approx({"audio": sum(w[0] for w in want) / 3,
                                                        "video": sum(w[1] for w in want) / 3}, abs=2e-6)}
    assert norms.read() == {"grad_norm": {"audio": None, "video": None}}            # starts over
    cca = C.build_method("cca", [C.MLPEncoder(5, 8), C.MLPEncoder(7, 8)], 4, ["audio", "video"])
    assert C.GradNorms(cca, torch.optim.SGD(cca.parameters(), lr=0.1)).read() == {}  # no encoder per modality


def script_run(name, out, request, *extra):
    """The record of a toy run of one script into `out`, with a method whose diagnostics it shows."""
    if name == "it":
        root = request.getfixturevalue("it_root")
        main, argv = train_it.main, ["--data_root", str(root), *TINY_IT, "--method", "pmr"]
    elif name == "ait":
        root = request.getfixturevalue("ait_root")
        main, argv = train_ait.main, ["--data_root", str(root), *TINY_AIT, "--method", "qmf"]
    elif name == "missing":
        main, argv = train_missing.main, [*TINY_MISSING, "--method", "mla", "--epochs", "2", "--missing_rate", "0.3"]
    else:               # each run its own feature cache: the extraction draws from torch's RNG, the cache does not
        root, folder, _ = request.getfixturevalue("saved")
        main, argv = train_clip.main, ["--data_root", str(root), "--clip_model", str(folder), "--cache_dir",
                                       str(out / "cache"), "--method", "clip", *TINY_CLIP]
    [record] = main([*argv, "--out_dir", str(out), *extra])
    return record


@pytest.mark.parametrize("name", ["it", "ait", "missing", "clip"])      # train_av: test_same_seed_gives_...
def test_tensorboard_writes_every_number_of_the_epochs_and_changes_nothing(name, tmp_path, request):
    plain = script_run(name, tmp_path / "plain", request)
    board = script_run(name, tmp_path / "board", request, "--tensorboard", "--tb_every", "1")
    assert [plain[k] for k in ("epochs", "best_epoch", "test")] == [board[k] for k in ("epochs", "best_epoch", "test")]
    assert C.other_settings(plain["args"], board["args"]) == ""          # a sweep takes one for the other
    [run_dir] = [p.parent for p in (tmp_path / "board").rglob("record.json")]
    tags = check_board(board, run_dir)
    assert {"lr", "train_loss", "val/multi"} <= set(tags) and not list((tmp_path / "plain").rglob("tb"))
    assert any(t.startswith("grad_norm/") for t in tags) == (name != "clip")     # cached features: no encoder weights


def test_a_resumed_run_continues_the_series_without_a_step_twice(tmp_path, monkeypatch):
    """Stopped after epoch 2's numbers went to TensorBoard but before its checkpoint (as a kill between the two),
    the resumed run trains epoch 2 again: the event files purge the first one's epoch 2 and its steps."""
    argv = [*TINY_MISSING, "--method", "qmf", "--epochs", "3", "--missing_rate", "0.3", "--out_dir", str(tmp_path),
            "--tensorboard", "--tb_every", "1"]
    real, calls = C.save_checkpoint, []

    def stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a, **k)
    monkeypatch.setattr(C, "save_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        train_missing.main(argv)
    monkeypatch.undo()
    run_dir = tmp_path / "toy_missing" / "qmf" / "seed0" / "missing0.3"
    # an event file's name is <seconds>.<host>.<pid>.<writer count>, read in the order of the names: a resumed
    # process names its files a second later or more; here, the same process within the second, it says so
    monkeypatch.setattr(time, "time", lambda now=time.time: now() + 1)
    [resumed] = train_missing.main(argv + ["--resume"])
    assert len(list((run_dir / "tb" / "epochs").glob("events.*"))) == 2        # the stopped run's, the resumed one's
    check_board(resumed, run_dir)                  # epochs 1, 2, 3 and every step once, the resumed run's values


def test_tensorboard_without_the_package_is_one_line_and_only_the_first_process_writes(it_root, tmp_path,
                                                                                        monkeypatch, tiny_encoders):
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "tensorboard", None)
        mp.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(SystemExit) as e:
            C.script_main(lambda: train_it.main(["--data_root", str(it_root), "--out_dir", str(tmp_path), *TINY_IT,
                                                 "--tensorboard"]))
    assert e.value.code == "error: --tensorboard needs the tensorboard package: pip install tensorboard"
    assert not list(tmp_path.iterdir())            # before any run
    m = C.build_method("sum", tiny_encoders(5, 7), 4, ["audio", "video"])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    settings = {"select_on": "last", "tensorboard": True, "tb_every": 1}
    monkeypatch.setattr(C, "world", lambda: (1, 2))          # torchrun's second process: no event files
    run = C.start_run(tmp_path / "r", "x.py", settings, m, opt, None, {"train": [0, 1]})
    assert run.board is None and not (tmp_path / "r" / "tb").exists()
