"""A CREMA-D-sized training epoch on a GPU: where does the time go?

Generates a CREMA-D-shaped fixture at paper sizes (default 2,000 clips; a 2.5 s 16 kHz WAV and three
480 x 360 JPEGs each; 224 x 224 crops, 1024 x 128 fbank, batch 64), then times training epochs of the
same MLA model (ResNet-18 encoders, bf16 autocast, channels_last, cuDNN autotuning: as train_av.py on
CUDA) fed four ways:
  model_only:    the same number of batches of ready, normalised tensors already on the GPU (the bound);
  pipeline:      this project's path on CUDA: CachedAVDataset (memory-mapped fbank and uint8 frames,
                 built once, not timed) read batch-wise by GatherLoader threads into pinned memory,
                 copied and cropped/flipped/normalised on a side stream while the previous batch trains;
  cache_workers: the same cache through a DataLoader with worker processes (one item at a time, then a
                 second copy into pinned memory), for comparison;
  decode:        AVDataset, which opens each JPEG with PIL and computes the fbank from the WAV in the
                 loader workers every epoch (the official way).
The four are alternated round by round; the medians give the ratios (goals: pipeline/decode >= 5,
pipeline/model_only >= 0.70, as throughput). First it checks that the side-stream path hands out the
same tensors as a plain copy and transform.

The two loaders with worker processes run in a second process of this script (same model, same
fixture, driven epoch by epoch over a pipe, so the alternation holds): each epoch forks their workers
from the process that runs them, and a fork makes that process's memory copy-on-write, which taxed the
next epochs of a pipeline run in the same process (measured on an H200: pipeline 1.11-1.35 s per epoch
after such epochs, 0.97-0.98 s without them; the loader alone 0.26 s against 0.09 s). A training run
never mixes the two: train_av.py on CUDA reads the cache with GatherLoader for every split.

    python tests/bench/bench_gpu_epoch.py [--clips 2000] [--workers 8] [--rounds 3] [--device cuda] [--compile]
"""
import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common as C  # noqa: E402
from bench_data import fixture_clips  # noqa: E402

SIZES = dict(image_size=224, frames=3, audio_len=1024, num_mel_bins=128)
FORKING = ("cache_workers", "decode")      # loaders with worker processes: timed in the second process


def get_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8, help="loader workers/threads (train_av.py's paper default)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", default="mla")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="model_only,pipeline,cache_workers,decode",
                   help="which of model_only,pipeline,cache_workers,decode to time (model_only and pipeline always)")
    p.add_argument("--compile", action="store_true", help="compile the encoders, as train_av.py --compile")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)   # fixture folder: be the second process
    return p.parse_args(argv)


