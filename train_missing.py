"""Table 6: twelve methods on pre-extracted IEMOCAP features with a share of the views missing.

    python train_missing.py                                    # MLA, 50 % missing, built-in toy features (CPU)
    python train_missing.py --dataset features --data_root data/iemocap_features --method mla --seed 0
    python train_missing.py --dataset mmin --data_root data/IEMOCAP_features_2021 --fold 1 --method mmin
    python train_missing.py --method all --seeds 0,1,2 --missing_rates 0.1,0.3,0.5,0.7   # a sweep

Missing views (the paper's protocol): a fraction --missing_rate of the (sample, view) entries is removed, drawn from
the seed alone (the same for every method), every sample keeping at least one view, on train, val and
test alike. Writes <out_dir>/<dataset>/<method>/seed<k>/missing<rate>/record.json, best.pt and
missing_mask.npz (the masks of the run).
"""
import argparse

import numpy as np
import torch

import common as C

METHODS = C.methods_of("missing")     # Table 6, in the registry's order (common.py)
# The paper's settings for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1, cpu_threads=0),
    "toy": dict(epochs=15, batch_size=64, lr=1e-2, lr_decay_step=70, lr_decay_ratio=0.1, cpu_threads=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "features", "mmin"],
      help="toy: generated three-view features; features: a features.npz; mmin: the MMIN layout (needs h5py)")
    a("--data_root", default=None, help="features.npz or its folder, or the MMIN feature root "
                                        "(default data/<dataset>; toy: generated in a temp dir)")
    a("--fold", type=int, default=1, help="mmin: the cross-validation fold, target/<fold>/")
    a("--mmin_files", default=None, help="mmin: the .h5 names in A/, V/, L/ as a comma list (e.g. "
                                         "comparE,denseface,bert_large); default: the only .h5 in each")
    a("--modalities", default=None, help="features: the views to read, a comma list of the file's array names "
                                         "(default: every array but label and split, in the file's order)")
    a("--feature_norm", default="train", choices=["train", "none"],
      help="train: standardise every feature with the training split's mean and std (present views only; kept "
           "in best.pt, used for val and test), so features at any scale train; none: as they are")
    a("--missing_rate", type=float, default=0.5, help="fraction of (sample, view) entries removed")
    a("--missing_rates", default=None, help="comma list of rates to sweep, e.g. 0.1,0.3,0.5,0.7 "
                                            "(overrides --missing_rate)")
    a = p.add_argument_group("model sizes (the paper's: 3 layers of 128 per modality, classifier 128 -> C)").add_argument
    a("--hidden", type=int, default=128, help="width of the per-modality MLP encoders (and codes, tokens)")
    a("--layers", type=int, default=3, help="linear layers per MLP encoder (and decoder; cpm_net's are linear, "
                                            "dim -> dim -> d, as the authors')")
    C.add_common_args(p, METHODS, DEFAULTS)                 # with the methods' flags (the registry's)
    a = p.add_argument_group("speed").add_argument
    a("--cpu_threads", type=int, default=None, help=C._default_help(
        DEFAULTS, "cpu_threads", "torch CPU threads, 0 = torch's default (one per core)"))
    a = C.add_toy_args(p, "samples", 1000, 400, dev=200, dev_flag="val")
    a("--toy_dims", type=lambda s: [int(v) for v in s.split(",")], default=[32, 48, 64],
      help="toy: widths of audio, visual, text (comma list)")
    args = C.finish_args(p, p.parse_args(argv), METHODS, DEFAULTS)
    try:
        rates = parse_rates(args.missing_rates) if args.missing_rates else [args.missing_rate]
    except ValueError as e:
        p.error(str(e))
    if any(not 0 <= r < 1 for r in rates):
        p.error("missing rates must be in [0, 1)")
    if args.modalities and args.dataset != "features":
        p.error("--modalities names the views of a features.npz (--dataset features)")
    if args.mmin_files and len(args.mmin_files.split(",")) != 3:
        p.error("--mmin_files takes three names: audio, visual, text")
    if len(args.toy_dims) != 3:
        p.error("--toy_dims takes three widths: audio, visual, text")
    return args


def parse_rates(spec):
    try:
        return [float(r) for r in spec.split(",")]
    except ValueError:
        raise ValueError(f"--missing_rates {spec!r}: expected a comma list of fractions, e.g. 0.1,0.3") from None


def run_folder(args):
    """<out_dir>/<dataset>/<method>/seed<k>[/fold<f> for mmin]/missing<rate>: where a run writes its files."""
    fold = [f"fold{args.fold}"] if args.dataset == "mmin" else []
    return C.run_dir(args.out_dir, args.dataset, "train_missing.py", args.method, args.seed, *fold,
                     f"missing{args.missing_rate}")


def main(argv=None):
    args = get_args(argv)
    # torchrun (RANK, WORLD_SIZE set): join the job (gloo on the CPU; NCCL on CUDA, this process's GPU LOCAL_RANK).
    # From here on only the first process prints and writes files (locks, checkpoints, records); the others train
    # their share of each batch alongside it. Without torchrun: nothing changes.
    args.device = C.init_distributed(args.device)
    rates = parse_rates(args.missing_rates) if args.missing_rates else [args.missing_rate]
    with C.torch_threads(args.cpu_threads):
        # each run once, holding a lock on its folder while it trains; a sweep skips the runs it finished before
        # and comes back to those another process holds
        return C.train_runs(C.list_runs(args, METHODS, grid={"missing_rate": rates}), run_folder, run)


