"""Table 7: CLIP image and text encoders on Food-101, joint training (concat head) vs CLIP + MLA.

    python train_clip.py                                  # both heads on the toy set, tiny random CLIP, CPU
    python train_clip.py --dataset food101 --data_root data/food101 --clip_model openai/clip-vit-base-patch32 \\
        --method clip,mla --seeds 0,1,2
    python train_clip.py --dataset food101 --clip_model /path/to/clip --method mla --finetune   # towers too (GPU)

The CLIP towers run once per split: their features are cached under --cache_dir and every later run
(another seed, another method) reads them. Writes <out_dir>/<dataset>/<method>/seed<k>/record.json and
best.pt (the selected epoch).
"""
import argparse
from pathlib import Path

import torch

import common as C

METHODS = C.methods_of("clip")     # clip: joint training of one concat head on both modalities (Table 7's "CLIP")
MODALITIES = ["image", "text"]

# The paper's settings for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1, image_size=None,
                  max_len=None, num_workers=8, cpu_threads=0),
    "toy": dict(epochs=100, batch_size=32, lr=0.1, lr_decay_step=70, lr_decay_ratio=0.1, image_size=None,
                max_len=None, num_workers=0, cpu_threads=1),
}
TOY_IMAGE_SIZE, TOY_MAX_LEN = 32, 16    # the toy CLIP's image side and text positions unless --image_size/--max_len


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "food101"])
    a("--data_root", default=None, help="data folder (default data/<dataset>; toy: generated in a temp dir)")
    a("--layout", default="auto", choices=["auto", "jsonl", "mla"],
      help="on-disk layout: MMBT/QMF jsonl or MLA lists with raw text; auto detects it (jsonl first)")
    a("--skip_bad", action="store_true", help="skip pairs with missing files (and print how many)")
    C.add_common_args(p, METHODS, DEFAULTS, MODALITIES, condition=None)
    a = p.add_argument_group("CLIP").add_argument
    a("--clip_model", default=None, help="transformers CLIPModel: a local folder written by save_pretrained or a "
                                         "hub name such as openai/clip-vit-base-patch32 (needs internet or the "
                                         "Hugging Face cache); required for food101; toy: a tiny random CLIP")
    a("--tokenizer", default=None, help="tokenizer folder or name (default: the --clip_model's)")
    a("--clip_feature", default="embeds", choices=C.CLIP_FEATURES,
      help="embeds: CLIP's joint embeddings (projected, one width for both towers); pooled: the towers' pooled "
           "outputs before the projection")
    a("--proj_dim", type=int, default=None, help="common width of both modalities (default: the wider features'); "
                                                 "features of another width get a trainable linear projection")
    a("--normalize", action="store_true", help="L2-normalise the features before the heads")
    a("--finetune", action="store_true", help="train the CLIP towers end to end with the heads (no feature cache; "
                                              "meant for a GPU)")
    a("--cache_dir", default=None, help="feature cache folder (default <data_root>/.mla_cache, or ~/.cache/mla when "
                                        "the data root is read-only)")
    a("--extract_batch_size", type=int, default=256, help="batch size of the feature extraction")
    a = p.add_argument_group("inputs").add_argument
    a("--image_size", type=int, default=None, help="image side after the processor's resize and centre crop; "
                                                   f"default the processor's (224 for ViT-B/32); toy CLIP {TOY_IMAGE_SIZE}")
    a("--max_len", type=int, default=None, help="text tokens (cut or padded); default the model's text positions "
                                                f"(77 for CLIP); toy CLIP {TOY_MAX_LEN}")
    a = p.add_argument_group("speed").add_argument
    a("--num_workers", type=int, default=None, help="data loader workers for extraction and --finetune; paper 8; toy 0")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast of the training steps on CUDA, i.e. of the towers with --finetune (default: on with a "
           "bf16 CUDA GPU; CPU runs never use it); the cached features are always extracted in float32")
    a("--cpu_threads", type=int, default=None, help="torch CPU threads, 0 = torch's default (paper); toy 1")
    a = C.add_toy_args(p, "pairs", 600, 240, dev=120, seed_help="the generated data and of the toy CLIP's weights",
                       title="toy data set and toy CLIP")
    a("--toy_width", type=int, default=32, help="toy CLIP: width of both towers and of the joint embedding")
    a("--toy_layers", type=int, default=2, help="toy CLIP: transformer blocks per tower")
    a("--toy_heads", type=int, default=2, help="toy CLIP: attention heads")
    a("--toy_patch", type=int, default=8, help="toy CLIP: image patch side in pixels")
    a("--toy_pretrain_epochs", type=int, default=15, help="toy CLIP: epochs of contrastive pretraining on the toy's "
                                                          "training pairs (0: random towers)")
    a("--toy_pretrain_lr", type=float, default=2e-3, help="toy CLIP: AdamW learning rate of the pretraining")
    a("--toy_pretrain_batch", type=int, default=64, help="toy CLIP: batch size of the pretraining")
    args = C.finish_args(p, p.parse_args(argv), METHODS, DEFAULTS)
    if args.dataset != "toy" and args.clip_model is None:
        p.error(f"--clip_model is needed for --dataset {args.dataset}: a local CLIP folder or a hub name such as "
                "openai/clip-vit-base-patch32")
    if args.dataset == "toy" and args.clip_model is None and (args.image_size or TOY_IMAGE_SIZE) % args.toy_patch:
        p.error(f"--image_size {args.image_size} is not a multiple of --toy_patch {args.toy_patch}")
    return args


