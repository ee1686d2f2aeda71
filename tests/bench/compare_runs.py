"""Every script's every method, two epochs on its toy set, run by the code in a folder; the numbers that must not
change between two versions of the code, saved and compared.

    python tests/bench/compare_runs.py run CODE_DIR OUT.json [--jobs 2]   # 59 runs: 3 x 15 + 12 + 2
    python tests/bench/compare_runs.py compare BEFORE.json AFTER.json      # ... identical N/N

Each run is `python train_X.py --method M --seed 1 --epochs 2` (train_missing: --missing_rate 0.5) with
OMP_NUM_THREADS=1 in CODE_DIR; kept per run: test, best_epoch and each epoch's train_loss and val.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TABLE5 = ["sum", "concat", "late_fusion", "film", "bigated", "ogm", "ogm_ge", "qmf", "mla", "mmcosine",
          "mmpareto", "agm", "gblending", "pmr", "reconboost"]
TABLE6 = ["late_fusion", "qmf", "cca", "dcca", "dccae", "ae", "cra", "mmin", "if_mmin", "cpm_net", "tate", "mla"]
RUNS = ([("train_av.py", m) for m in TABLE5] + [("train_it.py", m) for m in TABLE5]
        + [("train_ait.py", m) for m in TABLE5] + [("train_missing.py", m) for m in TABLE6]
        + [("train_clip.py", m) for m in ("clip", "mla")])


def one(code, script, method):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, script, "--method", method, "--seed", "1", "--epochs", "2", "--out_dir", out]
        if script == "train_missing.py":
            cmd += ["--missing_rate", "0.5"]
        p = subprocess.run(cmd, cwd=code, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        records = list(Path(out).rglob("record.json"))
        if p.returncode or len(records) != 1:
            return {"error": (p.stderr or p.stdout)[-2000:]}
        r = json.loads(records[0].read_text())
        return {"test": r["test"], "best_epoch": r["best_epoch"],
                "epochs": [{"train_loss": e["train_loss"], "val": e["val"]} for e in r["epochs"]]}


def run(code, out, jobs, only=None):
    runs = [(s, m) for s, m in RUNS if only is None or s in only.split(",")]
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda sm: one(code, *sm), runs))
    got = {f"{s} {m}": r for (s, m), r in zip(runs, results)}
    Path(out).write_text(json.dumps(got, indent=1))
    failed = [k for k, r in got.items() if "error" in r]
    print(f"{len(got) - len(failed)} runs finished, {len(failed)} failed: {failed}")


def compare(a, b):
    a, b = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    a = {k: v for k, v in a.items() if k in b} if len(b) < len(a) else a      # a partial run: the runs it has
    same = [k for k in a if k in b and "error" not in a[k] and a[k] == b[k]]
    for k in a:
        if k not in same:
            print(f"differs: {k}: {a[k]} != {b.get(k)}")
    print(f"identical {len(same)}/{len(a)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("code")
    r.add_argument("out")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--only", default=None, help="a comma list of scripts to run (default: all five)")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args()
    run(args.code, args.out, args.jobs, args.only) if args.cmd == "run" else compare(args.before, args.after)
