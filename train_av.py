"""Audio-video experiments of Table 5 (CREMA-D, Kinetics-Sounds; also AVE, VGGSound) for every method.

    python train_av.py                                   # MLA on the built-in toy set, CPU, ~1.5 minutes
    python train_av.py --dataset cremad --data_root data/cremad --method mla --seed 0
    python train_av.py --dataset ks --method ogm_ge --seed 1
    python train_av.py --method all --seeds 0,1,2         # a sweep; finished runs are skipped on rerun

Writes <out_dir>/<dataset>/<method>/seed<k>/record.json and best.pt (the selected epoch).
"""
import argparse
from pathlib import Path

import torch

import common as C

METHODS = C.methods_of("av")        # the registry's, in its order (common.py)
MODALITIES = ["audio", "video"]

# The paper's settings for real data; the toy set has its own small defaults.
DEFAULTS = {
    "paper": dict(epochs=100, batch_size=64, lr=1e-3, lr_decay_step=70, lr_decay_ratio=0.1,
                  image_size=224, frames=3, audio_len=1024, num_mel_bins=128, num_workers=8, cpu_threads=0,
                  reconboost_stage_epochs=4, reconboost_correct_epochs=4),
    "toy": dict(epochs=10, batch_size=32, lr=1e-2, lr_decay_step=70, lr_decay_ratio=0.1,
                image_size=32, frames=2, audio_len=64, num_mel_bins=32, num_workers=0, cpu_threads=1,
                reconboost_stage_epochs=1, reconboost_correct_epochs=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="toy", choices=["toy", "cremad", "ks", "ave", "vggsound"],
      help="toy: a generated CREMA-D-like set; ave, vggsound: their release lists (prepare the videos first: "
           "python common.py prepare)")
    a("--data_root", default=None, help="data folder (default data/<dataset>; toy: generated in a temp dir)")
    C.add_common_args(p, METHODS, DEFAULTS, ["audio", "video"], condition="audio")
    a = p.add_argument_group("inputs").add_argument
    a("--image_size", type=int, default=None, help="frame crop size; paper 224; toy 32")
    a("--frames", type=int, default=None, help="frames per clip, taken evenly in sorted order; paper 3")
    a("--crop_scale", type=float, default=0.08,
      help="training crop: RandomResizedCrop's smallest area share (0.08: the paper's and torchvision's); "
           "raise it (e.g. 0.5) when small or centred frames lose their content to the crop")
    a("--no_augment", action="store_true",
      help="training frames resized as at test time (no crop, no flip), e.g. for small lip-region frames")
    a("--audio_len", type=int, default=None, help="fbank frames (10 ms each); paper 1024")
    a("--num_mel_bins", type=int, default=None, help="mel bins; paper 128")
    a("--audio_format", default="auto", choices=["auto", "npy", "wav"],
      help="auto: a precomputed fbank <clip>.npy when present, else <clip>.wav")
    a("--audio_dir", default=None, help="folder of audio files ({split} = train/test), if not detected")
    a("--frames_dir", default=None, help="folder of frame folders ({split} = train/test), if not detected")
    a("--split_seed", type=int, default=0, help="seed of the train/test split of the raw CREMA-D download")
    a("--actor_split", action="store_true", help="raw CREMA-D: actor-disjoint train/test split")
    a("--skip_bad", action="store_true", help="skip clips with missing files (and print how many)")
    a("--cache_dir", default=None, help="where the preprocessed splits are cached (default <data_root>/.mla_cache, "
                                        "or ~/.cache/mla when the data root is read-only)")
    a("--no_cache", action="store_true", help="decode every JPEG and compute every fbank each epoch instead "
                                             "(a toy set generated in a temporary folder, the default, is "
                                             "never cached; one written to --data_root is)")
    a = p.add_argument_group("speed").add_argument
    a("--num_workers", type=int, default=None,
      help="data loader workers (on CUDA with the cache: threads reading whole batches); paper 8; toy 0")
    a("--cpu_threads", type=int, default=None, help=C._default_help(
        DEFAULTS, "cpu_threads", "torch CPU threads, 0 = torch's default (one per core); 1 when another job shares "
                                 "the cores; every toy: 1, the same record on any machine"))
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast and channels_last ResNets on CUDA (default: on with a CUDA GPU that has bf16, "
           "Ampere or later; CPU runs never use it)")
    a("--compile", action="store_true",
      help="torch.compile the encoders (fused kernels; the first epoch pays about a minute per encoder to "
           "compile; checkpoints are unchanged)")
    C.add_toy_args(p, "clips", 600, 240)
    args = C.finish_args(p, p.parse_args(argv), METHODS, DEFAULTS)
    if not 0 < args.crop_scale <= 1:
        p.error("--crop_scale must be in (0, 1]")
    return args


def run_folder(args):
    return C.run_dir(args.out_dir, args.dataset, "train_av.py", args.method, args.seed)


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
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with C.data_root(args.dataset, args.data_root, "mla_toy_av_") as root, C.torch_threads(args.cpu_threads):
        return train(args, root, device) if probe_of is None else probe(args, root, device, probe_of)


def build(args, root, device, evaluation=False):
    """The run's loaders (train, val, test) and method, on the device; evaluation: the training split read as the
    others (in order, no augmentation), as the linear probe reads it."""
    # ---- data: the clips of each split; the validation split a seeded stratified share of train
    if args.dataset == "toy":
        C.ensure_toy(root, "train.csv", C.make_toy_av, seed=args.toy_seed, n_train=args.toy_train,
                     n_test=args.toy_test, frames=max(3, args.frames))
        data = C.load_av_splits("cremad", root, num_mel_bins=args.num_mel_bins)
    else:
        data = C.load_av_splits(args.dataset, root, args.split_seed, args.actor_split,
                                C.AVFiles(args.audio_format, args.audio_dir, args.frames_dir), args.skip_bad,
                                args.num_mel_bins)
    splits = C.train_val_test(data, args.val_ratio, args.seed, args.dataset, "clips")
    few = [c for c in data["train"] + data["test"] if 0 < c.n_frames < args.frames]
    if few:
        print(f"note: {len(few)} clips have fewer than --frames {args.frames} frames (e.g. {few[0].frames}/ has "
              f"{few[0].n_frames}); some of their frames are used twice")
    shape = dict(image_size=args.image_size, frames=args.frames, audio_len=args.audio_len,
                 num_mel_bins=args.num_mel_bins)
    augment = dict(crop_scale=args.crop_scale, augment=not args.no_augment)
    cached = not (args.no_cache or (args.dataset == "toy" and args.data_root is None))  # a temporary toy: no cache
    if not cached:
        dataset = lambda clips, train: C.AVDataset(clips, train, **shape, **augment)
    else:                                                   # the preprocessed cache (common.py, section 5)
        cache_dir = Path(args.cache_dir) if args.cache_dir else C.default_cache_dir(root)
        dataset = lambda clips, train: C.CachedAVDataset(
            clips, train, C.AVSizes(**shape), **augment, cache_dir=cache_dir, num_workers=args.num_workers,
            augment_on="device" if device.type == "cuda" else "workers")
    # on CUDA the cache's batches are read whole by --num_workers threads and cropped on the GPU (gather)
    with C.rank0_first():                   # torchrun: the cache is built once
        augmented = lambda split: split == "train" and not evaluation    # and shuffled
        loaders = {split: clips and C.make_loader(dataset(clips, augmented(split)), args.batch_size, augmented(split),
                                                  args.seed, args.num_workers, device,
                                                  gather=cached and device.type == "cuda")
                   for split, clips in splits.items()}

    # ---- model and method: a ResNet-18 per modality, the method's heads; the paper's SGD and StepLR
    encoders = [C.AudioResNet(), C.VideoResNet()]
    method = C.build_method(args.method, encoders, len(data["classes"]), MODALITIES, len(splits["train"]),
                            **C.method_options(args.method, args))
    method.apply(C.init_weights)
    return method.to(device, memory_format=torch.channels_last if args.amp else torch.contiguous_format), loaders


def train(args, root, device):
    method, loaders = build(args, root, device)     # the data, the model and the method (above)
    if args.compile:
        C.compile_encoders(method)
    optimizer = torch.optim.SGD(method.parameters(), args.lr, args.momentum, weight_decay=args.weight_decay)
    method = C.distribute(method, optimizer, args.sync_bn)    # torchrun: the batch over processes
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_decay_step, args.lr_decay_ratio)

    # ---- train: evaluate every epoch, keep the selected one (best.pt) and all that --resume needs (last.pt)
    state = C.start_run(run_folder(args), "train_av.py", vars(args), method, optimizer, scheduler, loaders)
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
