"""The preprocessed, memory-mapped A-V cache and the batched augmentation."""
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
import train_av
from conftest import TINY, written
from test_data import crema_rows, ogm_layout

SIZES = dict(image_size=8, frames=3, audio_len=40, num_mel_bins=16)


@pytest.fixture
def clips(tmp_path):
    (tmp_path / "data").mkdir()
    root = ogm_layout(tmp_path / "data", crema_rows(6), crema_rows(2, 10))
    return C.load_av_splits("cremad", root)


def test_cache_built_once_reused_and_rebuilt_on_change(clips, tmp_path, monkeypatch):
    builds = []
    real = C.CachedAVDataset.build
    monkeypatch.setattr(C.CachedAVDataset, "build", lambda self, *a: (builds.append(self.folder), real(self, *a)))
    cache = tmp_path / "cache"
    a = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
    b = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
    assert len(builds) == 1 and a.folder == b.folder
    assert a.fbank.dtype == np.float16 and a.fbank.shape == (6, 40, 16)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (6, 3, 3, 8, 8)      # 12x12 frames: short side 8
    C.CachedAVDataset(clips["train"], True, C.AVSizes(**{**SIZES, "audio_len": 50}), cache_dir=cache)     # a flag changed
    assert len(builds) == 2 and builds[1] != builds[0]
    wav = clips["train"][2].audio                                                   # a file changed
    os.utime(wav, ns=(os.stat(wav).st_atime_ns, os.stat(wav).st_mtime_ns + 10**9))
    C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
    assert len(builds) == 3 and builds[2] not in builds[:2]
    folder = Path(clips["train"][4].frames)                     # a frame rewritten in place, as ffmpeg -y does
    frame, stamp = C.list_frames(folder)[C.pick_even(10, 3)[0]], os.stat(folder).st_mtime_ns   # a frame it uses
    frame.write_bytes(frame.read_bytes() + b"\0")
    os.utime(folder, ns=(stamp, stamp))
    C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
    assert len(builds) == 4 and builds[3] not in builds[:3]
    assert not [p for p in cache.iterdir() if ".building." in p.name]


def test_a_cache_folder_gets_the_umasks_permissions(clips, tmp_path):
    import stat
    old = os.umask(0o022)
    try:
        ds = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert stat.filemode(ds.folder.stat().st_mode) == "drwxr-xr-x"        # others may read it, as mkdir makes it
    assert {stat.filemode(p.stat().st_mode) for p in ds.folder.iterdir()} == {"-rw-r--r--"}


def test_cached_and_uncached_give_the_same_test_tensors(clips, tmp_path):
    plain = C.AVDataset(clips["test"], False, **SIZES)
    cached = C.CachedAVDataset(clips["test"], False, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    for i in range(len(plain)):
        a0, v0, y0, _ = plain[i]
        a1, v1, y1, _ = cached[i]
        a1, v1 = cached.device_transform([a1[None], v1[None]], train=False)
        assert y0 == y1
        assert torch.allclose(v1[0], v0, atol=1e-5)                  # same pixels, same normalisation
        assert torch.allclose(a1[0], a0, rtol=1e-3, atol=1e-2)      # fbank stored as float16


def test_two_runs_building_at_once(clips, tmp_path):
    cache, out, errors = tmp_path / "cache", [], []

    def build():
        try:
            out.append(C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache))
        except Exception as e:          # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(out) == 2
    assert [p.name for p in cache.iterdir()] == [out[0].folder.name]
    assert np.array_equal(out[0].frames[:], out[1].frames[:])


def test_a_cache_too_large_for_its_disk_is_refused_before_writing(clips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(C, "free_bytes", lambda folder: 1000)
    with pytest.raises(C.DiskFull) as e:
        C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
    need = 6 * (2 * 40 * 16 + 3 * 3 * 8 * 8)                        # 6 clips of fp16 fbank and uint8 frames
    assert f"the cache needs {C.mb(need)} and its disk has {C.mb(1000)} free" in str(e.value)
    assert "--cache_dir" in str(e.value) and "--no_cache" in str(e.value)
    assert list(cache.iterdir()) == []                                # no half-built folder left


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
@pytest.mark.parametrize("err", ["ENOSPC", "EOPNOTSUPP"])
def test_cache_files_are_allocated_up_front(err, clips, tmp_path, monkeypatch):
    """A memory map writes into a sparse file: on a full disk that is a SIGBUS mid-build. The blocks are
    allocated first, so a full disk is a DiskFull error; a file system without fallocate still builds."""
    import errno
    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))

    monkeypatch.setattr(C.os, "posix_fallocate", fallocate)
    cache = tmp_path / "cache"
    if err == "ENOSPC":
        with pytest.raises(C.DiskFull, match="no room on its disk for the cache's fbank.npy"):
            C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
        assert list(cache.iterdir()) == []
    else:
        ds = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=cache)
        assert ds.frames.shape == (6, 3, 3, 8, 8) and len(calls) == 2


