"""Nothing trained is lost: exact resume after SIGKILL, atomic checkpoints, the non-finite-loss guard."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common as C
import train_av
import train_it
import train_missing
from conftest import ROOT, TINY
from test_train_it import TINY_IT, it_root  # noqa: F401  (a fixture)

SAME = ("script", "dataset", "method", "seed", "modalities", "epochs", "select_on", "best_epoch", "test")


def it_argv(root, method, *extra):
    """train_it.py on the image-text toy (36 training pairs, dev 12, test 12): the run's machinery (checkpoint,
    resume, the non-finite guard) is every script's; these tests take the toy whose checkpoints are small (the A-V
    toy's two full ResNet-18s write 270 MB an epoch; the A-V runs above kill and resume train_av.py itself)."""
    return ["--data_root", str(root), "--method", method, *TINY_IT, *extra]


def kill_after_first_epoch(script, argv, run_dir, cwd):
    """Start `script argv` as a process, SIGKILL it once it has saved an epoch, before it finishes."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = run_dir / "last.pt", time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (run_dir / "record.json").exists(), "killed between two epochs"
    return torch.load(last, weights_only=False)


@pytest.mark.parametrize("method", ["mla", "qmf"])
def test_train_av_killed_and_resumed_equals_uninterrupted(method, toy_root, tmp_path):
    # two epochs: killed once the first is saved, the resumed run trains the second from last.pt
    argv = ["--dataset", "toy", "--data_root", str(toy_root), "--method", method, *TINY, "--epochs", "2"]
    [whole] = train_av.main(argv + ["--out_dir", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    run_dir = out / "toy_av" / method / "seed0"
    saved = kill_after_first_epoch("train_av.py", argv + ["--out_dir", str(out)], run_dir, tmp_path)
    assert saved["epoch"] < 2 and len(saved["log"]) == saved["epoch"] + 1
    if method == "mla":
        assert not torch.equal(saved["state_dict"]["P"], torch.eye(512))          # P travels in the checkpoint
    if method == "qmf":
        assert saved["state_dict"]["history"].abs().sum() > 0                     # so do QMF's histories
    loads, real_load = [], torch.load
    with pytest.MonkeyPatch.context() as mp:    # last.pt is read onto the CPU: RNG states must stay CPU
        mp.setattr(C.torch, "load", lambda f, **kw: loads.append((Path(f).name, kw.get("map_location"))) or
                   real_load(f, **kw))          # tensors (a CUDA map_location broke set_rng_state)
        [resumed] = train_av.main(argv + ["--out_dir", str(out), "--resume"])
    assert ("last.pt", "cpu") in loads
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert not (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists()


@pytest.mark.parametrize("method, extra, stop_after", [
    ("gblending", ["--epochs", "2", "--gb_super_epoch", "1"], 1),      # re-estimates its weights at epoch 2
    ("pmr", ["--epochs", "3", "--pmr_momentum", "0.5"], 2),            # blends its saved prototypes at epoch 3
    ("reconboost", ["--epochs", "3"], 2)])                             # starts text's stage at epoch 3
def test_stateful_balancing_methods_stopped_between_epochs_resume_exactly(method, extra, stop_after, it_root,
                                                                           tmp_path, monkeypatch):
    """Stopped once epoch `stop_after` is saved, the run resumes from last.pt into a step that uses the saved
    state (G-Blending's estimate, PMR's prototypes, ReconBoost's fresh optimizer state) as the uninterrupted one."""
    argv = it_argv(it_root, method, *extra)
    [whole] = train_it.main(argv + ["--out_dir", str(tmp_path / "whole")])
    real, saved = C.save_checkpoint, []

    def stop(*a, **k):                           # the process stops once that epoch is saved (as a pre-emption)
        real(*a, **k)
        saved.append(1)
        if len(saved) == stop_after:
            raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_checkpoint", stop)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train_it.main(argv + ["--out_dir", str(out)])
    monkeypatch.undo()
    assert torch.load(out / "toy_it" / method / "seed0" / "last.pt", weights_only=False)["epoch"] == stop_after - 1
    [resumed] = train_it.main(argv + ["--out_dir", str(out), "--resume"])
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}


