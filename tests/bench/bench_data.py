"""Data throughput: the cached loader against decoding every epoch (the official way).

Generates a CREMA-D-shaped fixture at paper sizes (16 kHz WAVs of 2.5 s, three 480 x 360 JPEG frames
per clip; 224 x 224 crops, 1024 x 128 fbank), then times training epochs of
  decode: AVDataset, which opens each JPEG with PIL and computes the fbank from the WAV every time;
  cached: CachedAVDataset (memory-mapped float16 fbank and uint8 frames, built once, not timed),
          crops and flips drawn in the workers on uint8 tensors, normalisation of the batch counted.
Both use the same DataLoader settings; epochs alternate (decode, cached, decode, cached, ...).

    python tests/bench/bench_data.py [--clips 300] [--rounds 2] [--workers 2]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common as C  # noqa: E402


def make_fixture(root, n, seed=0):
    rng = np.random.RandomState(seed)
    emos = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    (root / "AudioWAV").mkdir(parents=True)
    rows = []
    for i in range(n):
        clip = f"{1001 + i // 60}_S{i % 60:02d}_{emos[i % 6]}_XX"
        t = np.arange(int(16000 * 2.5)) / 16000
        C.write_wav(root / "AudioWAV" / f"{clip}.wav", 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
                    + 0.05 * rng.randn(len(t)), 16000)
        d = root / "Image-01-FPS" / clip
        d.mkdir(parents=True)
        for k in range(3):
            px = (rng.rand(360 // 8, 480 // 8, 3) * 255).astype(np.uint8)      # blocky, JPEG-realistic
            Image.fromarray(px).resize((480, 360), Image.BILINEAR).save(d / f"frame_{k + 1:05d}.jpg", quality=90)
        rows.append(f"{clip},{emos[i % 6]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("\n".join(rows[:6]) + "\n")


def fixture_clips(tmp, n):
    """Write an n-clip fixture under tmp/cremad (timed) and return its training clips."""
    root = Path(tmp) / "cremad"
    t = time.perf_counter()
    make_fixture(root, n)
    print(f"fixture: {n} clips in {time.perf_counter() - t:.0f}s", flush=True)
    return C.load_av_splits("cremad", root)["train"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args()
    sizes = dict(image_size=224, frames=3, audio_len=1024, num_mel_bins=128)
    with tempfile.TemporaryDirectory() as tmp:
        clips = fixture_clips(tmp, args.clips)
        t = time.perf_counter()
        cache = Path(tmp) / "cache"
        sets = {"decode": C.AVDataset(clips, True, **sizes),
                "cached": C.CachedAVDataset(clips, True, C.AVSizes(**sizes), cache_dir=cache, num_workers=args.workers,
                                            augment_on="device"),
                "cpu_aug": C.CachedAVDataset(clips, True, C.AVSizes(**sizes), cache_dir=cache, augment_on="workers")}
        print(f"cache built once in {time.perf_counter() - t:.1f}s", flush=True)
        loaders = {k: C.make_loader(ds, args.batch_size, True, 0, args.workers) for k, ds in sets.items()}
        shapes = {"decode": (3, 224, 224), "cached": (3, 224, 299), "cpu_aug": (3, 224, 224)}   # 480x360 -> 299x224

        def epoch(name):
            t = time.perf_counter()
            n = 0
            for a, v, y, i in loaders[name]:
                assert v.shape[-3:] == shapes[name] and a.shape[-2:] == (1024, 128)
                n += len(y)
            return n / (time.perf_counter() - t)

        for name in loaders:                             # start every loader's workers
            epoch(name)
        rates = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):
                rates[name].append(epoch(name))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} clips/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.workers} workers, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"ratio cpu_aug/decode = {med['cpu_aug'] / med['decode']:.2f}")
    print(f"ratio cached/decode = {med['cached'] / med['decode']:.2f}")


if __name__ == "__main__":
    main()
