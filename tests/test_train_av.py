"""train_av.py through its own entry point: every method, the record, determinism, selection, errors."""
import json
import math
import subprocess
import sys

import pytest
import torch

import common as C
import train_av
from conftest import ROOT, TINY, check_board, own_log


def toy_argv(toy_root, out, *extra):
    return ["--dataset", "toy", "--data_root", str(toy_root), "--out_dir", str(out), *TINY, *extra]


def run(toy_root, out, *extra):
    [record] = train_av.main(toy_argv(toy_root, out, *extra))
    return record


@pytest.mark.parametrize("method", train_av.METHODS)
def test_every_method_trains_one_toy_epoch_and_writes_record(method, toy_root, tmp_path):
    rec = run(toy_root, tmp_path, "--method", method)
    run_dir = tmp_path / "toy_av" / method / "seed0"
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert tuple(on_disk) == C.RECORD_KEYS                   # exactly the record's keys, in order
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["script"] == "train_av.py" and on_disk["dataset"] == "toy" and on_disk["method"] == method
    assert on_disk["modalities"] == ["audio", "video"] and on_disk["select_on"] == "val"
    assert set(on_disk["args"]) == set(vars(train_av.get_args([]))) | {"revision"}     # + the method's revision
    own = own_log(method)                          # a method's own log and the encoders' gradient norms
    assert [set(e) for e in on_disk["epochs"]] == [{"epoch", "lr", "train_loss", "val"} | own]
    for key in own - {"hgm_p_trace", "gb_weights"}:     # per modality, a number (reconboost's first epoch: audio's
        values = on_disk["epochs"][0][key]             # stage, video has no gradient to measure)
        assert set(values) == {"audio", "video"}, key
        assert all(isinstance(v, float) and math.isfinite(v) for v in values.values() if v is not None), key
        assert [m for m, v in values.items() if v is None] == (["video"] if method == "reconboost" else []), key
    assert set(on_disk["epochs"][0]["val"]) == {"audio", "video", "multi"}
    assert set(on_disk["test"]) == {"audio", "video", "multi"}
    assert all(0 <= v <= 100 for v in on_disk["test"].values())
    assert on_disk["best_epoch"] == 1 and on_disk["epochs"][0]["epoch"] == 1 and on_disk["first_epoch"] == 1
    assert on_disk["wall_time_s"] > 0 and on_disk["version"]
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["method"] == method
    if method == "mla":
        assert "P" in ckpt["state_dict"] and not torch.equal(ckpt["state_dict"]["P"], torch.eye(512))
    if method == "qmf":
        assert ckpt["state_dict"]["history"].abs().sum() > 0


def test_same_seed_gives_identical_records(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "PROBE_DECAYS", (1e-3,))             # the probe's grid: one fit a modality (test_probe.py)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "args", "probe")}
    a = run(toy_root, tmp_path / "a", "--method", "ogm_ge")
    b = run(toy_root, tmp_path / "b", "--method", "ogm_ge", "--tensorboard", "--tb_every", "1", "--probe")
    c = run(toy_root, tmp_path / "c", "--method", "ogm_ge", "--seed", "1")
    assert strip(a) == strip(b) and C.other_settings(a["args"], b["args"]) == ""   # neither changes the training
    assert strip(a)["epochs"] != strip(c)["epochs"]
    assert "ogm_coeff/audio" in check_board(b, tmp_path / "b" / "toy_av" / "ogm_ge" / "seed0")
    assert a["probe"] is None and list(b["probe"]) == ["audio", "video"]           # the linear probe after the test
    assert all(0 <= v <= 100 for v in b["probe"].values())