def test_random_resized_crop_flip_batch():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (64, 3, 12, 16), dtype=torch.uint8)
    out = C.random_resized_crop_flip(img, 10)
    assert out.shape == (64, 3, 10, 10) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    # a crop of the whole image at its own size is the image itself, or its mirror
    whole = C.random_resized_crop_flip(img[:, :, :, :12], 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for o, i in zip(whole, img[:, :, :, :12].float()):
        assert torch.allclose(o, i, atol=1e-3) or torch.allclose(o, i.flip(-1), atol=1e-3)
    flips = sum(not torch.allclose(o, i, atol=1e-3) for o, i in zip(whole, img[:, :, :, :12].float()))
    assert 15 < flips < 49                                            # about half are mirrored


def test_train_av_uses_the_cache(toy_root, tmp_path, monkeypatch, capsys):
    argv = ["--dataset", "toy", "--data_root", str(toy_root), "--out_dir", str(tmp_path / "runs"),
            "--cache_dir", str(tmp_path / "cache"), "--method", "concat", *TINY]
    [rec] = train_av.main(argv)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert names == ["eval", "eval", "train"]                         # val and test, train
    assert rec["args"]["cache_dir"] == str(tmp_path / "cache") and 0 <= rec["test"]["multi"] <= 100
    # a damaged cache in a folder it cannot be rebuilt in: one line naming the file and what to do, no run
    [train] = (tmp_path / "cache").glob("train-*")
    (train / "meta.json").unlink()
    monkeypatch.setattr(C.os, "access", lambda path, mode: Path(path) != tmp_path / "cache")
    with pytest.raises(SystemExit) as e:
        C.script_main(lambda: train_av.main([*argv, "--out_dir", str(tmp_path / "again")]))
    assert e.value.code == (f"error: {train / 'meta.json'}: missing (deleted, or left out of a copy); the cache "
                            f"cannot be rebuilt in read-only {tmp_path / 'cache'}: pass --no_cache, or give "
                            "--cache_dir a writable folder")
    assert "Traceback" not in capsys.readouterr().err and written(tmp_path / "again") == []


def test_building_the_cache_does_not_touch_the_global_rng(clips, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    assert torch.equal(torch.get_rng_state(), before)


def test_cached_dataset_pickles_without_its_arrays(clips, tmp_path):
    import pickle
    ds = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    a0 = ds[0][0]
    blob = pickle.dumps(ds)
    assert len(blob) < 20000                       # paths and clip list, not the arrays
    again = pickle.loads(blob)
    assert torch.equal(again[0][0], a0)


@pytest.mark.parametrize("train", [True, False])
def test_gather_loader_gives_the_dataloaders_batches(clips, tmp_path, train):
    """The threaded whole-batch reader (used on CUDA) yields what a DataLoader collates from the same
    data set, in the same shuffled order for the same generator state, epoch after epoch."""
    ds = C.CachedAVDataset(clips["train"], train, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache", augment_on="device")
    assert ds.gatherable and not C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache").gatherable
    ref = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=train, generator=torch.Generator().manual_seed(3))
    fast = C.GatherLoader(ds, 4, train, torch.Generator().manual_seed(3), threads=2, pin=False)
    assert len(fast) == len(ref) == 2
    for _ in range(2):
        got, want = list(fast), list(ref)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(g, w))
        assert torch.equal(fast.generator.get_state(), ref.generator.get_state())
    if train:
        assert sorted(torch.cat([b[3] for b in got]).tolist()) == list(range(6))


def test_gather_loader_reports_a_failed_read(clips, tmp_path):
    ds = C.CachedAVDataset(clips["train"], False, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")

    def broken(indices, pin=False):
        raise C.DataError("frames.npy: cannot read")
    ds.gather = broken
    with pytest.raises(C.DataError, match="cannot read"):
        list(C.GatherLoader(ds, 2, False, torch.Generator(), threads=2, pin=False))


def test_make_loader_gathers_whole_batches_when_the_script_asks(clips, tmp_path):
    """train_av.py asks for gather=True on CUDA with the cache (batches read whole by threads, cropped on the GPU)."""
    ds = C.CachedAVDataset(clips["train"], False, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    assert isinstance(C.make_loader(ds, 4, False, device="cpu"), torch.utils.data.DataLoader)
    assert isinstance(C.make_loader(ds, 4, False, num_workers=2, device="cuda", gather=True), C.GatherLoader)
    crops_in_workers = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="reads whole batches"):
        C.make_loader(crops_in_workers, 4, True, gather=True)


def test_an_epoch_trains_through_the_gather_loader(clips, tmp_path):
    """The CUDA path's loader (GatherLoader, crops by the data set's device transform), here on the CPU: an epoch
    runs through train_one_epoch (it raised AttributeError: a GatherLoader has no sampler) and the weights move."""
    ds = C.CachedAVDataset(clips["train"], True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache",
                           augment_on="device")
    loader = C.make_loader(ds, 2, True, seed=0, num_workers=0, gather=True)
    torch.manual_seed(0)
    method = C.build_method("concat", [C.AudioResNet(), C.VideoResNet()], 6, ["audio", "video"])   # CREMA-D: 6
    before = [p.detach().clone() for p in method.parameters()]
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    loss = C.train_one_epoch(method, loader, opt, 0, "cpu")
    assert math.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))


