"""torchrun: epoch time of train_av.py's MLA on one process and on two (CPU), or, with --gpu, of the single-GPU
NCCL path against no torchrun.

Each round runs both commands once, alternating which goes first, on the generated toy A-V set (ResNet-18
encoders at small sizes); the time of a run is the mean of its epochs' times after the first (start-up, the
toy set and the first epoch's warm-up left out). CPU: one process with all the threads against two with half
each (the same cores), ratio = one process / two; a ratio above 1 means two processes are faster. --gpu: no
torchrun against torchrun --nproc_per_node 1 (NCCL), ratio = torchrun / none, the overhead of the path.

    python tests/bench/bench_ddp.py [--rounds 3] [--epochs 3] [--gpu]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def epoch_time(cmd, out, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLA_NO_FSYNC": "1"}
    done = subprocess.run(cmd + ["--out_dir", out], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    record = json.loads(next(Path(out).rglob("record.json")).read_text())
    ticks = [float(line.rsplit("(", 1)[1].rstrip("s)")) for line in done.stdout.splitlines()
             if line.startswith("epoch ")]
    return statistics.mean(ticks[1:]) if len(ticks) > 1 else record["wall_time_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="the single-GPU NCCL path against no torchrun")
    args = p.parse_args()
    train = [str(ROOT / "train_av.py"), "--method", "mla", "--epochs", str(args.epochs), "--toy_train", "512",
             "--toy_test", "64", "--batch_size", "32", "--select_on", "last", "--val_ratio", "0",
             "--device", "cuda" if args.gpu else "cpu"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cores = os.cpu_count() or 2
    if args.gpu:
        a, b, names = ([sys.executable] + train, cores), (run + ["1"] + train, cores), ("no torchrun", "torchrun 1 GPU")
    else:
        a, b, names = (run + ["1"] + train, cores), (run + ["2"] + train, max(1, cores // 2)), ("1 process", "2 processes")
    times = {names[0]: [], names[1]: []}
    for r in range(args.rounds):
        for name, (cmd, threads) in (zip(names, (a, b)) if r % 2 == 0 else zip(names[::-1], (b, a))):
            with tempfile.TemporaryDirectory() as out:
                times[name].append(epoch_time(cmd, out, threads))
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s per epoch", flush=True)
    ma, mb = (statistics.median(times[n]) for n in names)
    print(f"median epoch: {names[0]} {ma:.2f} s, {names[1]} {mb:.2f} s")
    if args.gpu:
        print(f"ratio torchrun / no torchrun epoch time = {mb / ma:.2f}")
    else:
        print(f"ratio 1 process / 2 processes epoch time = {ma / mb:.2f}")


if __name__ == "__main__":
    main()