def test_select_on_last_and_test(toy_root, tmp_path, capsys):
    last = run(toy_root, tmp_path, "--method", "concat", "--epochs", "2", "--select_on", "last")
    out = capsys.readouterr().out           # console and record count the epochs alike, from 1
    assert [e["epoch"] for e in last["epochs"]] == [1, 2] and last["best_epoch"] == 2
    assert "epoch   2/2  loss" in out and "test (epoch 2 by last)" in out
    t = run(toy_root, tmp_path, "--method", "sum", "--epochs", "2", "--select_on", "test", "--val_ratio", "0")
    assert all(e["val"] is None and set(e["test"]) == {"audio", "video", "multi"} for e in t["epochs"])
    best = max(range(2), key=lambda i: (t["epochs"][i]["test"]["multi"], -i))
    assert t["best_epoch"] == best + 1 and t["test"] == t["epochs"][best]["test"]


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(C.DataError, match="(?s)data root not found.*accepted layouts"):
        train_av.main(["--dataset", "cremad", "--data_root", str(tmp_path / "absent")])
    # the script's default root is data/<dataset>; from the command line the error is one message
    r = subprocess.run([sys.executable, str(ROOT / "train_av.py"), "--dataset", "ks"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.startswith("error: data/ks: data root not found") and "Traceback" not in r.stderr


def test_sweep_methods_and_seeds_in_one_call(toy_root, tmp_path, capsys):
    recs = train_av.main(toy_argv(toy_root, tmp_path, "--method", "sum,mla", "--seeds", "3,4"))
    assert [(r["method"], r["seed"]) for r in recs] == [("sum", 3), ("mla", 3), ("sum", 4), ("mla", 4)]
    for r in recs:
        assert json.loads((tmp_path / "toy_av" / r["method"] / f"seed{r['seed']}" / "record.json").read_text()) == r
    out = capsys.readouterr().out
    assert "[4/4] mla seed 4: test audio" in out
    with pytest.raises(SystemExit):
        train_av.get_args(["--method", "sum,nope"])


def test_killed_sweep_reruns_only_missing_runs_and_reuses_only_runs_of_the_same_settings(toy_root, tmp_path):
    import signal
    import time
    argv = toy_argv(toy_root, tmp_path, "--method", "sum,concat")
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_av.py"), *argv], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
        first = tmp_path / "toy_av" / "sum" / "seed0" / "record.json"
        deadline = time.time() + 120
        while not first.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)            # a no-op if it has already exited
        proc.wait()
        err.seek(0)
        assert first.exists(), f"the first run of the sweep should have finished (exit {proc.returncode}): {err.read()}"
    done = {p: p.read_bytes() for p in tmp_path.rglob("record.json")}
    assert len(done) < 2, "killed before the sweep ended"
    recs = train_av.main(argv)
    assert [r["method"] for r in recs] == ["sum", "concat"]
    after = {p: p.read_bytes() for p in tmp_path.rglob("record.json")}
    assert len(after) == 2
    assert all(after[p] == b for p, b in done.items())       # finished runs were not run again
    # the finished sweep again (formerly test_a_sweep_does_not_reuse_a_run_of_other_settings, which trained the
    # same two runs afresh): a sweep skips a finished run only when it had the same settings (device-only flags
    # aside)
    first = recs
    again = train_av.main(argv + ["--num_workers", "0"])              # how it runs: the records are reused
    assert again == first
    with pytest.raises(C.DataError, match=r"toy_av/sum/seed0/record.json: a finished run with other settings "
                                          r"\(--lr 0\.01 there, 0\.02 now\)"):
        train_av.main(argv + ["--lr", "0.02"])
    with pytest.raises(C.DataError, match=r"a finished run with other settings \(--lr 0\.01 there, 0\.02 now\)"):
        train_av.main(toy_argv(toy_root, tmp_path, "--method", "sum", "--lr", "0.02"))    # a single run too


def test_autocast_keeps_P_in_full_precision(tiny_encoders):
    """The AMP plumbing of train_one_epoch/evaluate (bf16 autocast), on the CPU's autocast."""
    torch.manual_seed(0)
    m = C.MLA(tiny_encoders(5, 7, dim=16), 4, ["audio", "video"])
    data = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randn(32, 7), torch.randint(0, 4, (32,)),
                                          torch.arange(32))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loss = C.train_one_epoch(m, loader, opt, 0, "cpu", amp=True)
    assert math.isfinite(loss)
    assert m.P.dtype == torch.float32 and torch.equal(m.P, m.P.T) and torch.isfinite(m.P).all()
    assert set(C.evaluate(m, loader, "cpu", amp=True)) == {"audio", "video", "multi"}


