"""Image-text experiments of Table 5 (UPMC Food-101, MVSA-Single) for every method.

    python train_it.py                                   # MLA on the built-in toy set, CPU, under a minute
    python train_it.py --dataset food101 --data_root data/food101 --m3ae_ckpt m3ae_base.pth --method mla
    python train_it.py --dataset mvsa --encoder hf --image_model google/vit-base-patch16-224 \\
        --text_model bert-base-uncased --image_size 224 --method qmf
    python train_it.py --method all --seeds 0,1,2         # a sweep; finished runs are skipped on rerun

Writes <out_dir>/<dataset>/<method>/seed<k>/record.json and best.pt (the selected epoch).
"""
import argparse
import tempfile
from pathlib import Path

import torch

import common as C

# Paper settings (SPEC 4, 6) for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1, image_size=256,
                  max_len=256, m3ae_dim=768, m3ae_depth=12, m3ae_heads=12, patch_size=16, vocab_size=30522,
                  num_workers=8, cpu_threads=0),
    "toy": dict(epochs=30, batch_size=32, lr=1e-2, lr_decay_step=70, lr_decay_ratio=0.1, image_size=32,
                max_len=12, m3ae_dim=32, m3ae_depth=2, m3ae_heads=2, patch_size=8, vocab_size=None,
                num_workers=0, cpu_threads=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "food101", "mvsa"])
    a("--data_root", default=None, help="data folder (default data/<dataset>; toy: generated in a temp dir)")
    a("--layout", default="auto", choices=["auto", "jsonl", "mla"],
      help="on-disk layout: MMBT/QMF jsonl or MLA lists; auto detects it (jsonl first)")
    C.add_common_args(p, C.METHODS, DEFAULTS, ["image", "text"], condition="text")
    C.add_it_encoder_args(p, DEFAULTS)
    a = p.add_argument_group("data").add_argument
    a("--skip_bad", action="store_true", help="skip pairs with missing files (and print how many)")
    a = p.add_argument_group("speed").add_argument
    a("--num_workers", type=int, default=None, help="data loader workers; paper 8; toy 0")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast of the encoders and heads on CUDA (default: on with a CUDA GPU that has bf16, "
           "Ampere or later; CPU runs never use it)")
    a("--cpu_threads", type=int, default=None, help="torch CPU threads, 0 = torch's default (paper); toy 1: its "
                                                    "tiny layers gain nothing from threads, which stall on a busy CPU")
    a = p.add_argument_group("toy data set").add_argument
    a("--toy_train", type=int, default=600, help="toy: training pairs")
    a("--toy_dev", type=int, default=120, help="toy: validation (dev) pairs")
    a("--toy_test", type=int, default=240, help="toy: test pairs")
    a("--toy_seed", type=int, default=0, help="toy: seed of the generated data (fixed across --seed)")
    p.set_defaults(script="train_it.py")      # names the toy runs' folder (common.run_dir)
    args = C.finish_args(p, p.parse_args(argv), C.METHODS, DEFAULTS)
    if args.encoder == "m3ae" and args.image_size % args.patch_size:
        p.error(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    return args


def main(argv=None):
    """Parse the command line and run every requested (seed, method); returns their records."""
    args = get_args(argv)
    return C.sweep(args, run, C.METHODS)


def run(args):
    """One training run of args.method with args.seed; returns its record."""
    with C.torch_threads(args.cpu_threads):
        return train(args)


def train(args):
    C.seed_everything(args.seed)
    device = torch.device(args.device)

    # ---- data
    tmp = None
    if args.dataset == "toy":
        if args.data_root is None:
            tmp = tempfile.TemporaryDirectory(prefix="mla_toy_it_")
            root = Path(tmp.name)
        else:
            root = Path(args.data_root)
        C.ensure_toy(root, "train.jsonl", C.make_toy_it, seed=args.toy_seed, n_train=args.toy_train,
                     n_dev=args.toy_dev, n_test=args.toy_test)
    else:
        root = Path(args.data_root or f"data/{args.dataset}")
    data = C.load_it_splits(args.dataset, root, layout=args.layout, skip_bad=args.skip_bad)
    if data["skipped"]:
        print(f"skipped {data['skipped']} pairs with missing files (--skip_bad)")
    classes, train_pairs, val_pairs = data["classes"], data["train"], None
    if args.val_ratio > 0 and data["dev"]:
        val_pairs = data["dev"]
    elif args.val_ratio > 0:
        keep, held = C.stratified_split([p.label for p in train_pairs], args.val_ratio, args.seed)
        train_pairs, val_pairs = [train_pairs[i] for i in keep], [train_pairs[i] for i in held]
    print(f"{args.dataset} ({data['layout']}): {len(classes)} classes, train {len(train_pairs)}, "
          f"val {len(val_pairs or [])}{' (dev split)' if val_pairs is data['dev'] and val_pairs else ''}, "
          f"test {len(data['test'])}")
    raw_text = any(not p.tokens for split in ("train", "dev", "test") for p in data[split] or [])

    # ---- model, method, optimiser
    modalities = ["image", "text"]
    encoders, text = C.image_text_encoders(args, raw_text, root / "tokenizer" if args.dataset == "toy" else None)
    loaders = {
        "train": C.make_loader(C.ITDataset(train_pairs, True, **text), args.batch_size, True, args.seed,
                               args.num_workers, device),
        "val": val_pairs and C.make_loader(C.ITDataset(val_pairs, False, **text), args.batch_size, False,
                                           args.seed, args.num_workers, device),
        "test": C.make_loader(C.ITDataset(data["test"], False, **text), args.batch_size, False, args.seed,
                              args.num_workers, device),
    }
    method = C.build_method(args.method, encoders, len(classes), modalities, args, len(train_pairs))
    C.init_heads(method)                            # encoders keep their own weights
    method.to(device)
    optimizer = torch.optim.SGD(method.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

    # ---- train, select, test, record
    record = C.fit(method, optimizer, scheduler, loaders, args, C.run_dir(args), "train_it.py", device)
    if tmp is not None:
        tmp.cleanup()
    return record


if __name__ == "__main__":
    C.script_main(main)
