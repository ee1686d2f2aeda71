"""torchrun: two CPU processes (gloo) with 16 samples each train as one process with 32, every method
(tests/ddp_worker.py); a failing process, then an exact resume; a batch that does not split."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common as C
import ddp_worker
from conftest import ROOT


def start(n, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLA_NO_FSYNC": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                             str(ROOT / "tests" / "ddp_worker.py"), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def torchrun(n, *argv):
    p = start(n, *argv)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_two_processes_train_as_one_and_a_failed_one_resumes_exactly(tmp_path):
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
    # side by side; the job of two processes then starts a run in which process 1 fails in epoch 2's evaluation
    one, two = start(1, "train", str(tmp_path / "1")), start(2, "train", str(tmp_path / "2"), str(tmp_path / "killed"))
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-2000:]
    _, err = two.communicate(timeout=300)
    assert two.returncode != 0 and "error: rank 1: RuntimeError: simulated failure" in err, err[-2000:]
    assert all((tmp_path / "2" / f"{name}_{r}.pt").is_file() for name in ddp_worker.TABLE5 for r in (0, 1))
    for name in ddp_worker.TABLE5 + ddp_worker.TABLE6_ONLY:
        one = torch.load(tmp_path / "1" / f"{name}_0.pt", weights_only=False)
        r0, r1 = (torch.load(tmp_path / "2" / f"{name}_{r}.pt", weights_only=False) for r in (0, 1))
        assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])      # the ranks in step
        if name == "cpm_net":                   # its decoders' dropout draws other masks for 2 x 16 rows
            continue
        for k, v in one["state"].items():                                                # ... and as one process
            if not (name in ("dcca", "dccae") and k.startswith("classifier")):          # (L-BFGS fits, after
                assert torch.allclose(v.double(), r0["state"][k].double(), atol=1e-5), (name, k)  # float noise)
        assert one["acc"] == r0["acc"] and max(abs(a - b) for a, b in zip(one["losses"], r0["losses"])) < 1e-5
    qmf = torch.load(tmp_path / "2" / "qmf_1.pt", weights_only=False)["state"]["history"]
    assert (qmf > 0).all()                             # every sample's history, in every process
    rec = [json.loads(next((tmp_path / str(n) / "missing").rglob("record.json")).read_text()) for n in (1, 2)]
    assert all(abs(rec[0]["test"][k] - rec[1]["test"][k]) < 0.01 for k in rec[0]["test"])
    assert all(abs(a["train_loss"] - b["train_loss"]) < 1e-5 for a, b in zip(rec[0]["epochs"], rec[1]["epochs"]))
    assert all(a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)         # the job's averaged gradients
               for a, b in zip(rec[0]["epochs"], rec[1]["epochs"]))
    assert set(rec[1]["probe"]) == {"audio", "visual", "text"}         # the probe of every shard's features, gathered:
    assert all(abs(rec[0]["probe"][m] - rec[1]["probe"][m]) <= 0.5 for m in rec[1]["probe"])   # as one process's
    assert not list((tmp_path / "killed").rglob("record.json")) and list((tmp_path / "killed").rglob("last.pt"))
    assert torchrun(2, "resume", str(tmp_path / "killed")).returncode == 0
    resumed = json.loads(next((tmp_path / "killed").rglob("record.json")).read_text())   # = the uninterrupted run
    assert [resumed[k] for k in ("epochs", "best_epoch", "test")] == [rec[1][k] for k in ("epochs", "best_epoch", "test")]


def test_a_batch_that_does_not_split_evenly_is_a_clear_error(tmp_path, monkeypatch):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(C, "world", lambda: (0, 2))                   # as the first of two processes
        with pytest.raises(ValueError, match="--batch_size 7 does not split evenly over 2 processes"):
            C.make_loader(torch.utils.data.TensorDataset(torch.zeros(8)), 7, True)
    finally:
        torch.distributed.destroy_process_group()
