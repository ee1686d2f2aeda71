"""A run folder's faults: a damaged checkpoint, two writers, a lock left by a killed run, the files' permissions."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch

import common as C
import train_missing
from conftest import ROOT

ARGV = ["--method", "late_fusion", "--epochs", "1", "--toy_train", "120", "--toy_val", "40", "--toy_test", "40",
        "--hidden", "16"]
HOST = socket.gethostname()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A tiny run stopped after its last epoch, before its record: its folder holds best.pt, last.pt and
    last.pt.sha256 (the tests damage copies of it), and the test accuracies it would have recorded."""
    out, tested = tmp_path_factory.mktemp("unfinished"), []

    def stop(run, method, test):                   # write_record's arguments
        tested.append(test)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "write_record", stop)
        with pytest.raises(KeyboardInterrupt):
            train_missing.main(ARGV + ["--out_dir", str(out)])
    return out, tested[0]


def copy_of(unfinished, tmp_path):
    shutil.copytree(unfinished[0], tmp_path / "runs")
    return tmp_path / "runs" / "toy_missing" / "late_fusion" / "seed0" / "missing0.5"


@pytest.mark.parametrize("damage", ["truncated", "a flipped byte", "truncated, no sidecar"])
def test_resume_from_a_damaged_last_pt_is_one_line_and_trains_nothing(damage, unfinished, tmp_path, capsys):
    run_dir = copy_of(unfinished, tmp_path)
    last, sums = run_dir / "last.pt", run_dir / "last.pt.sha256"
    assert sums.read_text().split()[0] == C.sha256(last)
    data = bytearray(last.read_bytes())
    if damage == "a flipped byte":              # inside the tensors' data: torch.load alone would not notice
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:len(data) // 2]
    last.write_bytes(data)
    if damage.endswith("no sidecar"):           # a last.pt written before the checksum existed
        sums.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        C.script_main(lambda: train_missing.main(ARGV + ["--out_dir", str(tmp_path / "runs"), "--resume"]))
    line = str(exit_.value.code)
    assert line.startswith(f"error: {last}: damaged, it cannot be read (") and "\n" not in line
    assert line.endswith("it cannot continue the run: rerun without --resume to start it over")
    assert ("(ValueError: its SHA-256 is not the one written with it, in last.pt.sha256)" in line) == (
        "sidecar" not in damage)                # else what torch.load said
    assert "epoch " not in capsys.readouterr().out and not (run_dir / "record.json").exists()


def test_an_unreadable_best_pt_is_one_line(unfinished, tmp_path):
    run_dir = copy_of(unfinished, tmp_path)
    best = run_dir / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    with pytest.raises(C.DataError) as e:
        C.load_best(C.Run(run_dir, "train_av.py", {}), torch.nn.Linear(2, 2))
    assert str(e.value).startswith(f"{best}: damaged, it cannot be read (") and "\n" not in str(e.value)
    assert str(e.value).endswith("the selected epoch's weights are lost: rerun without --resume to train the run again")