def test_crop_inside_an_extent_equals_the_crop_of_the_frame_alone():
    """A frame at the top left of a larger canvas whose rest repeats its last row and column (as the cache
    stores it): cropping inside its extent gives the crop of the frame alone (same draws, same pixels)."""
    for h, w in [(10, 7), (3, 16)]:                 # the second mostly falls back to torchvision's centre crop
        frame = torch.randint(0, 256, (32, 3, h, w), dtype=torch.uint8)
        canvas = torch.nn.functional.pad(frame.float(), (0, 20 - w, 0, 12 - h), mode="replicate").to(torch.uint8)
        torch.manual_seed(1)
        inside = C.random_resized_crop_flip(canvas, 9, extents=torch.tensor([[h, w]] * 32))
        torch.manual_seed(1)
        alone = C.random_resized_crop_flip(frame, 9)
        assert torch.allclose(inside, alone, atol=1e-3)


def test_training_frames_keep_their_aspect_ratio(tmp_path, monkeypatch):
    """The canvas has the first clip's shape; a square and a portrait clip are stored with their own
    aspect ratio at its top left, and the crops are drawn inside those extents."""
    from PIL import Image
    (tmp_path / "data").mkdir()
    root = ogm_layout(tmp_path / "data", crema_rows(6), crema_rows(2, 10))
    sizes = {0: (24, 12), 3: (12, 24)}                # (width, height): landscape first clip, a portrait one
    for i, (w, h) in sizes.items():
        for f in C.list_frames(root / "Image-01-FPS" / crema_rows(6)[i][0]):
            Image.new("RGB", (w, h), (40 * i, 90, 200)).save(f, quality=100)
    portrait = C.list_frames(root / "Image-01-FPS" / crema_rows(6)[3][0])[C.pick_even(10, 3)[0]]
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 12, 3), dtype=np.uint8)).save(portrait, "PNG")
    clips = C.load_av_splits("cremad", root)["train"]
    cached = C.CachedAVDataset(clips, True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache", augment_on="device")
    assert cached.frames.shape[-2:] == (8, 16)                                        # short side 8, 2:1
    assert cached.extents[:, 0].tolist() == [[8, 16], [8, 8], [8, 8], [8, 4], [8, 8], [8, 8]]
    from torchvision.transforms import v2 as T
    want = T.Resize((8, 4), antialias=True)(T.ToImage()(Image.open(portrait).convert("RGB")))
    stored = torch.from_numpy(np.array(cached.frames[3, 0]))
    assert torch.equal(stored[:, :, :4], want)
    assert torch.equal(stored[:, :, 4:], want[:, :, -1:].expand(-1, -1, 12))       # the last column repeated
    seen = []
    real = C.random_resized_crop_flip
    monkeypatch.setattr(C, "random_resized_crop_flip", lambda *a, **k: (seen.append(k["extents"]), real(*a, **k))[1])
    loader = torch.utils.data.DataLoader(cached, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    for xs, _, idx, _ in C.device_batches(loader, "cpu", True):
        assert xs[1].shape[-2:] == (8, 8)
        assert torch.equal(seen[-1], cached.extents[idx].flatten(0, 1))
    assert len(seen) == 2
    items = C.CachedAVDataset(clips, True, C.AVSizes(**SIZES), cache_dir=tmp_path / "cache")    # crops in the workers
    assert items[3][1].shape == (3, 3, 8, 8)


def ramp_clips(tmp_path):
    """Six training clips whose every frame is a 64 x 64 ramp: red = 4 x column, green = 4 x row, so a
    crop's output tells which part of the frame it covers."""
    from PIL import Image
    (tmp_path / "data").mkdir()
    root = ogm_layout(tmp_path / "data", crema_rows(6), crema_rows(2, 10))
    ramp = np.zeros((64, 64, 3), dtype=np.uint8)
    ramp[..., 0], ramp[..., 1] = np.arange(64)[None, :] * 4, np.arange(64)[:, None] * 4
    for row in crema_rows(6):
        for f in C.list_frames(root / "Image-01-FPS" / row[0]):
            Image.fromarray(ramp).save(f, "PNG")
    return C.load_av_splits("cremad", root)["train"]


def area_shares(video):
    """Per output frame (K, 3, S, S) in pixel units, the share of the frame its crop covers (about)."""
    span = lambda c: (c.amax((1, 2)) - c.amin((1, 2))) / 252
    return (span(video[:, 0]) * span(video[:, 1])).tolist()


def unnormalise(v):
    return v * torch.tensor(C.IMAGENET_STD).view(3, 1, 1) * 255 + torch.tensor(C.IMAGENET_MEAN).view(3, 1, 1) * 255


@pytest.mark.parametrize("crop_scale", [0.08, 0.6])
def test_crop_scale_acts_alike_on_the_cpu_cached_and_device_paths(crop_scale, tmp_path):
    clips = ramp_clips(tmp_path)
    sizes = {**SIZES, "image_size": 16, "crop_scale": crop_scale}
    plain = C.AVDataset(clips, True, **sizes)
    shape = C.AVSizes(**{**SIZES, "image_size": 16})
    workers = C.CachedAVDataset(clips, True, shape, crop_scale=crop_scale, cache_dir=tmp_path / "cache")
    device = C.CachedAVDataset(clips, True, shape, crop_scale=crop_scale, cache_dir=tmp_path / "cache", augment_on="device")
    shares = {"cpu": [], "cached": [], "device": []}
    torch.manual_seed(0)
    for _ in range(4):
        for i in range(len(clips)):
            shares["cpu"] += area_shares(unnormalise(plain[i][1]))
            shares["cached"] += area_shares(workers[i][1].float())
            _, v = device.device_transform([workers[i][0][None], device[i][1][None]], True, torch.tensor([i]))
            shares["device"] += area_shares(unnormalise(v[0]))
    means = {k: sum(v) / len(v) for k, v in shares.items()}
    if crop_scale == 0.6:
        assert all(min(v) > 0.6 * 0.75 for v in shares.values()), {k: min(v) for k, v in shares.items()}
    else:
        assert all(min(v) < 0.3 for v in shares.values())           # small crops happen on every path
    assert max(means.values()) - min(means.values()) < 0.1, means


def test_no_augment_trains_on_the_test_time_frames(tmp_path):
    clips = ramp_clips(tmp_path)
    plain, test = C.AVDataset(clips, True, **SIZES, augment=False), C.AVDataset(clips, False, **SIZES)
    assert all(torch.equal(plain[i][1], test[i][1]) for i in range(len(clips)))
    for on in ("workers", "device"):
        train = C.CachedAVDataset(clips, True, C.AVSizes(**SIZES), cache_dir=tmp_path / "c", augment_on=on, augment=False)
        ref = C.CachedAVDataset(clips, False, C.AVSizes(**SIZES), cache_dir=tmp_path / "c", augment_on=on)
        for i in range(len(clips)):
            a, v = train.device_transform([train[i][0][None], train[i][1][None]], True, torch.tensor([i]))
            _, w = ref.device_transform([ref[i][0][None], ref[i][1][None]], False)
            assert torch.equal(v, w) and torch.allclose(v[0], test[i][1], atol=1e-5)
    with pytest.raises(SystemExit):
        train_av.get_args(["--crop_scale", "0"])


def overwrite_middle(path, n, seed=0):
    """n random bytes written over the middle of a file, in place (its size is kept)."""
    with open(path, "r+b") as f:
        f.seek((os.path.getsize(path) - n) // 2)
        f.write(np.random.RandomState(seed).bytes(n))


def arrays(ds):
    """Copies of a cached data set's fbank, frames and extents."""
    return np.array(ds.fbank), np.array(ds.frames), ds.extents.numpy().copy()


@pytest.mark.parametrize("fault", ["truncated", "overwritten", "meta.json deleted"])
def test_a_damaged_cache_is_rebuilt_with_one_line(fault, clips, tmp_path, capsys):
    """Each fault of a built cache: the next open says in one line which file failed and why, builds the
    folder again in its place and reads what a fresh build decodes; the open after that is silent."""
    sizes = {**SIZES, "image_size": 32}                  # frames.npy 55 KB: room for 5,000 overwritten bytes
    cache = tmp_path / "cache"
    first = C.CachedAVDataset(clips["train"], True, C.AVSizes(**sizes), cache_dir=cache)
    folder, fresh = first.folder, arrays(first)         # copies: the files are damaged below
    frames, size = folder / "frames.npy", 128 + 6 * 3 * 3 * 32 * 32         # npy header + (6, 3, 3, 32, 32) uint8
    assert frames.stat().st_size == size
    capsys.readouterr()
    if fault == "truncated":
        os.truncate(frames, size // 2)
        why = f"{frames}: {size // 2} bytes; meta.json says {size}"
    elif fault == "overwritten":
        overwrite_middle(frames, 5000)
        why = f"{frames}: its bytes differ from those it was built with (overwritten or damaged)"
    else:
        (folder / "meta.json").unlink()
        why = f"{folder / 'meta.json'}: missing (deleted, or left out of a copy)"
    again = C.CachedAVDataset(clips["train"], True, C.AVSizes(**sizes), cache_dir=cache)
    assert capsys.readouterr().err == f"warning: {why}; building it again\n"
    assert again.folder == folder and [p.name for p in cache.iterdir()] == [folder.name]    # nothing left aside
    for got, decoded in zip(arrays(again), fresh):
        assert np.array_equal(got, decoded)
    C.CachedAVDataset(clips["train"], True, C.AVSizes(**sizes), cache_dir=cache)
    assert capsys.readouterr().err == ""


def test_a_damaged_cache_in_a_read_only_folder_is_an_error(clips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = C.CachedAVDataset(clips["train"], False, C.AVSizes(**SIZES), cache_dir=cache).folder
    overwrite_middle(folder / "fbank.npy", 100)
    monkeypatch.setattr(C.os, "access", lambda path, mode: Path(path) != cache)
    with pytest.raises(C.DataError) as e:
        C.CachedAVDataset(clips["train"], False, C.AVSizes(**SIZES), cache_dir=cache)
    assert str(e.value) == (f"{folder / 'fbank.npy'}: its bytes differ from those it was built with (overwritten "
                            f"or damaged); the cache cannot be rebuilt in read-only {cache}: pass --no_cache, or "
                            "give --cache_dir a writable folder")


def test_a_cache_from_an_earlier_version_or_other_settings_is_rebuilt(clips, tmp_path, capsys):
    import json
    cache = tmp_path / "cache"
    folder = C.CachedAVDataset(clips["test"], False, C.AVSizes(**SIZES), cache_dir=cache).folder
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["files"]["extents.npy"] == {"shape": [2, 3, 2], "dtype": "int32", "bytes": 128 + 2 * 3 * 2 * 4,
                                            "crc32": C.file_checksum(folder / "extents.npy")}
    for edit, why in [(lambda m: m.pop("files"), "holds no checksums (a cache built by an earlier version)"),
                      (lambda m: m.update(clips=m["clips"][::-1]), "describes other settings or clips")]:
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
        capsys.readouterr()
        C.CachedAVDataset(clips["test"], False, C.AVSizes(**SIZES), cache_dir=cache)
        assert capsys.readouterr().err == f"warning: {folder / 'meta.json'}: {why}; building it again\n"
        meta = json.loads((folder / "meta.json").read_text())


def test_file_checksum_reads_every_chunk(tmp_path):
    import zlib
    path = tmp_path / "x.bin"
    data = np.random.RandomState(0).bytes(10_000)
    path.write_bytes(data)
    crc = lambda b: zlib.crc32(b).to_bytes(4, "little")
    whole = C.file_checksum(path, chunk=4096)
    assert whole == f"{zlib.crc32(crc(data[:4096]) + crc(data[4096:8192]) + crc(data[8192:])):08x}"
    for at in (0, 5000, 9999):                                       # one bit changed anywhere
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        assert C.file_checksum(path, chunk=4096) != whole
    path.write_bytes(b"")
    assert C.file_checksum(path) == f"{zlib.crc32(b''):08x}" == "00000000"
