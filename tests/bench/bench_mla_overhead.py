"""Cost of MLA's alternating update relative to joint (concat) training.

Both methods train the same ResNet-18 audio and video encoders on the same in-memory batches; epochs
of the two are alternated (concat, mla, concat, mla, ...) so that machine noise hits both alike.
MLA runs each encoder forward/backward once per batch, as joint training does, plus one extra
optimizer step and the d x d projection; the goal is a ratio <= 1.10.

    python tests/bench/bench_mla_overhead.py [--rounds 5] [--batches 8] [--device cuda]
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
    p.add_argument("--rounds", type=int, default=5)
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
    hp = argparse.Namespace(no_hgm=False, hgm_alpha=None, fusion="dynamic", fusion_weights=None)

    def make(name):
        torch.manual_seed(0)
        m = C.build_method(name, [C.AudioResNet(), C.VideoResNet()], 6, ["audio", "video"], hp, b)
        m.apply(C.init_weights)
        m.to(dev).train()
        return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    runs = {name: make(name) for name in ("concat", "mla")}

    def epoch(name):
        m, opt = runs[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i, (xs, y, idx) in enumerate(data):
            m.train_step(xs, y, idx, opt, {"epoch": 0, "step": i, "steps": len(data)})
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    epoch("concat"), epoch("mla")                       # warm-up
    times = {"concat": [], "mla": []}
    for r in range(args.rounds):
        for name in ("concat", "mla") if r % 2 == 0 else ("mla", "concat"):
            times[name].append(epoch(name))
        print(f"round {r + 1}: concat {times['concat'][-1]:.3f}s  mla {times['mla'][-1]:.3f}s", flush=True)
    ratio = statistics.median(times["mla"]) / statistics.median(times["concat"])
    print(f"device {dev}, {args.batches} batches of {b}, torch threads {torch.get_num_threads()}")
    print(f"ratio mla/concat = {ratio:.2f}")


if __name__ == "__main__":
    main()
