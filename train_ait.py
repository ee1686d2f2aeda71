"""Audio-image-text experiments of Table 5 (IEMOCAP) for every method.

    python train_ait.py                                   # MLA on the built-in toy A-I-T set, CPU, about a minute
    python train_ait.py --dataset iemocap --data_root data/iemocap --cavmae_ckpt cav_mae_audio.pth \\
        --m3ae_ckpt m3ae_base.pth --method mla
    python train_ait.py --dataset iemocap --audio_encoder resnet18 --m3ae_ckpt m3ae_base.pth --method ogm_ge
    python train_ait.py --method all --seeds 0,1,2         # a sweep; finished runs are skipped on rerun

Writes <out_dir>/<dataset>/<method>/seed<k>/record.json and best.pt (the selected epoch).
"""
import argparse

import torch

import common as C

METHODS = C.methods_of("ait")        # the registry's, in its order (common.py)
# The paper's settings for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1, image_size=256,
                  max_len=256, m3ae_dim=768, m3ae_depth=12, m3ae_heads=12, patch_size=16, vocab_size=30522,
                  audio_len=1024, num_mel_bins=128, cavmae_dim=768, cavmae_depth=12, cavmae_heads=12,
                  cavmae_patch=16, num_workers=8, cpu_threads=0,
                  reconboost_stage_epochs=4, reconboost_correct_epochs=4),
    "toy": dict(epochs=20, batch_size=32, lr=1e-2, lr_decay_step=70, lr_decay_ratio=0.1, image_size=32,
                max_len=12, m3ae_dim=32, m3ae_depth=2, m3ae_heads=2, patch_size=8, vocab_size=None,
                audio_len=64, num_mel_bins=32, cavmae_dim=32, cavmae_depth=2, cavmae_heads=2, cavmae_patch=8,
                num_workers=0, cpu_threads=1,
                reconboost_stage_epochs=1, reconboost_correct_epochs=1),
}
MODALITIES = ["audio", "image", "text"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "iemocap"], help="toy: a generated IEMOCAP-like set")
    a("--data_root", default=None, help="data folder (default data/<dataset>; toy: generated in a temp dir)")
    C.add_common_args(p, METHODS, DEFAULTS, MODALITIES, condition="audio")
    a = p.add_argument_group("audio encoder").add_argument
    a("--audio_encoder", default="cavmae", choices=["cavmae", "resnet18"],
      help="cavmae: CAV-MAE's audio transformer (the paper's); resnet18: the A-V ResNet-18 from scratch")
    a("--cavmae_ckpt", default=None, help="CAV-MAE PyTorch checkpoint for the audio encoder (default: random "
                                          "init, with a warning)")
    a("--cavmae_dim", type=int, default=None, help=C._default_help(DEFAULTS, "cavmae_dim", "CAV-MAE width"))
    a("--cavmae_depth", type=int, default=None,
      help=C._default_help(DEFAULTS, "cavmae_depth", "CAV-MAE blocks (11 audio + 1 shared in the checkpoints)"))
    a("--cavmae_heads", type=int, default=None, help=C._default_help(DEFAULTS, "cavmae_heads", "CAV-MAE heads"))
    a("--cavmae_mlp_ratio", type=int, default=4, help="CAV-MAE MLP hidden width / width")
    a("--cavmae_patch", type=int, default=None,
      help=C._default_help(DEFAULTS, "cavmae_patch", "CAV-MAE fbank patch side (frames and mel bins)"))
    a("--audio_len", type=int, default=None, help=C._default_help(DEFAULTS, "audio_len", "fbank frames (10 ms each)"))
    a("--num_mel_bins", type=int, default=None, help=C._default_help(DEFAULTS, "num_mel_bins", "mel bins"))
    a("--fbank_mean", type=float, default=C.CAVMAE_FBANK_MEAN,
      help="the fbank enters as (fbank - mean) / std; default: CAV-MAE's statistics, which its weights expect "
           "(--fbank_mean 0 --fbank_std 1: as it is, like the official IEMOCAP code)")
    a("--fbank_std", type=float, default=C.CAVMAE_FBANK_STD, help="see --fbank_mean")
    C.add_it_encoder_args(p, DEFAULTS)
    a = p.add_argument_group("data").add_argument
    a("--split_seed", type=int, default=0, help="seed of the 60/20/20 split of a single list (no split files)")
    a("--audio_dir", default=None, help="folder of the fbank .npy (or .wav) files ({split} = train/dev/test), "
                                        "if not detected")
    a("--image_dir", default=None, help="folder of the face image folders ({split} = train/dev/test), if not detected")
    a("--skip_bad", action="store_true", help="skip utterances with missing files (and print how many)")
    a = p.add_argument_group("speed").add_argument
    a("--num_workers", type=int, default=None, help=C._default_help(DEFAULTS, "num_workers", "data loader workers"))
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast of the encoders and heads on CUDA, channels_last for --audio_encoder resnet18 "
           "(default: on with a CUDA GPU that has bf16, Ampere or later; CPU runs never use it)")
    a("--cpu_threads", type=int, default=None, help=C._default_help(
        DEFAULTS, "cpu_threads", "torch CPU threads, 0 = torch's default; the toy's tiny layers gain nothing from "
                                 "threads, which stall on a busy CPU"))
    C.add_toy_args(p, "utterances", 1000, 400, dev=200)
    args = C.finish_args(p, p.parse_args(argv), METHODS, DEFAULTS)
    if args.encoder == "m3ae" and args.image_size % args.patch_size:
        p.error(f"--image_size {args.image_size} is not a multiple of --patch_size {args.patch_size}")
    if args.audio_encoder == "cavmae" and (args.audio_len % args.cavmae_patch or args.num_mel_bins % args.cavmae_patch):
        p.error(f"--audio_len {args.audio_len} and --num_mel_bins {args.num_mel_bins} must be multiples of "
                f"--cavmae_patch {args.cavmae_patch}")
    if args.audio_encoder == "resnet18" and args.cavmae_ckpt:
        p.error("--cavmae_ckpt needs --audio_encoder cavmae")
    if args.fbank_std <= 0:
        p.error("--fbank_std must be positive")
    return args