def load_data(args):
    with C.data_root(args.dataset, args.data_root, "mla_toy_missing_") as root:
        if args.dataset == "toy":
            C.ensure_toy(root, "features.npz", lambda r, **k: C.make_toy_features(r / "features.npz", **k),
                         seed=args.toy_seed, n_train=args.toy_train, n_val=args.toy_val, n_test=args.toy_test,
                         dims=args.toy_dims)
            return C.load_features_npz(root / "features.npz")
        if args.dataset == "features":
            return C.load_features_npz(root, args.modalities.split(",") if args.modalities else None)
        return C.load_mmin(root, args.fold, args.mmin_files.split(",") if args.mmin_files else None)


def build(args, device, evaluation=False):
    """The run's loaders (train, val, test), method (on the device) and missing-view masks; evaluation: the training
    split read in order, as the linear probe reads it."""
    # ---- data and the missing views (drawn once per run from the seed; the same for every method)
    data = load_data(args)
    classes, modalities = data["classes"], data["modalities"]
    if data["val"] is None and args.val_ratio > 0:
        (xs, y) = data["train"]
        keep, held = C.stratified_split(y, args.val_ratio, args.seed)
        data["train"], data["val"] = ([x[keep] for x in xs], y[keep]), ([x[held] for x in xs], y[held])
    masks = {s: C.missing_mask(len(data[s][1]), len(modalities), args.missing_rate, args.seed, split=k)
             for k, s in enumerate(("train", "val", "test")) if data[s] is not None}
    norm = C.FeatureNorm(data["train"][0], masks["train"]) if args.feature_norm == "train" else None
    if norm is not None:                       # the training split's statistics, for every split
        data.update({s: (norm(data[s][0]), data[s][1]) for s in masks})
    removed = {s: round(100 * (1 - m.mean()), 1) for s, m in masks.items()}
    if args.missing_rate > (len(modalities) - 1) / len(modalities):
        print(f"note: every sample keeps a view, so --missing_rate {args.missing_rate} removes "
              f"{removed['train']}% of the {len(modalities)} views (the record says {args.missing_rate})")
    print(f"{args.dataset} ({data['layout']}): {len(classes)} classes, widths "
          f"{', '.join(f'{m} {x.shape[1]}' for m, x in zip(modalities, data['train'][0]))}; "
          + ", ".join(f"{s} {len(data[s][1])} ({removed[s]}% of views missing)" for s in masks)
          + ("; standardised with the training split's statistics" if norm is not None else ""))
    loaders = {s: C.make_loader(C.FeatureDataset(data[s][0], masks[s], data[s][1]), args.batch_size,
                                s == "train" and not evaluation, args.seed, 0, device) if s in masks else None
               for s in ("train", "val", "test")}

    # ---- model and method: an MLP encoder per view, the method's heads; the paper's SGD and StepLR
    encoders = [C.MLPEncoder(x.shape[1], args.hidden, args.layers) for x in data["train"][0]]
    method = C.build_method(args.method, encoders, len(classes), modalities, len(data["train"][1]),
                            **C.method_options(args.method, args))
    method.apply(C.init_weights)
    if norm is not None:
        method.feature_norm = norm             # its statistics go into best.pt and last.pt with the weights
    return method.to(device), loaders, masks


def run(args, probe_of=None):
    """One training run of args.method with args.seed at args.missing_rate; returns its record. probe_of: a finished
    run's folder, whose selected epoch is probed instead (python common.py probe); returns the probe's accuracies."""
    C.seed_everything(args.seed)
    device = torch.device(args.device)
    if probe_of is not None:
        return probe(args, device, probe_of)
    method, loaders, masks = build(args, device)     # the data, the missing views, the model and the method (above)
    out = run_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    if C.world()[0] == 0:                      # torchrun: the first process writes
        np.savez(out / "missing_mask.npz", **masks)
    optimizer = torch.optim.SGD(method.parameters(), args.lr, args.momentum, weight_decay=args.weight_decay)
    method = C.distribute(method, optimizer, args.sync_bn)    # torchrun: the batch over processes
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

    # ---- train: evaluate every epoch, keep the selected one (best.pt) and all that --resume needs (last.pt);
    # the CCA family fits its projections in closed form before the first epoch (cca) or after each one (dcca)
    state = C.start_run(out, "train_missing.py", vars(args), method, optimizer, scheduler, loaders)
    for epoch in range(state.next_epoch, args.epochs):
        C.set_epoch(loaders["train"], epoch)          # torchrun: this epoch's order, before anything reads it
        method.start_epoch(epoch, args.epochs, loaders, optimizer, device)
        loss = C.train_one_epoch(method, loaders["train"], optimizer, epoch, device, run=state)
        method.end_epoch(epoch, loaders, device)
        val, test = C.evaluate_epoch(method, loaders, args.select_on, device)
        if C.log_epoch(state, epoch, loss, optimizer, val, test, method):     # prints it; True: best so far
            C.save_best(state, method, epoch)
        C.board_epoch(state)                          # --tensorboard: the epoch's numbers into <run>/tb/
        scheduler.step()
        C.save_checkpoint(state, method, optimizer, scheduler, loaders["train"])

    # ---- test the selected epoch, write the record (--probe: then the probe of its encoders into it)
    C.load_best(state, method)
    test = C.evaluate(method, loaders["test"], device)
    record = C.write_record(state, method, test)
    if args.probe:                                # after the record: a probe that fails loses no run
        record["probe"] = C.write_probe(state.folder, probe(args, device, state.folder))
    return record


def probe(args, device, folder):
    """The linear probe of the run in `folder`: its selected epoch's encoders (best.pt), frozen, on every split (each
    view on the samples where it is present)."""
    method, loaders, _ = build(args, device, evaluation=True)
    C.load_selected(folder, method)
    return C.linear_probe(method, loaders, device)


if __name__ == "__main__":
    C.script_main(main)
