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

    python tests/bench/bench_gpu_epoch.py [--clips 2000] [--workers 8] [--rounds 3] [--device cuda]
"""
import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common as C  # noqa: E402
from bench_data import fixture_clips  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8, help="loader workers (train_av.py's paper default)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", default="mla")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    amp = dev.type == "cuda"
    sizes = dict(image_size=224, frames=3, audio_len=1024, num_mel_bins=128)
    if dev.type == "cuda":
        print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        clips = fixture_clips(tmp, args.clips)
        t = time.perf_counter()
        cached = C.CachedAVDataset(clips, True, **sizes, cache_dir=Path(tmp) / "cache", num_workers=args.workers,
                                   augment_on="device" if dev.type == "cuda" else "workers")
        print(f"cache built once in {time.perf_counter() - t:.1f}s", flush=True)
        loaders = {"pipeline": C.make_loader(cached, args.batch_size, True, 0, args.workers, dev),
                   "cache_workers": torch.utils.data.DataLoader(
                       cached, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       worker_init_fn=C.seed_worker, pin_memory=dev.type == "cuda"),
                   "decode": C.make_loader(C.AVDataset(clips, True, **sizes), args.batch_size, True, 0,
                                           args.workers, dev)}
        n_batches = len(loaders["pipeline"])
        print(f"pipeline loader: {type(loaders['pipeline']).__name__}", flush=True)

        # the side-stream path must hand out exactly what a plain copy + transform gives
        if dev.type == "cuda":
            fresh = lambda: C.make_loader(cached, args.batch_size, True, 1, args.workers, dev)
            same, pairs = True, zip(C.device_batches(fresh(), dev, False), fresh())
            for (xs, y, idx, _), batch in itertools.islice(pairs, 6):
                px, py, pidx = C.to_device(batch, dev)
                px = cached.device_transform(px, train=False)
                same &= all(torch.equal(u, v) for u, v in zip([*xs, y, idx], [*px, py, pidx]))
            del pairs                                               # stops the two loaders' threads
            print(f"check: side-stream batches equal plain copies: {same}", flush=True)

        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        hp = argparse.Namespace(no_hgm=False, hgm_alpha=None, fusion="dynamic", fusion_weights=None,
                                alpha=0.1, modulation_starts=0, modulation_ends=50, condition=None)
        torch.manual_seed(0)
        method = C.build_method(args.method, [C.AudioResNet(), C.VideoResNet()], 6, ["audio", "video"], hp,
                                len(clips))
        method.apply(C.init_weights)
        method.to(dev, memory_format=torch.channels_last if amp else torch.contiguous_format)
        opt = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        b = args.batch_size
        ready = [([torch.randn(b, 1, 1024, 128, device=dev), torch.randn(b, 3, 3, 224, 224, device=dev)],
                  torch.randint(0, 6, (b,), device=dev), torch.arange(b, device=dev)) for _ in range(4)]

        def model_only():
            method.train()
            for step in range(n_batches):
                xs, y, idx = ready[step % len(ready)]
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    method.train_step(xs, y, idx, opt, {"epoch": 0, "step": step, "steps": n_batches})

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def timed(name):
            sync()
            t = time.perf_counter()
            if name == "model_only":
                model_only()
            else:
                C.train_one_epoch(method, loaders[name], opt, 0, dev, amp=amp)
            sync()
            return time.perf_counter() - t

        names = ["model_only", "pipeline", "cache_workers", "decode"]
        for name in names:                                           # warm-up (cuDNN, allocator, page cache)
            timed(name)
        times = {name: [] for name in names}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(timed(name))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s ({args.clips / v[-1]:.0f} clips/s)"
                                                 for k, v in times.items()), flush=True)

        # the loaders alone, with the copy and the transform, and the wait for the first batch
        def loader_only(loader):
            sync()
            t = time.perf_counter()
            first = None
            for _ in C.device_batches(loader, dev, True):
                if first is None:
                    sync()
                    first = time.perf_counter() - t
            sync()
            return time.perf_counter() - t, first

        for name in ("pipeline", "cache_workers", "decode"):
            total, first = loader_only(loaders[name])
            print(f"{name} loader alone: {total:.2f}s per epoch ({args.clips / total:.0f} clips/s), "
                  f"first batch after {first:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.method}, {n_batches} batches of {b}, {args.workers} workers, amp {amp}; median epoch: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in med.items()))
    print(f"ratio pipeline/model_only = {med['model_only'] / med['pipeline']:.2f}")
    print(f"ratio pipeline/decode = {med['decode'] / med['pipeline']:.2f}")


if __name__ == "__main__":
    main()