def test_two_runs_into_one_folder_one_trains_the_other_is_refused(unfinished, tmp_path):
    """Two runs started together: the one that takes the folder is paused (SIGSTOP) while it holds it, so the
    other meets it whatever the timing; it then ends as a run alone does (the fixture's run)."""
    cmd = [sys.executable, str(ROOT / "train_missing.py"), *ARGV, "--out_dir", str(tmp_path / "runs")]
    run_dir, procs = tmp_path / "runs" / "toy_missing" / "late_fusion" / "seed0" / "missing0.5", {}
    for _ in range(2):
        p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[p.pid] = p
    deadline = time.time() + 120
    while not ((run_dir / "run.lock").is_file() and (run_dir / "run.lock").read_text()) and time.time() < deadline:
        time.sleep(0.005)
    pid = int((run_dir / "run.lock").read_text().split()[-1])
    first, [second] = procs.pop(pid), procs.values()
    os.kill(pid, signal.SIGSTOP)
    try:
        out2, err2 = second.communicate(timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert second.returncode == 1 and out2 == ""
    assert err2 == (f"error: {run_dir}: another run writes into this folder ({HOST} pid {pid} holds its run.lock); "
                    "wait until it ends, or pass another --out_dir\n")
    assert first.returncode == 0 and err == "" and "note:" not in out
    assert json.loads((run_dir / "record.json").read_text())["test"] == unfinished[1]
    assert (run_dir / "run.lock").read_text() == ""                    # released


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    killed = f"{HOST} pid {dead_pid()}"
    (tmp_path / "run.lock").write_text(killed + "\n")
    lock, holder = C.take_lock(tmp_path)
    assert holder is None and (tmp_path / "run.lock").read_text() == f"{HOST} pid {os.getpid()}\n"
    assert capsys.readouterr().out == (f"note: {tmp_path / 'run.lock'} names {killed}, which is no longer running; "
                                       "this run takes the folder over\n")
    again, holder = C.take_lock(tmp_path)       # another open file: flock refuses it while the first holds it
    assert again is None and holder == f"{HOST} pid {os.getpid()}"
    C.release_lock(lock)
    assert (tmp_path / "run.lock").read_text() == ""
    lock, holder = C.take_lock(tmp_path)        # released, not stale: no note
    C.release_lock(lock)
    assert holder is None and capsys.readouterr().out == ""


def test_without_flock_the_lock_line_decides(tmp_path, monkeypatch, capsys):
    """Where the file system has no flock (some NFS), a live pid of this host holds the folder, a dead one does
    not, and another host's cannot be checked so it holds too."""
    import errno
    import fcntl

    def no_flock(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    for line, held in [(f"{HOST} pid {os.getppid()}", True), (f"other-host pid {dead_pid()}", True),
                       (f"{HOST} pid {dead_pid()}", False)]:
        (tmp_path / "run.lock").write_text(line + "\n")
        lock, holder = C.take_lock(tmp_path)
        assert (holder == line) if held else (holder is None and lock is not None)
        C.release_lock(lock)
    assert capsys.readouterr().out.count("is no longer running; this run takes the folder over") == 1


def test_two_sweeps_share_the_runs(tmp_path, monkeypatch, capsys):
    """A sweep skips a run another process holds, trains the next, then waits for the held one: when its holder
    finishes it (record written, lock released), the sweep takes its record instead of training it again."""
    runs = [("[1/2] a", Namespace(name="a")), ("[2/2] b", Namespace(name="b"))]
    trained = []

    def train(args):
        trained.append(args.name)
        return {"test": {"multi": 50.0}, "best_epoch": 0, "select_on": "val", "wall_time_s": 1}

    other, _ = C.take_lock(tmp_path / "a")      # the other sweep's process holds run a

    def other_finishes(seconds):
        C.atomic_json_dump({"args": {"name": "a"}, "test": {"multi": 60.0}}, tmp_path / "a" / "record.json")
        C.release_lock(other)

    monkeypatch.setattr(C.time, "sleep", other_finishes)
    records = C.train_runs(runs, lambda a: tmp_path / a.name, train)
    assert trained == ["b"] and [r["test"]["multi"] for r in records] == [60.0, 50.0]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[1/2] a: {tmp_path / 'a'} is held by {HOST} pid {os.getpid()}; this sweep comes back to it"
    assert out[1].startswith("[2/2] b: test multi  50.0") and out[2] == f"[1/2] a: skipped, {tmp_path / 'a'}" \
        "/record.json exists" and len(out) == 3


@pytest.mark.parametrize("umask, mode", [(0o022, "-rw-r--r--"), (0o077, "-rw-------")])
def test_files_get_the_umasks_permissions(umask, mode, tmp_path):
    import stat
    old = os.umask(umask)
    try:
        C.atomic_json_dump({"a": 1}, tmp_path / "record.json")
        C.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "best.pt")
        C.save_checksummed({"w": torch.ones(2)}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    modes = {p.name: stat.filemode(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["record.json", "best.pt", "last.pt", "last.pt.sha256"], mode)


def test_a_checkpoint_written_intact_but_unreadable_is_not_called_damaged(tmp_path, monkeypatch):
    """Bytes that match the SHA-256 written with them are not damage: the real error (another torch, a class
    renamed in the code) comes through instead of advice to start over."""
    C.save_checksummed({"w": torch.ones(2)}, tmp_path / "last.pt")

    def load(*a, **k):
        raise AttributeError("Can't get attribute 'Gone' on <module 'common'>")
    monkeypatch.setattr(C.torch, "load", load)
    with pytest.raises(AttributeError, match="Gone"):
        C.load_checkpoint(tmp_path / "last.pt", "rerun without --resume")
    (tmp_path / "last.pt.sha256").unlink()                  # no digest to tell: as before, damaged
    with pytest.raises(C.DataError, match=r"last.pt: damaged, it cannot be read \(AttributeError: Can't get"):
        C.load_checkpoint(tmp_path / "last.pt", "rerun without --resume")
