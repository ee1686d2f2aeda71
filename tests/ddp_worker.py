"""Started under torchrun by tests/test_ddp.py (not collected by pytest). `train OUT`: each method trains two
epochs of two batches of 32 on a fixed feature set through train_av.py's helpers (build_method, make_loader,
distribute, set_epoch, start_epoch, train_one_epoch, end_epoch, evaluate); every process saves what it ends with, then train_missing.py runs
with --probe (its record: OUT/missing); then Table 6's own methods the same way, on a three-view set with missing views. `train OUT FAIL_OUT`: then train_missing.py into FAIL_OUT, with process 1 failing in its second evaluation;
`resume OUT`: the same run with --resume (from scratch where there is no last.pt)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C          # noqa: E402
import train_missing        # noqa: E402
from conftest import options  # noqa: E402

TABLE5 = C.methods_of("av")                                            # Table 5's and the six balancing methods
TABLE6_ONLY = [m for m in C.methods_of("missing") if m not in TABLE5]  # Table 6's own



MISSING = ["--method", "mla", "--epochs", "3", "--toy_train", "256"]     # train_missing.py's run in every mode


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.a, self.v = torch.randn(n, 5, generator=g), torch.randn(n, 7, generator=g)
        self.y = (self.a[:, 0] > 0).long() * 2 + (self.v[:, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.a[i], self.v[i], self.y[i], i


def train(out, fail_out=None):
    C.init_distributed("cpu")
    rank = C.world()[0]
    data = Pairs()
    for name in TABLE5:                        # Table 5's and the six balancing methods
        C.seed_everything(0)
        encoders = [C.MLPEncoder(5, 16, 2), C.MLPEncoder(7, 16, 2)]
        method = C.build_method(name, encoders, 4, ["audio", "video"], len(data))
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        method = C.distribute(method, optimizer)
        loaders = {"train": C.make_loader(data, 32, True, seed=0), "val": C.make_loader(data, 32, False)}
        losses = []
        for epoch in range(2):
            C.set_epoch(loaders["train"], epoch)
            method.start_epoch(epoch, 2, loaders, optimizer, "cpu")         # G-Blending's weights, PMR's prototypes
            losses.append(C.train_one_epoch(method, loaders["train"], optimizer, epoch, "cpu"))
        acc = C.evaluate(method, loaders["val"], "cpu")
        torch.save({"losses": losses, "acc": acc, "state": method.state_dict()}, Path(out) / f"{name}_{rank}.pt")
    views = Pairs(n=64)                        # Table 6's own methods: three views, 30 % of them missing
    xs, mask = [views.a, views.v, views.a[:, :3] - views.v[:, :3]], torch.as_tensor(C.missing_mask(64, 3, 0.3, 0))
    data = C.FeatureDataset(xs, mask, views.y)
    for name in TABLE6_ONLY:
        C.seed_everything(0)
        encoders = [C.MLPEncoder(x.shape[1], 16, 2) for x in xs]
        method = C.build_method(name, encoders, 4, ["audio", "visual", "text"], len(data), **options(
            name, layers=2, hide_prob=0.0, ae_widths=(16, 8), ae_blocks=2, cca_dim=3, dcca_dim=2, code_steps=3,
            tate_heads=2))
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        method = C.distribute(method, optimizer)
        loaders = {"train": C.make_loader(data, 32, True, seed=0), "val": C.make_loader(data, 32, False)}
        losses = []
        for epoch in range(2):
            C.set_epoch(loaders["train"], epoch)
            method.start_epoch(epoch, 2, loaders, optimizer, "cpu")         # CCA's fit
            losses.append(C.train_one_epoch(method, loaders["train"], optimizer, epoch, "cpu"))
            method.end_epoch(epoch, loaders, "cpu")                          # DCCA's
        acc = C.evaluate(method, loaders["val"], "cpu")
        torch.save({"losses": losses, "acc": acc, "state": method.state_dict()}, Path(out) / f"{name}_{rank}.pt")
    train_missing.main(MISSING + ["--probe", "--out_dir", str(Path(out) / "missing")])    # the first process probes
    if fail_out:                               # then, in the same job (one start of torchrun less), `fail`
        fail(fail_out)


def fail(out):
    calls, real = [], C.evaluate

    def evaluate(*a, **k):
        calls.append(1)
        if C.world()[0] == 1 and len(calls) == 2:
            raise RuntimeError("simulated failure")
        return real(*a, **k)
    C.evaluate = evaluate
    C.script_main(lambda: train_missing.main(MISSING + ["--out_dir", out]))


def resume(out):
    C.script_main(lambda: train_missing.main(MISSING + ["--out_dir", out, "--resume"]))


if __name__ == "__main__":
    {"train": train, "resume": resume}[sys.argv[1]](*sys.argv[2:])