def run_folder(args):
    return C.run_dir(args.out_dir, args.dataset, "train_clip.py", args.method, args.seed)


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
    with C.data_root(args.dataset, args.data_root, "mla_toy_clip_") as root, C.torch_threads(args.cpu_threads):
        C.seed_everything(args.seed)
        device = torch.device(args.device)
        if probe_of is not None:
            return probe(args, root, device, probe_of)
        method, loaders = build(args, root, device)     # the data, the encoders and the method (below)
        optimizer = torch.optim.SGD(method.parameters(), args.lr, args.momentum, weight_decay=args.weight_decay)
        method = C.distribute(method, optimizer, args.sync_bn)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

        # ---- train: evaluate every epoch, keep the selected one (best.pt) and all that --resume needs (last.pt)
        state = C.start_run(run_folder(args), "train_clip.py", vars(args), method, optimizer, scheduler, loaders)
        for epoch in range(state.next_epoch, args.epochs):
            C.set_epoch(loaders["train"], epoch)      # torchrun: this epoch's order, before anything reads it
            method.start_epoch(epoch, args.epochs, loaders, optimizer, device, args.amp)
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


def build(args, root, device, evaluation=False):
    """The run's loaders (train, val, test) and method, on the device; evaluation: the training split read in order,
    as the linear probe reads it."""
    with C.rank0_first():                       # torchrun: the feature cache is written once
        loaders, encoders, classes, num_train = data_and_encoders(args, root, device, evaluation)

    # ---- method: "clip" is joint training of one concat head; mla the alternating heads
    method = C.build_method(args.method, encoders, len(classes), MODALITIES, num_train,
                            **C.method_options(args.method, args))
    C.init_heads(method)                            # encoders keep their own weights
    return method.to(device), loaders


def probe(args, root, device, folder):
    """The linear probe of the run in `folder`: its selected epoch's encoders (best.pt), frozen, on every split."""
    method, loaders = build(args, root, device, evaluation=True)
    C.load_selected(folder, method)
    return C.linear_probe(method, loaders, device, args.amp)


def data_and_encoders(args, root, device, evaluation=False):
    """The loaders (train, val, test; evaluation: the training split's in order), the two encoders, the class names
    and the training-set size."""
    if args.dataset == "toy":
        C.ensure_toy(root, "train.jsonl", C.make_toy_it, seed=args.toy_seed, n_train=args.toy_train,
                     n_dev=args.toy_dev, n_test=args.toy_test)
    data = C.load_it_splits(args.dataset, root, layout=args.layout, skip_bad=args.skip_bad)
    if data["skipped"]:
        print(f"skipped {data['skipped']} pairs with missing files (--skip_bad)")
    # the validation split: the data's dev split, else a seeded stratified share of train
    parts = {"train": ("train", range(len(data["train"]))), "val": None, "test": ("test", range(len(data["test"])))}
    if args.val_ratio > 0 and data["dev"]:
        parts["val"] = ("dev", range(len(data["dev"])))
    elif args.val_ratio > 0:
        keep, held = C.stratified_split([p.label for p in data["train"]], args.val_ratio, args.seed)
        parts["train"], parts["val"] = ("train", keep), ("train", held)
    sizes = {k: len(v[1]) if v else 0 for k, v in parts.items()}
    print(f"{args.dataset} ({data['layout']}): {len(data['classes'])} classes, train {sizes['train']}, val {sizes['val']}"
          f"{' (dev split)' if parts['val'] and parts['val'][0] == 'dev' else ''}, test {sizes['test']}")

    if args.clip_model is None:
        clip = C.toy_clip(C.load_tokenizer(args.tokenizer or root / "tokenizer"), args.image_size or TOY_IMAGE_SIZE,
                          args.toy_patch, (args.toy_width, args.toy_layers, args.toy_heads), args.max_len or TOY_MAX_LEN,
                          args.toy_seed, args.clip_feature)
        C.pretrain_toy_clip(clip, data["train"], args.toy_pretrain_epochs, args.toy_pretrain_batch,
                            args.toy_pretrain_lr, args.toy_seed)
    else:
        clip = C.load_clip(args.clip_model, args.tokenizer, args.max_len, args.image_size, args.clip_feature)
    num_workers = args.num_workers

    if args.finetune:
        towers = [clip.tower(m) for m in MODALITIES]
        widths = [t.dim for t in towers]
        sets = {k: v and C.CLIPInputs([data[v[0]][i] for i in v[1]], clip) for k, v in parts.items()}
    else:
        cache_dir = Path(args.cache_dir) if args.cache_dir else C.default_cache_dir(root)
        feats = {split: C.clip_features(clip, data[split], split, cache_dir, args.extract_batch_size, device,
                                        num_workers)
                 for split in dict.fromkeys(v[0] for v in parts.values() if v)}
        towers, widths = [None, None], [f.shape[1] for f in feats["train"]]
        labels = lambda split, idx: [data[split][i].label for i in idx]
        sets = {k: v and C.CLIPFeatureDataset(*[f[list(v[1])] for f in feats[v[0]]], labels(*v))
                for k, v in parts.items()}
        num_workers = 0                                 # features in memory: nothing to load in parallel
    dim = args.proj_dim or max(widths)
    encoders = [C.CLIPModalityEncoder(w, dim, args.normalize, t) for w, t in zip(widths, towers)]
    loaders = {k: s and C.make_loader(s, args.batch_size, k == "train" and not evaluation, args.seed, num_workers,
                                      device) for k, s in sets.items()}
    return loaders, encoders, data["classes"], sizes["train"]


if __name__ == "__main__":
    C.script_main(main)