def run_folder(args):
    return C.run_dir(args.out_dir, args.dataset, "train_ait.py", args.method, args.seed)


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
    with C.data_root(args.dataset, args.data_root, "mla_toy_ait_") as root, C.torch_threads(args.cpu_threads):
        device = torch.device(args.device)
        return train(args, root, device) if probe_of is None else probe(args, root, device, probe_of)


def build(args, root, device, evaluation=False):
    """The run's loaders (train, val, test) and method, on the device; evaluation: the training split read as the
    others (in order, no augmentation), as the linear probe reads it."""
    # ---- data: the utterances of each split; validation: the dev split, else a stratified share of train
    if args.dataset == "toy":
        C.ensure_toy(root, "my_train_iemo.txt", C.make_toy_ait, seed=args.toy_seed, n_train=args.toy_train,
                     n_dev=args.toy_dev, n_test=args.toy_test, frames=args.audio_len, mel_bins=args.num_mel_bins)
    data = C.load_iemocap_splits(root, args.split_seed, args.audio_dir, args.image_dir, args.num_mel_bins,
                                 args.skip_bad)
    splits = C.train_val_test(data, args.val_ratio, args.seed, args.dataset, "utterances")
    raw_text = any(not u.tokens for split in ("train", "dev", "test") for u in data[split] or [])
    tokenizer = args.tokenizer or (root / "tokenizer" if args.dataset == "toy" else None)
    image_text, text = C.image_text_encoders(args.encoder, raw_text, tokenizer, args.vocab_size, args.image_size,
                                             args.max_len, **C.it_encoder_options(args))
    audio = C.build_ait_audio_encoder(args.audio_encoder, image_text[0].dim, (args.cavmae_dim, args.cavmae_depth,
                                      args.cavmae_heads, args.cavmae_mlp_ratio, args.cavmae_patch), args.audio_len,
                                      args.num_mel_bins, args.cavmae_ckpt, args.partial_ckpt)
    sizes = dict(audio_len=args.audio_len, num_mel_bins=args.num_mel_bins, fbank_mean=args.fbank_mean,
                 fbank_std=args.fbank_std, **text)
    augmented = lambda split: split == "train" and not evaluation        # and shuffled
    loaders = {split: items and C.make_loader(C.AITDataset(items, augmented(split), **sizes), args.batch_size,
                                              augmented(split), args.seed, args.num_workers, device)
               for split, items in splits.items()}

    # ---- method: the heads over CAV-MAE (or ResNet-18) audio and M3AE-shaped image and text encoders
    method = C.build_method(args.method, [audio, *image_text], len(data["classes"]), MODALITIES, len(splits["train"]),
                            **C.method_options(args.method, args))
    C.init_heads(method)                            # encoders keep their own weights
    return method.to(device, memory_format=torch.channels_last if args.amp else torch.contiguous_format), loaders


def train(args, root, device):
    method, loaders = build(args, root, device)     # the data, the model and the method (above)
    optimizer = torch.optim.SGD(method.parameters(), args.lr, args.momentum, weight_decay=args.weight_decay)
    method = C.distribute(method, optimizer, args.sync_bn)    # torchrun: the batch over processes
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

    # ---- train: evaluate every epoch, keep the selected one (best.pt) and all that --resume needs (last.pt)
    state = C.start_run(run_folder(args), "train_ait.py", vars(args), method, optimizer, scheduler, loaders)
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