def test_losses_read_back_late_still_name_the_first_non_finite_step():
    """On a GPU the epoch loop reads losses back every few steps (each read waits for the GPU): a NaN is
    still reported at its own step, and the epoch mean is that of every step."""
    class Stub(torch.nn.Module):
        modalities = ["x"]

        def __init__(self, bad_step):
            super().__init__()
            self.bad_step = bad_step

        def schedule(self, epoch, step, steps):
            self.step = step

        def train_step(self, xs, y, optimizer, mask=None, idx=None):
            return torch.tensor(float("nan") if self.step == self.bad_step else float(self.step))

    ds = torch.utils.data.TensorDataset(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long), torch.arange(6))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 4, step 2 of 3"):
        C.train_one_epoch(Stub(1), loader, None, 3, "cpu", check_every=10)
    assert C.train_one_epoch(Stub(None), loader, None, 0, "cpu", check_every=2) == 1.0     # (0 + 1 + 2) / 3


def test_compile_flag_compiles_each_encoder_in_place(toy_root, tmp_path, monkeypatch):
    """--compile hands every encoder (and nothing else) to nn.Module.compile, which compiles in place, so
    checkpoints keep the eager keys. The training run stubs the compile: a real one takes minutes here."""
    encoder = C.VideoResNet()
    keys = list(encoder.state_dict())
    encoder.compile()                   # lazy: nothing is compiled before the first call
    assert list(encoder.state_dict()) == keys
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((type(self).__name__, k)))
    run(toy_root, tmp_path, "--method", "mla", "--compile")
    assert compiled == [("AudioResNet", {"dynamic": False}), ("VideoResNet", {"dynamic": False})]


@pytest.mark.parametrize("script", ["train_av", "train_it", "train_ait", "train_missing", "train_clip"])
def test_no_validation_split_needs_another_selection(script):
    get_args = __import__(script).get_args
    with pytest.raises(SystemExit):
        get_args(["--val_ratio", "0"])
    assert get_args(["--val_ratio", "0", "--select_on", "last"]).select_on == "last"
    if script in ("train_av", "train_it", "train_ait"):          # PMR's prototypes from a split that is not there
        with pytest.raises(SystemExit):
            get_args(["--val_ratio", "0", "--select_on", "last", "--method", "pmr", "--pmr_val_prototypes"])


def test_a_toy_set_made_with_other_settings_is_reused_with_a_warning(tmp_path, capsys):
    made = []
    make = lambda root, **k: (made.append(k), root.mkdir(parents=True, exist_ok=True), (root / "a.txt").write_text("x"))
    C.ensure_toy(tmp_path / "toy", "a.txt", make, seed=0, n_train=40)
    C.ensure_toy(tmp_path / "toy", "a.txt", make, seed=0, n_train=40)
    assert made == [{"seed": 0, "n_train": 40}] and capsys.readouterr().err == ""
    assert json.loads((tmp_path / "toy" / "toy.json").read_text()) == {"seed": 0, "n_train": 40}
    C.ensure_toy(tmp_path / "toy", "a.txt", make, seed=0, n_train=50)
    assert len(made) == 1
    assert "holds a toy set made with other settings (n_train 40 there, 50 now); it is used as it is" in \
        capsys.readouterr().err


def test_cpu_threads_sets_torchs_threads_for_the_run_only(toy_root, tmp_path, monkeypatch):
    seen, real = [], C.train_one_epoch
    monkeypatch.setattr(C, "train_one_epoch", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    with C.torch_threads(2):                   # not the run's count, so that both changes show
        before = torch.get_num_threads()
        [rec] = train_av.main(toy_argv(toy_root, tmp_path, "--method", "sum", "--cpu_threads", "1"))
        assert seen == [1] and rec["args"]["cpu_threads"] == 1
        assert torch.get_num_threads() == before == 2


def test_a_run_without_resume_over_an_unfinished_one_says_it_starts_over(toy_root, tmp_path, capsys):
    folder = tmp_path / "toy_av" / "sum" / "seed0"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"an interrupted run")
    run(toy_root, tmp_path, "--method", "sum")
    assert f"note: {folder / 'last.pt'} holds an unfinished run; it is started over (rerun with --resume" in \
        capsys.readouterr().out
    assert not (folder / "last.pt").exists() and (folder / "record.json").is_file()


@pytest.mark.parametrize("argv, message", [(["--lr", "-1"], "--lr must not be negative"),
                                           (["--seeds", "0,x"], "--seeds 0,x: expected a comma list of whole numbers")])
def test_bad_shared_flags_are_usage_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_av.get_args(argv)
    assert message in capsys.readouterr().err
