"""Image-text experiments of Table 5 (UPMC Food-101, MVSA-Single) for every method.

    python train_it.py                                   # MLA on the built-in toy set, CPU, under a minute
    python train_it.py --dataset food101 --data_root data/food101 --m3ae_ckpt m3ae_base.pth --method mla
    python train_it.py --dataset mvsa --encoder hf --image_model google/vit-base-patch16-224 \\
        --text_model bert-base-uncased --image_size 224 --method qmf
    python train_it.py --method all --seeds 0,1,2         # a sweep; finished runs are skipped on rerun

Writes <out_dir>/<dataset>/<method>/seed<k>/record.json and best.pt (the selected epoch).
"""
import argparse

import torch

import common as C

METHODS = C.methods_of("it")        # the registry's, in its order (common.py)
MODALITIES = ["image", "text"]

# The paper's settings for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1, image_size=256,
                  max_len=256, m3ae_dim=768, m3ae_depth=12, m3ae_heads=12, patch_size=16, vocab_size=30522,
                  num_workers=8, cpu_threads=0,
                  reconboost_stage_epochs=4, reconboost_correct_epochs=4),
    "toy": dict(epochs=30, batch_size=32, lr=1e-2, lr_decay_step=70, lr_decay_ratio=0.1, image_size=32,
                max_len=12, m3ae_dim=32, m3ae_depth=2, m3ae_heads=2, patch_size=8, vocab_size=None,
                num_workers=0, cpu_threads=1,
                reconboost_stage_epochs=1, reconboost_correct_epochs=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "food101", "mvsa"])
    a("--data_root", default=None, help="data folder (default data/<dataset>; toy: generated in a temp dir)")
    a("--layout", default="auto", choices=["auto", "jsonl", "mla"],
      help="on-disk layout: MMBT/QMF jsonl or MLA lists; auto detects it (jsonl first)")
    C.add_common_args(p, METHODS, DEFAULTS, MODALITIES, condition="text")
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
    C.add_toy_args(p, "pairs", 600, 240, dev=120)
    args = C.finish_args(p, p.parse_args(argv), METHODS, DEFAULTS)
    if args.encoder == "m3ae" and args.image_size % args.patch_size:
        p.error(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    return args


def run_folder(args):
    return C.run_dir(args.out_dir, args.dataset, "train_it.py", args.method, args.seed)


def main(argv=None):
    args = get_args(argv)
    # torchrun (RANK, WORLD_SIZE set): join the job (gloo on the CPU; NCCL on CUDA, this process's GPU LOCAL_RANK).
    # From here on only the first process prints and writes files (locks, checkpoints, records); the others train
    # their share of each batch alongside it. Without torchrun: nothing changes.
    args.device = C.init_distributed(args.device)
    # each run once, holding a lock on its folder while it trains; a sweep skips the runs it finished before
    # and comes back to those another process holds
    return C.train_runs(C.list_runs(args, METHODS), run_folder, run)


def run(args, probe_of=None):
    """One training run of args.method with args.seed; returns its record. probe_of: a finished run's folder, whose
    selected epoch is probed instead (python common.py probe); returns the probe's accuracies."""
    C.seed_everything(args.seed)
    with C.data_root(args.dataset, args.data_root, "mla_toy_it_") as root, C.torch_threads(args.cpu_threads):
        device = torch.device(args.device)
        return train(args, root, device) if probe_of is None else probe(args, root, device, probe_of)


def build(args, root, device, evaluation=False):
    """The run's loaders (train, val, test) and method, on the device; evaluation: the training split read as the
    others (in order, no augmentation), as the linear probe reads it."""
    # ---- data: the pairs of each split; validation: the dev split, else a seeded stratified share of train
    if args.dataset == "toy":
        C.ensure_toy(root, "train.jsonl", C.make_toy_it, seed=args.toy_seed, n_train=args.toy_train,
                     n_dev=args.toy_dev, n_test=args.toy_test)
    data = C.load_it_splits(args.dataset, root, layout=args.layout, skip_bad=args.skip_bad)
    splits = C.train_val_test(data, args.val_ratio, args.seed, args.dataset, "pairs")
    raw_text = any(not p.tokens for split in ("train", "dev", "test") for p in data[split] or [])
    tokenizer = args.tokenizer or (root / "tokenizer" if args.dataset == "toy" else None)
    encoders, text = C.image_text_encoders(args.encoder, raw_text, tokenizer, args.vocab_size, args.image_size,
                                           args.max_len, **C.it_encoder_options(args))
    augmented = lambda split: split == "train" and not evaluation        # and shuffled
    loaders = {split: items and C.make_loader(C.ITDataset(items, augmented(split), **text), args.batch_size,
                                              augmented(split), args.seed, args.num_workers, device)
               for split, items in splits.items()}

    # ---- model and method: an M3AE-shaped (or transformers) encoder per modality, the method's heads
    method = C.build_method(args.method, encoders, len(data["classes"]), MODALITIES, len(splits["train"]),
                            **C.method_options(args.method, args))
    C.init_heads(method)                            # encoders keep their own weights
    return method.to(device), loaders


def train(args, root, device):
    method, loaders = build(args, root, device)     # the data, the model and the method (above)
    optimizer = torch.optim.SGD(method.parameters(), args.lr, args.momentum, weight_decay=args.weight_decay)
    method = C.distribute(method, optimizer, args.sync_bn)    # torchrun: the batch over processes
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

    # ---- train: evaluate every epoch, keep the selected one (best.pt) and all that --resume needs (last.pt)
    state = C.start_run(run_folder(args), "train_it.py", vars(args), method, optimizer, scheduler, loaders)
    for epoch in range(state.next_epoch, args.epochs):
        C.set_epoch(loaders["train"], epoch)          # torchrun: this epoch's order, before anything reads it
        method.start_epoch(epoch, args.epochs, loaders, optimizer, device, args.amp)   # G-Blending, PMR: their pass
        loss = C.train_one_epoch(method, loaders["train"], optimizer, epoch, device, args.amp, state)
        method.end_epoch(epoch, loaders, device, args.amp)
        val, test = C.evaluate_epoch(method, loaders, args.select_on, device, args.amp)
        if C.log_epoch(state, epoch, loss, optimizer, val, test, method):     # prints it; True: best so far
            C.save_best(state, method, epoch)
        C.board_epoch(state)                          # --tensorboard: the epoch's numbers into <run>/tb/
        scheduler.step()
        C.save_checkpoint(state, method, optimizer, scheduler, loaders["train"])

    # ---- test the selected epoch, write the record (--probe: then the probe of its encoders into it)
    C.load_best(state, method)
    test = C.evaluate(method, loaders["test"], device, args.amp)
    record = C.write_record(state, method, test)
    if args.probe:                                # after the record: a probe that fails loses no run
        record["probe"] = C.write_probe(state.folder, probe(args, root, device, state.folder))
    return record


def probe(args, root, device, folder):
    """The linear probe of the run in `folder`: its selected epoch's encoders (best.pt), frozen, on every split."""
    method, loaders = build(args, root, device, evaluation=True)
    C.load_selected(folder, method)
    return C.linear_probe(method, loaders, device, args.amp)


if __name__ == "__main__":
    C.script_main(main)
