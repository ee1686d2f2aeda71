"""A new user's first hour: progress when the output is not a terminal (a log file, a cluster job), one CPU
thread policy for the toys, one warning per sweep, messages naming only real flags."""
import re

import pytest
import torch

import common as C
import train_ait
import train_av
import train_clip
import train_it
import train_missing

SCRIPTS = [train_av, train_it, train_ait, train_missing, train_clip]
REAL = {train_av: ["cremad"], train_it: ["food101"], train_ait: ["iemocap"], train_missing: ["features"],
        train_clip: ["food101", "--clip_model", "folder"]}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_every_toy_runs_on_one_cpu_thread_real_data_on_torchs_default(script):
    assert script.get_args([]).cpu_threads == 1
    assert script.get_args(["--dataset", *REAL[script]]).cpu_threads == 0


def test_plain_progress_lines_inside_an_epoch_and_an_evaluation(monkeypatch, capsys):
    monkeypatch.setattr(C, "PROGRESS_EVERY", 0.0)            # a line every step here; 30 s in a run
    torch.manual_seed(0)
    xs, y = [torch.randn(24, 3), torch.randn(24, 4)], torch.arange(24) % 3
    m = C.MLA([C.MLPEncoder(3, 8, 2), C.MLPEncoder(4, 8, 2)], 3, ["a", "b"])
    loader = C.make_loader(C.FeatureDataset(xs, torch.ones(24, 2, dtype=torch.bool), y), 8, True)
    mean = C.train_one_epoch(m, loader, torch.optim.SGD(m.parameters(), lr=0.1), 0, "cpu")
    C.evaluate(m, loader, "cpu")
    lines = capsys.readouterr().out.splitlines()
    shape = [re.sub(r"loss \d+\.\d{4}", "loss L", re.sub(r"\(\d+s\)$", "(Ts)", s)) for s in lines]
    assert shape == [f"epoch 1: step {k}/3, loss L (Ts)" for k in (1, 2, 3)] + \
        [f"evaluating: step {k}/3 (Ts)" for k in (1, 2, 3)]
    shown = [float(re.search(r"loss (\S+) ", s).group(1)) for s in lines[:3]]      # each step's batch loss
    assert abs(sum(shown) / 3 - mean) < 1e-4


def test_plain_lines_wait_for_the_interval(monkeypatch, capsys):
    clock = iter([100.0, 110.0, 131.0, 140.0, 165.0])        # start, then one reading per step
    monkeypatch.setattr(C.time, "time", lambda: next(clock))
    bar = C.Progress(4, "epoch 2", every=30)
    bar.set_loss(1.5)
    for _ in range(3):
        bar.update()
    bar.close()
    # 10 s: nothing; 31 s: a line (the clock read again for it); 40 s: 9 s after it, nothing
    assert capsys.readouterr().out == "epoch 2: step 2/4, loss 1.5000 (40s)\n"


def test_a_sweep_warns_of_random_m3ae_weights_once(tmp_path, capsys):
    C.make_toy_it(tmp_path / "data", seed=0, n_train=12, n_dev=6, n_test=6, recipe=C.ToyIT(px=16))
    tiny = ["--image_size", "16", "--patch_size", "8", "--max_len", "10", "--m3ae_dim", "16", "--m3ae_depth", "1",
            "--m3ae_heads", "2", "--batch_size", "16", "--epochs", "1"]
    argv = ["--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"), *tiny, "--method", "sum"]
    assert len(train_it.main(argv + ["--seeds", "0,1"])) == 2
    assert capsys.readouterr().err.count("WARNING: no --m3ae_ckpt") == 1
    train_it.main(argv + ["--out_dir", str(tmp_path / "again")])          # the next command warns again
    assert capsys.readouterr().err.count("WARNING: no --m3ae_ckpt") == 1
