"""Cost of MLA's alternating update relative to joint (concat) training.

Both methods train the same ResNet-18 audio and video encoders on the same in-memory batches; each
round is one epoch of each, interleaved batch by batch, so that machine noise hits both alike; the
ratio printed is the median over rounds of (MLA epoch time / concat epoch time).
MLA runs each encoder forward/backward once per batch, as joint training does, plus one extra
optimizer step and the d x d projection; the goal is a ratio <= 1.10.

    python tests/bench/bench_mla_overhead.py [--rounds 7] [--batches 8] [--device cuda]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common as C  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--audio_len", type=int, default=128)
    p.add_argument("--num_mel_bins", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    b = args.batch_size
    data = [([torch.randn(b, 1, args.audio_len, args.num_mel_bins, device=dev),
              torch.randn(b, args.frames, 3, args.image_size, args.image_size, device=dev)],
             torch.randint(0, 6, (b,), device=dev), torch.arange(b, device=dev)) for _ in range(args.batches)]

    def make(name):
        torch.manual_seed(0)
        m = C.build_method(name, [C.AudioResNet(), C.VideoResNet()], 6, ["audio", "video"], b)
        m.apply(C.init_weights)
        m.to(dev).train()
        return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    runs = {name: make(name) for name in ("concat", "mla")}

    def step(name, i):
        m, opt = runs[name]
        xs, y, idx = data[i]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m.schedule(0, i, len(data))
        m.train_step(xs, y, opt, idx=idx)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for i in range(len(data)):                          # warm-up epoch of each
        step("concat", i), step("mla", i)
    ratios = []
    for r in range(args.rounds):
        # one epoch of each, interleaved batch by batch (who goes first alternates), so that a burst
        # of load on this shared machine hits both methods alike
        t = {"concat": 0.0, "mla": 0.0}
        for i in range(len(data)):
            for name in ("concat", "mla") if (r + i) % 2 == 0 else ("mla", "concat"):
                t[name] += step(name, i)
        ratios.append(t["mla"] / t["concat"])
        print(f"round {r + 1}: concat {t['concat']:.3f}s  mla {t['mla']:.3f}s  ratio {ratios[-1]:.2f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"device {dev}, {args.batches} batches of {b}, torch threads {torch.get_num_threads()}")
    print(f"ratio mla/concat = {ratio:.2f}")


if __name__ == "__main__":
    main()