def test_train_missing_killed_and_resumed_equals_uninterrupted(tmp_path):
    argv = ["--method", "mla", "--epochs", "6", "--toy_train", "300", "--toy_val", "60", "--toy_test", "120",
            "--missing_rate", "0.3"]
    [whole] = train_missing.main(argv + ["--out_dir", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    run_dir = out / "toy_missing" / "mla" / "seed0" / "missing0.3"
    kill_after_first_epoch("train_missing.py", argv + ["--out_dir", str(out)], run_dir, tmp_path)
    [resumed] = train_missing.main(argv + ["--out_dir", str(out), "--resume"])
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    C.atomic_torch_save({"epoch": 1, "w": torch.arange(5)}, path)

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        C.atomic_torch_save({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]               # no temporary file left


@pytest.mark.parametrize("how", ["ENOSPC", "short write"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(how, tmp_path, monkeypatch):
    """A checkpoint write on a full disk: one clear line naming the file, and the previous file intact.
    torch.save reports it either as ENOSPC (here: writing into /dev/full) or, after a short write, as a
    RuntimeError "unexpected pos ..." (what a CI machine printed), recognised by the free space left."""
    path = tmp_path / "last.pt"
    C.atomic_torch_save({"epoch": 1, "w": torch.arange(5)}, path)
    if how == "ENOSPC":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        fdopen = os.fdopen
        monkeypatch.setattr(C.os, "fdopen", lambda fd, mode: (os.close(fd), fdopen(os.open("/dev/full", os.O_WRONLY),
                                                                                     mode))[1])
    else:
        def save(obj, f):
            f.write(b"PK" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        monkeypatch.setattr(C.torch, "save", save)
        monkeypatch.setattr(C, "free_bytes", lambda folder: 0)
    with pytest.raises(SystemExit) as exit_:
        C.script_main(lambda: C.atomic_torch_save({"epoch": 2, "w": torch.zeros(10**6)}, path))
    monkeypatch.undo()
    line = str(exit_.value.code)
    assert line.startswith(f"error: could not write {path}: its disk is full (") and "\n" not in line
    assert "the previous last.pt is kept" in line and "--resume" in line
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]               # no temporary file left


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def save(obj, f):
        raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")
    monkeypatch.setattr(C.torch, "save", save)
    with pytest.raises(RuntimeError, match="different types") as e:
        C.atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "best.pt")
    assert not isinstance(e.value, C.DiskFull) and list(tmp_path.iterdir()) == []


def test_crash_in_a_checkpoint_write_then_resume(it_root, tmp_path, monkeypatch):
    """The write of epoch 2's checkpoint dies; epoch 1's loads, and --resume ends as an uninterrupted run."""
    argv = it_argv(it_root, "sum", "--epochs", "2")
    [whole] = train_it.main(argv + ["--out_dir", str(tmp_path / "whole")])
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("last.pt") and sum(str(c).endswith("last.pt") for c in calls) == 2:
            raise OSError("simulated crash between write and rename")
        return real(src, dst)

    monkeypatch.setattr(C.os, "replace", replace)
    out = tmp_path / "crashed"
    with pytest.raises(OSError, match="simulated crash"):
        train_it.main(argv + ["--out_dir", str(out)])
    monkeypatch.undo()
    run_dir = out / "toy_it" / "sum" / "seed0"
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    assert not [p for p in run_dir.iterdir() if p.suffix == ".tmp"]
    [resumed] = train_it.main(argv + ["--out_dir", str(out), "--resume"])
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}


def test_non_finite_loss_stops_with_epoch_step_and_keeps_checkpoint(it_root, tmp_path, monkeypatch):
    real = C.Concat.train_step

    def poisoned(self, xs, y, optimizer, mask=None, idx=None):
        loss = real(self, xs, y, optimizer, mask, idx)
        return float("nan") if self.at[:2] == (1, 1) else loss

    monkeypatch.setattr(C.Concat, "schedule", lambda self, *at: setattr(self, "at", at))
    monkeypatch.setattr(C.Concat, "train_step", poisoned)
    # --batch_size 12: three steps an epoch on the toy set's 36 training pairs
    argv = it_argv(it_root, "concat", "--epochs", "3", "--batch_size", "12", "--out_dir", str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 2, step 2 of 3; the last good "
                                                 r"checkpoint, .*last\.pt \(after epoch 1\), is kept"):
        train_it.main(argv)
    run_dir = tmp_path / "toy_it" / "concat" / "seed0"
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    assert not (run_dir / "record.json").exists()
    with pytest.raises(SystemExit, match="error: non-finite loss"):
        C.script_main(lambda: train_it.main(argv))


def test_resume_after_divergence_takes_a_lower_lr_and_refuses_other_changes(it_root, tmp_path, monkeypatch):
    """The README's advice for a diverged run: lower --lr and --resume. The new lr applies from the next
    epoch at the same point of the schedule (lr x0.1 every epoch here); any other changed setting stops."""
    real = C.Concat.train_step

    def poisoned(self, xs, y, optimizer, mask=None, idx=None):
        loss = real(self, xs, y, optimizer, mask, idx)
        return float("nan") if self.at[0] == 1 else loss

    monkeypatch.setattr(C.Concat, "schedule", lambda self, *at: setattr(self, "at", at))
    monkeypatch.setattr(C.Concat, "train_step", poisoned)
    argv = it_argv(it_root, "concat", "--epochs", "3", "--lr_decay_step", "1", "--out_dir", str(tmp_path))
    with pytest.raises(FloatingPointError, match="at epoch 2"):
        train_it.main(argv + ["--lr", "0.05"])
    monkeypatch.undo()
    with pytest.raises(C.DataError, match=r"last\.pt: a checkpoint of a run with other settings \(--batch_size 16 "
                                          r"there, 8 now\); --resume .*only --lr and --epochs may change"):
        train_it.main(argv + ["--lr", "0.01", "--resume", "--batch_size", "8"])
    [rec] = train_it.main(argv + ["--lr", "0.01", "--resume"])
    assert [e["lr"] for e in rec["epochs"]] == [0.05, 0.001, 0.0001]
    assert rec["args"]["lr"] == 0.01 and not (tmp_path / "toy_it" / "concat" / "seed0" / "last.pt").exists()


def test_a_record_from_before_a_flag_existed_compares_as_what_it_ran():
    """Records written before --hgm/--no_hgm became one setting, or before --feature_norm existed, compare as
    the behaviour they ran with, so a sweep does not reuse them for other settings."""
    old = {"method": "mla", "no_hgm": True, "lr": 0.01}
    assert "--hgm False there, True now" in C.other_settings(old, {"method": "mla", "hgm": True, "lr": 0.01})
    assert C.other_settings(old, {"method": "mla", "hgm": False, "lr": 0.01}) == ""
    shown = C.other_settings({"method": "ae"}, {"method": "ae", "feature_norm": "train"})
    assert shown == "--feature_norm none there, train now"
    assert C.other_settings({"method": "mla"}, {"method": "mla", "processes": None}) == ""      # no torchrun
    assert C.other_settings({"method": "mla"}, {"method": "mla", "processes": 2}) == \
        "no torchrun there, torchrun --nproc_per_node 2 now"             # a setting, not a flag: named as run
    agm = {"method": "agm", "agm_epochs": 20, "pmr_ends": 70}       # AGM modulated 21 epochs before --agm_epochs
    assert C.other_settings({"method": "agm"}, agm) == "--agm_epochs 21 there, 20 now"
    assert C.other_settings({"method": "concat"}, {**agm, "method": "concat"}) == ""     # another method's flags
    assert C.other_settings({"method": "agm", "agm_ends": 5}, {"method": "agm", "agm_epochs": 6}) == ""   # 0..5
    for flag in ("gb_abs_gain", "pmr_val_prototypes", "partial_ckpt"):     # new flags: off in every older run
        method = {"gb": "gblending", "pmr": "pmr"}.get(flag.split("_")[0], "mla")
        assert C.other_settings({"method": method}, {"method": method, flag: True}) == f"--{flag} False there, True now"
        assert C.other_settings({"method": method, flag: True}, {"method": method}) == f"--{flag} True there, False now"
    # a method whose code changed records its revision: a run of the earlier code is not taken for today's
    [(_, a)] = C.list_runs(train_missing.get_args(["--method", "if_mmin"]), train_missing.METHODS)
    assert a.revision == 2
    assert C.other_settings({"method": "if_mmin"}, {"method": "if_mmin", "revision": a.revision}) == \
        "the method's revision 1 there, the method's revision 2 now"
    [(_, a)] = C.list_runs(train_missing.get_args(["--method", "ae"]), train_missing.METHODS)
    assert a.revision == 1 and C.other_settings({"method": "ae"}, {"method": "ae", "revision": a.revision}) == ""


def test_disk_full_crosses_a_process_pool():
    import pickle
    e = pickle.loads(pickle.dumps(C.DiskFull("no room for x.wav")))
    assert isinstance(e, C.DiskFull) and e.strerror == "no room for x.wav"


def test_checkpoints_are_fsynced_unless_the_tests_say_not(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(C.os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.delenv("MLA_NO_FSYNC")
    C.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    monkeypatch.setenv("MLA_NO_FSYNC", "1")
    C.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    assert len(synced) == 1 and torch.equal(torch.load(tmp_path / "b.pt")["w"], torch.ones(2))