class Bench:
    """One model and the loaders of some variants, in this process; `time(name)` runs one epoch."""

    def __init__(self, args, clips, cache_dir, names):
        self.dev, self.names, self.args = torch.device(args.device), names, args
        self.amp = self.dev.type == "cuda"
        cached = C.CachedAVDataset(clips, True, C.AVSizes(**SIZES), cache_dir=cache_dir, num_workers=args.workers,
                                   augment_on="device" if self.amp else "workers")
        make = {"pipeline": lambda: C.make_loader(cached, args.batch_size, True, 0, args.workers, self.dev,
                                                   gather=self.amp),          # as train_av.py: gathered on CUDA
                "cache_workers": lambda: torch.utils.data.DataLoader(
                    cached, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                    worker_init_fn=C.seed_worker, pin_memory=self.amp),
                "decode": lambda: C.make_loader(C.AVDataset(clips, True, **SIZES), args.batch_size, True, 0,
                                                args.workers, self.dev)}
        self.loaders = {name: make[name]() for name in names if name in make}
        self.cached, self.n_batches = cached, len(C.make_loader(cached, args.batch_size, True))
        if self.amp:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        self.method = C.build_method(args.method, [C.AudioResNet(), C.VideoResNet()], 6, ["audio", "video"],
                                     len(clips), **({"alpha": 0.1} if args.method in ("ogm", "ogm_ge") else {}))
        self.method.apply(C.init_weights)
        self.method.to(self.dev, memory_format=torch.channels_last if self.amp else torch.contiguous_format)
        if args.compile:
            C.compile_encoders(self.method)
        self.opt = torch.optim.SGD(self.method.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        b, dev = args.batch_size, self.dev
        self.ready = [([torch.randn(b, 1, 1024, 128, device=dev), torch.randn(b, 3, 3, 224, 224, device=dev)],
                       torch.randint(0, 6, (b,), device=dev), torch.arange(b, device=dev)) for _ in range(4)]

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time(self, name):
        self.sync()
        t = time.perf_counter()
        if name == "model_only":
            self.method.train()
            for step in range(self.n_batches):
                xs, y, idx = self.ready[step % len(self.ready)]
                self.method.schedule(0, step, self.n_batches)
                with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
                    self.method.train_step(xs, y, self.opt, idx=idx)
        else:
            C.train_one_epoch(self.method, self.loaders[name], self.opt, 0, self.dev, amp=self.amp)
        self.sync()
        return time.perf_counter() - t

    def loader_alone(self, name):
        """An epoch of the loader with the copy and the transform, no model; and the wait for batch 1."""
        self.sync()
        t, first = time.perf_counter(), None
        for _ in C.device_batches(self.loaders[name], self.dev, True):
            if first is None:
                self.sync()
                first = time.perf_counter() - t
        self.sync()
        return time.perf_counter() - t, first

    def check(self):
        """The side-stream path hands out exactly what a plain copy + transform gives (CUDA only)."""
        fresh = lambda: C.make_loader(self.cached, self.args.batch_size, True, 1, self.args.workers, self.dev,
                                      gather=True)
        same, pairs = True, zip(C.device_batches(fresh(), self.dev, False), fresh())
        for (xs, y, idx, _), batch in itertools.islice(pairs, 6):
            px, py, pidx = C.to_device(batch, self.dev)
            px = self.cached.device_transform(px, train=False)
            same &= all(torch.equal(u, v) for u, v in zip([*xs, y, idx], [*px, py, pidx]))
        del pairs                                                   # stops the two loaders' threads
        return same


def serve(args):
    """The second process: one command per line on stdin (a variant to time, or 'alone <variant>'),
    one answer per line on stdout."""
    clips = C.load_av_splits("cremad", Path(args.serve) / "cremad")["train"]
    bench = Bench(args, clips, Path(args.serve) / "cache", FORKING)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        answer = bench.loader_alone(cmd[1]) if cmd[0] == "alone" else (bench.time(cmd[0]),)
        print(" ".join(f"{x:.6f}" for x in answer), flush=True)


def main():
    args = get_args()
    if args.serve:
        return serve(args)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads", flush=True)
    names = [v for v in ["model_only", "pipeline", "cache_workers", "decode"]
             if v in args.variants.split(",") or v in ("model_only", "pipeline")]
    forking = [n for n in names if n in FORKING]
    with tempfile.TemporaryDirectory() as tmp:
        clips = fixture_clips(tmp, args.clips)
        t = time.perf_counter()
        bench = Bench(args, clips, Path(tmp) / "cache", [n for n in names if n not in FORKING])
        print(f"cache built once in {time.perf_counter() - t:.1f}s (with the model set-up); pipeline loader: "
              f"{type(bench.loaders['pipeline']).__name__}", flush=True)
        if dev.type == "cuda":
            print(f"check: side-stream batches equal plain copies: {bench.check()}", flush=True)
        child = None
        if forking:
            child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--serve", tmp],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdout.readline().strip() == "ready", "the second process did not start"

        def ask(line):
            child.stdin.write(line + "\n")
            child.stdin.flush()
            return [float(x) for x in child.stdout.readline().split()]

        timed = lambda name: ask(name)[0] if name in FORKING else bench.time(name)
        try:
            for name in names:                                       # warm-up (cuDNN, allocator, page cache)
                timed(name)
            times = {name: [] for name in names}
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    times[name].append(timed(name))
                print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s ({args.clips / v[-1]:.0f} clips/s)"
                                                     for k, v in times.items()), flush=True)
            for name in names[1:]:
                total, first = ask(f"alone {name}") if name in FORKING else bench.loader_alone(name)
                print(f"{name} loader alone: {total:.2f}s per epoch ({args.clips / total:.0f} clips/s), "
                      f"first batch after {first:.2f}s", flush=True)
        finally:
            if child is not None:
                child.stdin.close()
                child.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.method}, {bench.n_batches} batches of {args.batch_size}, {args.workers} workers, amp {bench.amp}, "
          f"compile {args.compile}; "
          "median epoch: " + ", ".join(f"{k} {v:.2f}s" for k, v in med.items()))
    print(f"ratio pipeline/model_only = {med['model_only'] / med['pipeline']:.2f}")
    if "decode" in med:
        print(f"ratio pipeline/decode = {med['decode'] / med['pipeline']:.2f}")


if __name__ == "__main__":
    main()
