import argparse
import contextlib
import io
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

collect_ignore = ["bench"]       # benchmark scripts are run by hand, never collected
# checkpoints skip the fsync in tests (it guards against a power loss, which no test makes; the toy A-V runs
# write about 260 MB an epoch); the scripts they start inherit it
os.environ["MLA_NO_FSYNC"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Two test processes (pytest-xdist, in requirements.txt) unless -n says how many: every test runs on one torch
    thread (below), so one process would leave the second core of a 2-core machine idle (the suite: 233 s in one
    process, about half in two). Without pytest-xdist, or with -n 0 or --pdb, the tests run in this process."""
    if getattr(config.option, "numprocesses", 0) is None and "PYTEST_XDIST_WORKER" not in os.environ \
            and not config.option.usepdb and (os.cpu_count() or 1) > 1:
        config.option.numprocesses, config.option.dist = 2, "worksteal"    # worksteal: no process idles at the end


def pytest_itemcollected(item):
    if "toy_root" in item.fixturenames:         # the A-V toy's tests train on it: one at a time (_one_av_test_at_a_time)
        item.add_marker(pytest.mark.av_runs)


def pytest_collection_modifyitems(config, items):
    """The A-V runs first: in two processes the first one's share then starts with all of them (the longest tests,
    one at a time), and the other takes its later tests as it runs out of its own."""
    items.sort(key=lambda item: item.get_closest_marker("av_runs") is None)


def pytest_configure(config):
    config.addinivalue_line("markers", "av_runs: trains on an A-V set (one such test at a time, see conftest)")
    # torch 2.11's own torch.utils.mkldnn, imported on the compile path, uses a deprecated decorator
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Every test on one torch CPU thread, as every toy run: the tests' tensors are tiny, and on the 2-core machines
    the suite runs on more threads mostly wait for each other. A test of --cpu_threads sets another count first."""
    import common as C
    with C.torch_threads(1):
        yield


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
def _one_av_test_at_a_time(request, tmp_path_factory):
    """A test that trains on an A-V set (marked av_runs; every user of toy_root) waits for the one another test process
    runs: a toy A-V run writes up to 0.5 GB of checkpoints (two full-size ResNet-18s, their optimizer state, the file
    replaced), so in two processes the suite still needs about 0.5 GB of disk, not twice that. The lock is a file
    beside the processes' temporary folders; its turn ends once the test's folder is deleted (below)."""
    if request.node.get_closest_marker("av_runs") is None:
        yield
        return
    import fcntl
    with open(tmp_path_factory.getbasetemp().parent / "av_runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _delete_tmp_path_of_a_passing_test(request, _one_av_test_at_a_time):
    """A toy A-V run writes about 260 MB of checkpoints (two full-size ResNet-18s and their optimizer
    state). The folder of a test that passed is deleted when it ends, so the suite needs a few hundred
    MB of free disk, not several GB; a failed test's folder is kept to look into."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and not request.node.stash.get(FAILED, False):
        shutil.rmtree(path, ignore_errors=True)


def command_line(script, *argv, cwd):
    """`python <script> argv` run from folder cwd as its command line runs it (as __main__, through script_main), in
    this process: (exit status, what it wrote to stderr). A fresh interpreter costs 2 s a test; train_av.py's test
    of a bad data root starts one (test_train_av.py), the other scripts' use this."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.chdir(cwd), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(ROOT / script), *argv])
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):                  # sys.exit(text): the interpreter writes the text, exit status 1
        err.write(code + "\n")
        code = 1
    return code or 0, err.getvalue()


def written(root):
    """The files a run wrote under root (a record, checkpoints, ...): everything but the empty run.lock a run
    holds while it trains and leaves behind."""
    return sorted(str(f.relative_to(root)) for f in Path(root).rglob("*") if f.is_file() and f.name != "run.lock")


class TinyEncoder(nn.Module):
    """A small stand-in encoder with the interface of the real ones (a `dim` attribute)."""

    def __init__(self, d_in, dim=8):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_encoders():
    torch.manual_seed(0)
    return lambda *d_ins, dim=8: [TinyEncoder(d, dim) for d in d_ins]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A tiny toy A-V set on disk, shared by the script tests: 4 training clips of each of the 6 classes (one
    of each held out for validation: train 18, val 6) and 2 test clips of each. A toy run's time is that of its
    clips through two full ResNet-18s, so the set is as small as the tests allow (48 and 24 clips before)."""
    import common as C
    root = tmp_path_factory.mktemp("toy_av")
    C.make_toy_av(root, seed=0, n_train=24, n_test=12, frames=2, recipe=C.ToyAV(px=24))
    return root


# the A-V toy's defaults made smaller; one thread (--cpu_threads 1): on the shared 2-core test machine, with
# another job on the cores, a toy run with torch's two threads took 3 to 4 times as long as with one (the two
# threads wait on each other); the tests' runs compare records made alike, all with this one setting
TINY = ["--image_size", "16", "--frames", "2", "--audio_len", "32", "--num_mel_bins", "16",
        "--batch_size", "16", "--epochs", "1", "--cpu_threads", "1"]


# the keys a method adds to each epoch entry besides epoch, lr, train_loss and val (its epoch_log, then the loop's
# gradient norm per encoder, which the Table 6 methods with one network over every view lack)
OWN_LOG = {"ogm": {"ogm_coeff", "ogm_ratio"}, "ogm_ge": {"ogm_coeff", "ogm_ratio"}, "qmf": {"qmf_conf"},
           "mla": {"hgm_p_trace"}, "mmpareto": {"mmpareto_weight", "mmpareto_cos"}, "agm": {"agm_coeff", "agm_score"},
           "gblending": {"gb_weights"}, "pmr": {"pmr_ratio", "pmr_coeff", "pmr_entropy_coeff"}}


def own_log(method):
    return OWN_LOG.get(method, set()) | (set() if method in ("cca", "ae", "cra", "cpm_net") else {"grad_norm"})


def board_scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in folder, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def entry_numbers(entry, prefix=""):
    """{tag: number} of an epoch entry, nested keys joined by '/', lists by index; None and the epoch left out."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, (dict, list)):
            out.update(entry_numbers(v if isinstance(v, dict) else dict(enumerate(v)), f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and f"{prefix}{k}" != "epoch":
            out[f"{prefix}{k}"] = v
    return out


def check_board(rec, run_dir):
    """A finished --tensorboard --tb_every 1 run's event files against its record: tb/epochs holds every number of
    every epoch entry at its epoch (as the record counts, from 1), each epoch once; tb/steps every step's loss, each
    step once, whose mean over an epoch is the epoch's train_loss."""
    import pytest
    want = {}
    for e in rec["epochs"]:
        for tag, v in entry_numbers(e).items():
            want.setdefault(tag, []).append((e["epoch"], v))
    got = board_scalars(run_dir / "tb" / "epochs")
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    [losses] = board_scalars(run_dir / "tb" / "steps").values()
    n = len(losses) // len(rec["epochs"])
    assert [s for s, _ in losses] == list(range(len(rec["epochs"]) * n)) and n > 0
    for i, e in enumerate(rec["epochs"]):
        assert sum(v for _, v in losses[i * n:(i + 1) * n]) / n == pytest.approx(e["train_loss"], rel=1e-5)
    return got


def step(method, xs, y, idx, optimizer, epoch=0, batch=0, steps=1, mask=None):
    """One training step as common.train_one_epoch takes it: the method's schedule(epoch, batch, steps), then
    train_step with the mask (or None) and the batch's sample indices."""
    method.schedule(epoch, batch, steps)
    return method.train_step(xs, y, optimizer, mask=mask, idx=idx)


def options(name, **flags):
    """The constructor keywords of method `name` as a script gets them from its flags (add_method_args, then
    method_options): `flags` by flag name (e.g. ae_widths=[8, 4]), the flags' defaults for the others."""
    import common as C
    p = argparse.ArgumentParser()
    C.add_method_args(p, [name])
    args = p.parse_args([])
    for k, v in flags.items():
        if k in vars(args):
            setattr(args, k, v)
    return C.method_options(name, args)
