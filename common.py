"""Shared pieces of the MLA reference implementation.

Sections (search for the banner lines):
  1. Utilities ........ seeding, errors, atomic writes, code version
  2. Data: signals .... WAV reading, resampling, fbank, frame selection, transforms, splits
  3. Data: A-V sets ... CREMA-D (three layouts), Kinetics-Sounds, the toy set, loaders
  3b. Data: I-T sets .. Food-101 and MVSA-Single (jsonl and MLA layouts), text tokens, the toy I-T set
  4. Encoders ......... torchvision ResNet-18 for audio and video, the init
  4b. Transformers .... M3AE-shaped image/text encoders and their checkpoint loader, transformers models
  5. Methods .......... sum, concat, late_fusion, film, bigated, ogm, ogm_ge, qmf, mla
  6. Evaluation, training loop, sweeps and the run record
  7. Report and curves ... `python common.py report RUNS_DIR [--paper]`, `python common.py plot RUNS_DIR`

Every method is an ``nn.Module`` that owns its encoders and heads and exposes
``train_step(xs, y, idx, optimizer, progress) -> loss`` and ``predict(xs) -> (fused, [unimodal])``,
where ``xs`` is a list with one input tensor per modality, in the order of ``modalities``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


# ==================================================================================================
# 1. Utilities
# ==================================================================================================

class DataError(Exception):
    """Bad or missing input data. The message names the file (and line) and what was expected."""


def where(path, line=None):
    return f"{path}:{line}" if line is not None else f"{path}"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(_worker_id):
    # DataLoader gives every worker its own torch seed; derive numpy's and random's from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_json_dump(obj, path):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def code_version():
    """Git commit of this code ('+dirty' when tracked files differ from it), or 'unknown'."""
    try:
        rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(HERE), "diff", "--quiet", "HEAD"],
                               capture_output=True, timeout=10).returncode != 0
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_text_lines(path):
    """Lines of a text file as (line_number, stripped_text), blank lines dropped, BOM accepted."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{where(path, line)}: not valid UTF-8 text (byte {e.start}); expected a UTF-8 "
                        "text file") from None
    return [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1) if s.strip()]


# ==================================================================================================
# 2. Data: signals (audio, frames, transforms, splits)
# ==================================================================================================

WAV_FORMATS = {(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64)}     # (format tag, bits)


def wav_info(path):
    """Parse a RIFF/WAVE header without reading the samples.

    Returns (format_tag, channels, sample_rate, bits, data_offset, n_frames); raises DataError for a
    missing, non-WAV, empty or unsupported file (checked once per clip before training starts).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected a WAV file") from None
    with f:
        total = os.fstat(f.fileno()).st_size
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise DataError(f"{path}: not a RIFF/WAVE file (starts with {head[:4]!r}); expected a WAV file")
        pos, fmt = 12, None
        while pos + 8 <= total:
            f.seek(pos)
            cid, size = f.read(4), struct.unpack("<I", f.read(4))[0]
            if cid == b"fmt ":
                body = f.read(min(size, 64))
                if len(body) < 16:
                    raise DataError(f"{path}: 'fmt ' chunk of {len(body)} bytes; expected at least 16")
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == 0xFFFE and len(body) >= 26:          # WAVE_FORMAT_EXTENSIBLE: real tag inside
                    tag = struct.unpack("<H", body[24:26])[0]
                fmt = (tag, channels, rate, bits)
            elif cid == b"data":
                if fmt is None:
                    break
                tag, channels, rate, bits = fmt
                if (tag, bits) not in WAV_FORMATS or channels < 1 or rate < 1:
                    raise DataError(f"{path}: WAV format tag {tag}, {bits} bits, {channels} channels, {rate} Hz "
                                    "is not supported; expected PCM (8/16/24/32-bit) or IEEE float (32/64-bit)")
                avail = min(size, total - pos - 8)        # a streamed file may claim more than it holds
                n = avail // (bits // 8 * channels)
                if n == 0:
                    raise DataError(f"{path}: WAV file holds no samples; expected a non-empty recording")
                return tag, channels, rate, bits, pos + 8, n
            pos += 8 + size + (size & 1)
    raise DataError(f"{path}: WAV file without {'fmt' if fmt is None else 'data'} chunk")


def read_wav(path):
    """Read a RIFF/WAVE file (PCM 8/16/24/32-bit, IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE).

    Returns (mono float32 numpy array in [-1, 1], sample_rate). Multi-channel audio is averaged.
    """
    tag, channels, rate, bits, offset, n = wav_info(path)
    with open(path, "rb") as f:
        f.seek(offset)
        pcm = f.read(n * bits // 8 * channels)
    if tag == 1 and bits == 8:
        x = (np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits == 16:
        x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == 1 and bits == 32:
        x = np.frombuffer(pcm, "<i4").astype(np.float32) / float(1 << 31)
    else:                                                # IEEE float
        x = np.frombuffer(pcm, "<f4" if bits == 32 else "<f8").astype(np.float32)
    return x.reshape(n, channels).mean(axis=1), rate


def write_wav(path, wave, rate):
    """Write mono float audio in [-1, 1] as 16-bit PCM (used for fixtures and the toy set)."""
    import wave as wavemod
    x = np.clip(np.asarray(wave, np.float32), -1, 1)
    with wavemod.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes((x * 32767).astype("<i2").tobytes())


def pad_or_cut(x, length):
    """Zero-pad or cut a (T, F) tensor along T to `length` rows."""
    t = x.shape[0]
    if t < length:
        return F.pad(x, (0, 0, 0, length - t))
    return x[:length]


def wav_to_fbank(wave, rate, num_mel_bins=128, target_len=1024):
    """Kaldi-compatible log-mel fbank (SPEC 4): 16 kHz, 25 ms Hanning window, 10 ms shift, dither 0,
    waveform mean removed; zero-padded or cut to `target_len` frames. Returns (target_len, bins)."""
    import torchaudio
    w = torch.as_tensor(np.asarray(wave), dtype=torch.float32).reshape(1, -1)
    if rate != 16000:
        w = torchaudio.functional.resample(w, int(rate), 16000)
    w = w - w.mean()
    if w.shape[1] < 400:                      # shorter than one window: pad so one frame exists
        w = F.pad(w, (0, 400 - w.shape[1]))
    fb = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=num_mel_bins,
                                           dither=0.0, frame_shift=10)
    return pad_or_cut(fb, target_len)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def natural_key(name):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frames(folder):
    """Image files of a frame folder in natural sorted order (frame_2 before frame_10)."""
    folder = Path(folder)
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)]
    return [folder / n for n in sorted(names, key=natural_key)]


def pick_even(n, k):
    """k indices spread evenly over n sorted items (centred in k equal segments; repeats if n < k)."""
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def frame_transform(image_size, train):
    """SPEC 4: train = RandomResizedCrop + horizontal flip, test = resize; ImageNet normalisation."""
    from torchvision.transforms import v2 as T
    head = ([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()] if train
            else [T.Resize((image_size, image_size), antialias=True)])
    return T.Compose([T.ToImage(), *head, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path, src=None):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        ref = f" (listed at {src})" if src else ""
        raise DataError(f"{path}: unreadable image{ref}: {e}; expected a readable JPEG/PNG") from None


def stratified_split(labels, ratio, seed):
    """Seeded stratified split of indices: ~`ratio` of every class goes to the second part."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(ratio * len(idx)))
        if ratio > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.extend(idx[:k].tolist())
        keep.extend(idx[k:].tolist())
    return sorted(keep), sorted(held)


# ==================================================================================================
# 3. Data: A-V data sets
# ==================================================================================================

@dataclass
class Clip:
    id: str
    label: int
    audio: str           # .wav or precomputed fbank .npy
    frames: str          # folder of frames
    src: str             # "list_file:line" that named the clip, for error messages


class AVDataset(torch.utils.data.Dataset):
    """Returns (audio [1, audio_len, mel_bins], video [frames, 3, S, S], label, index)."""

    def __init__(self, clips, train, image_size=224, frames=3, audio_len=1024, num_mel_bins=128):
        self.clips, self.train = list(clips), train
        self.frames, self.audio_len, self.num_mel_bins = frames, audio_len, num_mel_bins
        self.transform = frame_transform(image_size, train)

    def __len__(self):
        return len(self.clips)

    def load_audio(self, clip):
        if clip.audio.endswith(".npy"):
            try:
                fb = np.load(clip.audio, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{clip.audio}: unreadable .npy (clip at {clip.src}): {e}") from None
            fb = np.squeeze(fb)
            if fb.ndim != 2 or fb.shape[1] != self.num_mel_bins:
                raise DataError(f"{clip.audio}: fbank of shape {tuple(fb.shape)} (clip at {clip.src}); "
                                f"expected (frames, {self.num_mel_bins}) — set --num_mel_bins to its width")
            fb = pad_or_cut(torch.from_numpy(fb.astype(np.float32)), self.audio_len)
        else:
            try:
                wave, rate = read_wav(clip.audio)
            except DataError as e:
                raise DataError(f"{e} (clip at {clip.src})") from None
            fb = wav_to_fbank(wave, rate, self.num_mel_bins, self.audio_len)
        return fb.unsqueeze(0)

    def load_video(self, clip):
        paths = list_frames(clip.frames)
        if not paths:
            raise DataError(f"{clip.frames}: no frames (clip at {clip.src}); expected .jpg files")
        return torch.stack([self.transform(load_image(paths[i], clip.src))
                            for i in pick_even(len(paths), self.frames)])

    def __getitem__(self, i):
        clip = self.clips[i]
        return self.load_audio(clip), self.load_video(clip), clip.label, i


# Where the peer repositories keep audio and frames, relative to the data root ({split} = train/test).
AUDIO_DIRS = ["audio/{split}_fbank", "{split}_fbank", "audio/{split}_spec", "{split}_spec", "AudioWAV",
              "audio/{split}", "{split}_wav/{split}", "{split}_wav", "audio", "wav", "."]
FRAME_DIRS = ["visual/{split}_imgs/Image-01-FPS", "{split}_imgs/Image-01-FPS", "Image-01-FPS",
              "visual/Image-01-FPS", "visual/{split}_imgs", "{split}_imgs", "visual/{split}",
              "frames/{split}", "{split}_frames", "frames", "visual"]

LAYOUT_HELP = """accepted layouts:
  CREMA-D, MLA layout:     my_train_cre.txt, my_test_cre.txt ('1085_IWL_SAD_XX.flv Sad'), stat_cre.txt,
                           audio/{train,test}_fbank/<clip>.npy, visual/{train,test}_imgs/Image-01-FPS/<clip>/*.jpg
  CREMA-D, OGM-GE layout:  train.csv, test.csv ('1088_IOM_NEU_XX,NEU'), optional stat.csv,
                           AudioWAV/<clip>.wav, Image-01-FPS/<clip>/*.jpg
  CREMA-D, raw download:   AudioWAV/*.wav and VideoFlash/*.flv (frames extracted with ffmpeg) or
                           Image-01-FPS/<clip>/*.jpg; a seeded split is made (--actor_split for actor-disjoint)
  Kinetics-Sounds (OGM-GE): my_train.txt, my_test.txt ('<ytid>_<start>_<end>,<any>,<label index>'),
                           audio as <clip>.wav or <clip>.npy (fbank) in e.g. audio/{split}/ or {split}_fbank/,
                           frames in e.g. Image-01-FPS/<clip>/ or visual/{split}_imgs/Image-01-FPS/<clip>/
  --audio_dir / --frames_dir override where audio and frames are looked for."""

CREMAD_DEFAULT_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def _find_dir(root, override, templates, split, entries, is_match, what):
    """The folder (from `templates`) holding the most of the first clips of a list."""
    if override:
        cands = [Path(override.format(split=split))]
    else:
        cands = [root / t.format(split=split) for t in templates]
    probe = entries[:25]
    best, best_hits = None, 0
    for d in cands:
        if d.is_dir():
            hits = sum(1 for e in probe if is_match(d, e[0]))
            if hits > best_hits:
                best, best_hits = d, hits
    if best is None and not override:          # not in a usual place: search the tree (4 levels)
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            if len(d.relative_to(root).parts) > 4:
                dirnames[:] = []
                continue
            dirnames.sort()
            hits = sum(1 for e in probe if is_match(d, e[0]))
            if hits > best_hits:
                best, best_hits = d, hits
                if hits == len(probe):
                    break
    if best is None:
        clip, src = entries[0][0], entries[0][2]
        tried = ", ".join(str(d) for d in cands)
        raise DataError(f"{src}: {what} of clip '{clip}' not found; looked in {tried}\n{LAYOUT_HELP}")
    return best


def check_audio(path, num_mel_bins=None):
    """Cheap check of one audio file before training: a WAV header, or a .npy fbank's shape."""
    if str(path).endswith(".npy"):
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable .npy: {e}; expected a (frames, mel bins) fbank array") from None
        shape = tuple(n for n in shape if n != 1) or shape
        if len(shape) != 2 or (num_mel_bins and shape[1] != num_mel_bins):
            raise DataError(f"{path}: fbank of shape {shape}; expected (frames, {num_mel_bins or 'mel bins'})"
                            " — set --num_mel_bins to its width")
    else:
        wav_info(path)


def resolve_clips(root, split, entries, audio_format="auto", audio_dir=None, frames_dir=None,
                  skip_bad=False, stats=None, num_mel_bins=None):
    """entries: [(clip_id, label_index, 'file:line')] -> [Clip] with audio and frame paths checked
    (every audio file's header is read, so an empty or broken file stops the run before training)."""
    root = Path(root)
    exts = {"auto": (".npy", ".wav"), "npy": (".npy",), "wav": (".wav",)}[audio_format]
    has_audio = lambda d, c: any((d / (c + e)).is_file() for e in exts)
    has_frames = lambda d, c: (d / c).is_dir()
    adir = _find_dir(root, audio_dir, AUDIO_DIRS, split, entries, has_audio, "audio (" + "/".join(exts) + ")")
    fdir = _find_dir(root, frames_dir, FRAME_DIRS, split, entries, has_frames, "frame folder")
    clips, seen = [], {}
    for clip_id, label, src in entries:
        try:
            if clip_id in seen:
                raise DataError(f"{src}: clip '{clip_id}' listed twice (first at {seen[clip_id]}); "
                                "expected each clip once")
            seen[clip_id] = src
            audio = next((adir / (clip_id + e) for e in exts if (adir / (clip_id + e)).is_file()), None)
            if audio is None:
                raise DataError(f"{src}: audio of clip '{clip_id}' missing: expected "
                                f"{adir / (clip_id + exts[-1])}" + (f" or {exts[0]}" if len(exts) > 1 else ""))
            try:
                check_audio(audio, num_mel_bins)
            except DataError as e:
                raise DataError(f"{e} (clip at {src})") from None
            fr = fdir / clip_id
            if not fr.is_dir():
                raise DataError(f"{src}: frame folder of clip '{clip_id}' missing: expected {fr}/")
            if not any(n.lower().endswith(IMAGE_EXTS) for n in os.listdir(fr)):
                raise DataError(f"{src}: frame folder {fr}/ of clip '{clip_id}' is empty; expected .jpg frames")
            clips.append(Clip(clip_id, label, str(audio), str(fr), src))
        except DataError as e:
            if not skip_bad:
                raise
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + 1
                stats.setdefault("examples", []).append(str(e))
    if not clips:
        raise DataError(f"{entries[0][2].rsplit(':', 1)[0]}: no usable clips in the {split} split")
    return clips, adir, fdir


def _class_file(path):
    """Class names, one a line (first CSV column; BOM accepted)."""
    return [next(csv.reader([s]))[0].strip() for _, s in read_text_lines(path)]


def _label_index(label, classes, src, class_src):
    if label not in classes:
        raise DataError(f"{src}: label '{label}' is not a known class; expected one of {classes} "
                        f"(from {class_src})")
    return classes.index(label)


def _nonempty(lines, path, example):
    if not lines:
        raise DataError(f"{path}: the list is empty; expected lines like '{example}'")
    return lines


def cremad_mla_lists(root):
    """MLA layout: 'my_{train,test}_cre.txt' with '<clip>.flv <Label>', classes from stat_cre.txt."""
    out, raw = {}, {}
    for split in ("train", "test"):
        path = root / f"my_{split}_cre.txt"
        rows = []
        for ln, s in _nonempty(read_text_lines(path), path, "1085_IWL_SAD_XX.flv Sad"):
            parts = s.split(None, 1)
            if len(parts) != 2:
                raise DataError(f"{where(path, ln)}: '{s}'; expected '<clip>.flv <Label>'")
            rows.append((os.path.splitext(parts[0])[0], parts[1].strip(), where(path, ln)))
        raw[split] = rows
    stat = root / "stat_cre.txt"
    if stat.is_file():
        classes, class_src = sorted(_class_file(stat)), str(stat)      # official order: sorted names
    else:
        classes, class_src = sorted({r[1] for r in raw["train"]}), f"the labels of {root / 'my_train_cre.txt'}"
    for split, rows in raw.items():
        out[split] = [(c, _label_index(l, classes, src, class_src), src) for c, l, src in rows]
    return out, classes


def cremad_ogm_lists(root):
    """OGM-GE layout: 'train.csv'/'test.csv' with '<clip>,<LABEL>' (BOM allowed), optional stat.csv."""
    raw = {}
    for split in ("train", "test"):
        path = root / f"{split}.csv"
        rows = []
        for ln, s in _nonempty(read_text_lines(path), path, "1088_IOM_NEU_XX,NEU"):
            parts = [p.strip() for p in next(csv.reader([s]))]
            if len(parts) < 2 or not parts[0] or not parts[1]:
                raise DataError(f"{where(path, ln)}: '{s}'; expected '<clip>,<LABEL>'")
            rows.append((parts[0], parts[1], where(path, ln)))
        raw[split] = rows
    stat = root / "stat.csv"
    if stat.is_file():
        classes, class_src = _class_file(stat), str(stat)
    else:
        found = {r[1] for r in raw["train"]}
        known = [c for c in CREMAD_DEFAULT_ORDER if c in found]
        classes = known + sorted(found - set(known))
        class_src = f"the labels of {root / 'train.csv'}"
    return {split: [(c, _label_index(l, classes, src, class_src), src) for c, l, src in rows]
            for split, rows in raw.items()}, classes


def extract_frames_ffmpeg(video, out_dir, fps=1):
    if shutil.which("ffmpeg") is None:
        raise DataError(f"{video}: frames are not extracted and ffmpeg is not installed; install ffmpeg "
                        f"(e.g. 'apt install ffmpeg' or 'conda install ffmpeg') or extract 1-fps frames to "
                        f"{out_dir}/frame_00001.jpg ... yourself")
    out_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(video), "-vf", f"fps={fps}",
                        str(out_dir / "frame_%05d.jpg")], capture_output=True, text=True)
    if r.returncode != 0 or not list_frames(out_dir):
        raise DataError(f"{video}: ffmpeg could not extract frames: {r.stderr.strip()[-300:]}")


def cremad_raw_lists(root, split_seed=0, test_ratio=0.1, actor_split=False):
    """Raw download: AudioWAV/*.wav (+ VideoFlash/*.flv). Labels from the names '1001_DFA_ANG_XX';
    a seeded stratified split, or an actor-disjoint one (actors drawn with the seed)."""
    wavs = sorted((root / "AudioWAV").glob("*.wav"))
    if not wavs:
        raise DataError(f"{root / 'AudioWAV'}: no .wav files\n{LAYOUT_HELP}")
    frames_root = root / "Image-01-FPS"
    rows = []
    for w in wavs:
        parts = w.stem.split("_")
        if len(parts) < 3:
            raise DataError(f"{w}: name '{w.stem}'; expected '<actor>_<sentence>_<EMOTION>_<level>'")
        rows.append((w.stem, parts[2], parts[0], str(w)))
    todo = [r for r in rows if not (frames_root / r[0]).is_dir() or not list_frames(frames_root / r[0])]
    if todo:
        if not os.access(root, os.W_OK):
            raise DataError(f"{root}: frames of {len(todo)} clips are missing and the folder is read-only; "
                            f"extract them to {frames_root}/<clip>/ first")
        from tqdm import tqdm
        for clip, *_ in tqdm(todo, desc="extracting 1-fps frames", unit="clip"):
            video = root / "VideoFlash" / f"{clip}.flv"
            if not video.is_file():
                raise DataError(f"{video}: video of clip '{clip}' missing (needed for its frames)")
            extract_frames_ffmpeg(video, frames_root / clip)
    found = {r[1] for r in rows}
    classes = [c for c in CREMAD_DEFAULT_ORDER if c in found] + sorted(found - set(CREMAD_DEFAULT_ORDER))
    labels = [classes.index(r[1]) for r in rows]
    if actor_split:
        actors = sorted({r[2] for r in rows})
        rng = np.random.RandomState(split_seed)
        n_test = max(1, int(round(test_ratio * len(actors))))
        test_actors = set(rng.choice(actors, n_test, replace=False).tolist())
        test_idx = [i for i, r in enumerate(rows) if r[2] in test_actors]
        train_idx = [i for i, r in enumerate(rows) if r[2] not in test_actors]
    else:
        train_idx, test_idx = stratified_split(labels, test_ratio, split_seed)
    return {"train": [(rows[i][0], labels[i], rows[i][3]) for i in train_idx],
            "test": [(rows[i][0], labels[i], rows[i][3]) for i in test_idx]}, classes


def ks_lists(root):
    """Kinetics-Sounds, OGM-GE layout: 'my_{train,test}.txt' with '<clip>,<anything>,<label index>'.
    Class names from classes.txt / stat.txt / class.txt when present, else the indices."""
    raw = {}
    for split in ("train", "test"):
        path = root / f"my_{split}.txt"
        rows = []
        for ln, s in _nonempty(read_text_lines(path), path, "--4-0ihtnBU_000058_000068,10,4"):
            parts = [p.strip() for p in s.split(",")]
            if len(parts) < 2 or not re.fullmatch(r"\d+", parts[-1]):
                raise DataError(f"{where(path, ln)}: '{s}'; expected '<clip>,<anything>,<label index>'")
            rows.append((parts[0], int(parts[-1]), where(path, ln)))
        raw[split] = rows
    n = 1 + max(r[1] for rows in raw.values() for r in rows)
    classes = [str(i) for i in range(n)]
    for name in ("classes.txt", "stat.txt", "class.txt"):
        if (root / name).is_file():
            names = _class_file(root / name)
            if len(names) == 1 and "," in names[0]:
                names = [c.strip() for c in read_text_lines(root / name)[0][1].split(",")]
            if len(names) < n:
                raise DataError(f"{root / name}: {len(names)} class names but labels go up to {n - 1}; "
                                "expected one name per label index")
            classes = names
            break
    return raw, classes


def detect_av_layout(dataset, root):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (pass --data_root)\n{LAYOUT_HELP}")
    if dataset == "ks":
        if (root / "my_train.txt").is_file():
            return "ks_ogm"
    else:
        if (root / "my_train_cre.txt").is_file():
            return "cremad_mla"
        if (root / "train.csv").is_file():
            return "cremad_ogm"
        if (root / "AudioWAV").is_dir():
            return "cremad_raw"
    raise DataError(f"{root}: no known {dataset} layout found\n{LAYOUT_HELP}")


def load_av_splits(dataset, root, split_seed=0, actor_split=False, audio_format="auto",
                   audio_dir=None, frames_dir=None, skip_bad=False, num_mel_bins=None):
    """Detect the layout and return dict(layout, classes, train=[Clip], test=[Clip], skipped=int)."""
    root = Path(root)
    layout = detect_av_layout(dataset, root)
    if layout == "cremad_mla":
        lists, classes = cremad_mla_lists(root)
    elif layout == "cremad_ogm":
        lists, classes = cremad_ogm_lists(root)
    elif layout == "cremad_raw":
        lists, classes = cremad_raw_lists(root, split_seed, 0.1, actor_split)
    else:
        lists, classes = ks_lists(root)
    stats, out = {}, {"layout": layout, "classes": classes}
    for split in ("train", "test"):
        out[split], out[split + "_audio_dir"], out[split + "_frames_dir"] = resolve_clips(
            root, split, lists[split], audio_format, audio_dir, frames_dir, skip_bad, stats, num_mel_bins)
    out["skipped"] = stats.get("skipped", 0)
    return out


def make_toy_av(root, seed=0, n_train=600, n_test=240, rate=8000, seconds=0.7, frames=3, px=40,
                class_blobs=4, clutter_blobs=4, cue=0.85):
    """Write a small CREMA-D-like A-V data set in the OGM-GE layout (train.csv, test.csv, stat.csv,
    AudioWAV/*.wav, Image-01-FPS/<clip>/*.jpg), generated deterministically from `seed`.

    Six classes in three pairs. Audio carries a loud tone that names the pair (learned in a few
    steps) and, for the class inside the pair, only a cue that agrees with the label with
    probability `cue`; video names the class by the colour of `class_blobs` small blobs among
    `clutter_blobs` random ones: slower to learn, but it holds what audio lacks. Joint training
    leans on audio and leaves video under-trained, as on CREMA-D.
    """
    from PIL import Image, ImageDraw
    root = Path(root)
    rng = np.random.RandomState(seed)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (root / "Image-01-FPS").mkdir(parents=True, exist_ok=True)
    classes = ["c0", "c1", "c2", "c3", "c4", "c5"]
    pair_hz = [250.0, 700.0, 1800.0]
    palette = [(220, 40, 40), (40, 200, 40), (40, 80, 230), (230, 210, 40), (200, 40, 220), (40, 210, 210)]
    t = np.arange(int(rate * seconds)) / rate
    rows = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            y = i % 6
            clip = f"{split}{i:04d}_c{y}"
            # audio: pair tone (clear) + an in-pair cue that agrees with the label with probability `cue`
            f0 = pair_hz[y // 2] * rng.uniform(0.93, 1.07)
            wav = 0.3 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.3))
            if rng.rand() < (cue if y % 2 else 1 - cue):
                wav += 0.08 * np.sin(2 * np.pi * 3100.0 * t)
            wav += 0.1 * rng.randn(len(t)) * np.exp(-((t - rng.uniform(0, seconds)) / 0.15) ** 2)
            wav += 0.02 * rng.randn(len(t))
            write_wav(root / "AudioWAV" / f"{clip}.wav", wav, rate)
            # video: clutter of random blobs plus three blobs in the class colour, per frame
            d = root / "Image-01-FPS" / clip
            d.mkdir(exist_ok=True)
            for k in range(frames):
                im = Image.new("RGB", (px, px), tuple(int(v) for v in rng.randint(60, 190, 3)))
                dr = ImageDraw.Draw(im)
                blobs = [tuple(int(v) for v in rng.randint(0, 256, 3)) for _ in range(clutter_blobs)]
                blobs += [tuple(int(np.clip(c + rng.randint(-25, 26), 0, 255)) for c in palette[y])] * class_blobs
                for colour in [blobs[j] for j in rng.permutation(len(blobs))]:
                    x0, y0, r = rng.randint(0, px), rng.randint(0, px), rng.randint(2, 5)
                    dr.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
                im.save(d / f"frame_{k + 1:05d}.jpg", quality=90)
            rows[split].append(f"{clip},{classes[y]}")
    for split in rows:
        (root / f"{split}.csv").write_text("\n".join(rows[split]) + "\n")
    (root / "stat.csv").write_text("\n".join(classes) + "\n")
    return root


def make_loader(dataset, batch_size, train, seed=0, num_workers=0, device="cpu"):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, generator=g, num_workers=num_workers,
        worker_init_fn=seed_worker, pin_memory=str(device).startswith("cuda"),
        drop_last=train and len(dataset) % batch_size == 1,   # BatchNorm cannot train on 1 sample
        persistent_workers=num_workers > 0)


# ==================================================================================================
# 3b. Data: image-text sets
# ==================================================================================================

@dataclass
class Pair:
    id: str
    label: int
    image: str           # image file
    text: str            # raw text ('' when the text comes pre-tokenised)
    tokens: str          # '<stem>_token.npy' of pre-tokenised text, '<stem>_pm.npy' beside it ('' for raw text)
    src: str             # "list_file:line" that named the pair, for error messages


IT_TAGS = {"food101": "food", "mvsa": "mvsa", "toy": "toy"}      # the MLA layout's file-name tag

IT_LAYOUT_HELP = """accepted layouts (<tag>: food for Food-101, mvsa for MVSA-Single):
  MMBT/QMF jsonl: train.jsonl, dev.jsonl (the validation split), test.jsonl; one JSON object a line,
                  {"id": ..., "label": ..., "text": ..., "img": <image path relative to the data root>}
  MLA lists:      my_train_<tag>.txt, my_test_<tag>.txt (optional my_dev_<tag>.txt) with '<file>.jpg <label>',
                  optional stat_<tag>.txt (class names), images in visual/{split}_imgs/<file>.jpg, text
                  pre-tokenised as text_token/{split}_token/<stem>_token.npy + <stem>_pm.npy, or raw as
                  text/{split}/<stem>.txt
  Class names come from stat_<tag>.txt or classes.txt when present (sorted, as the official code does),
  else from the sorted labels of the training split."""

JSONL_EXAMPLE = '{"id": "apple_pie_0", "label": "apple_pie", "text": "...", "img": "images/train/apple_pie_0.jpg"}'
IT_IMAGE_DIRS = ["visual/{split}_imgs", "{split}_imgs", "visual/{split}", "images/{split}", "images", "visual", "."]
IT_TOKEN_DIRS = ["text_token/{split}_token", "{split}_token", "text_token/{split}", "text_token"]
IT_TEXT_DIRS = ["text/{split}", "text/{split}_text", "{split}_text", "text"]


def jsonl_rows(path):
    """[(id, label, text, img, 'file:line')] of an MMBT/QMF jsonl file."""
    rows = []
    for ln, s in _nonempty(read_text_lines(path), path, JSONL_EXAMPLE):
        src = where(path, ln)
        try:
            obj = json.loads(s)
        except ValueError as e:
            raise DataError(f"{src}: not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}); "
                            f"expected one object a line like {JSONL_EXAMPLE}") from None
        if not isinstance(obj, dict) or not {"img", "label", "text"} <= set(obj):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{src}: got {got}; expected an object with keys id, label, text, img")
        label, text, img = obj["label"], obj["text"], obj["img"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{src}: label {label!r}; expected one class name")
        if not isinstance(text, str) or not isinstance(img, str) or not img:
            raise DataError(f"{src}: 'text' and 'img' must be strings (img a path relative to the data root)")
        rows.append((str(obj.get("id", Path(img).stem)), str(label).strip(), text, img, src))
    return rows


def mla_it_rows(path):
    """[(file, label, 'file:line')] of an MLA image-text list ('<file>.jpg <label>')."""
    rows = []
    for ln, s in _nonempty(read_text_lines(path), path, "apple_pie_0.jpg apple_pie"):
        parts = s.split(None, 1)
        if len(parts) != 2 or not parts[0].lower().endswith(IMAGE_EXTS):
            raise DataError(f"{where(path, ln)}: '{s}'; expected '<file>.jpg <label>'")
        rows.append((parts[0], parts[1].strip(), where(path, ln)))
    return rows


def it_classes(root, tag, train_labels, train_path):
    """Class names and where they came from: stat_<tag>.txt / classes.txt (sorted), else the train labels."""
    for name in (f"stat_{tag}.txt", "classes.txt"):
        if (root / name).is_file():
            return sorted(_class_file(root / name)), str(root / name)
    return sorted(set(train_labels)), f"the labels of {train_path}"


def _best_dir(root, templates, split, names, has):
    """The candidate folder that holds the most of the first listed names (None if none holds any)."""
    best, best_hits = None, 0
    for t in templates:
        d = root / t.format(split=split)
        if d.is_dir():
            hits = sum(1 for n in names[:25] if has(d, n))
            if hits > best_hits:
                best, best_hits = d, hits
    return best


def read_text_file(path, src):
    try:
        return " ".join(s for _, s in read_text_lines(path))
    except DataError as e:
        raise DataError(f"{e} (listed at {src})") from None


def detect_it_layout(dataset, root, layout="auto"):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (pass --data_root)\n{IT_LAYOUT_HELP}")
    marks = {"jsonl": "train.jsonl", "mla": f"my_train_{IT_TAGS.get(dataset, dataset)}.txt"}
    found = [name for name, f in marks.items() if (root / f).is_file()]
    if layout != "auto":
        if layout not in found:
            raise DataError(f"{root / marks[layout]}: file not found (--layout {layout})\n{IT_LAYOUT_HELP}")
        return layout
    if not found:
        raise DataError(f"{root}: no known {dataset} layout found (neither {' nor '.join(marks.values())})\n"
                        f"{IT_LAYOUT_HELP}")
    return found[0]                 # jsonl first: it holds the raw text


def _pair_jsonl(root, row, y):
    pid, _, text, img, src = row
    path = root / img
    if not path.is_file():
        raise DataError(f"{src}: image '{img}' not found: expected {path}")
    return Pair(pid, y, str(path), text, "", src)


def _mla_dirs(root, split, rows):
    """(image folder, token folder or None, raw-text folder or None) of one MLA split."""
    files = [r[0] for r in rows]
    stems = [os.path.splitext(f)[0] for f in files]
    idir = _best_dir(root, IT_IMAGE_DIRS, split, files, lambda d, f: (d / f).is_file())
    if idir is None:
        tried = ", ".join(str(root / t.format(split=split)) for t in IT_IMAGE_DIRS)
        raise DataError(f"{rows[0][2]}: image '{files[0]}' not found; looked in {tried}\n{IT_LAYOUT_HELP}")
    tdir = _best_dir(root, IT_TOKEN_DIRS, split, stems, lambda d, s: (d / f"{s}_token.npy").is_file())
    xdir = None if tdir else _best_dir(root, IT_TEXT_DIRS, split, stems, lambda d, s: (d / f"{s}.txt").is_file())
    if tdir is None and xdir is None:
        raise DataError(f"{rows[0][2]}: text of '{files[0]}' not found: expected "
                        f"{root / f'text_token/{split}_token/{stems[0]}_token.npy'} (and _pm.npy) or "
                        f"{root / f'text/{split}/{stems[0]}.txt'}\n{IT_LAYOUT_HELP}")
    return idir, tdir, xdir


def _pair_mla(dirs, row, y):
    (f, _, src), (idir, tdir, xdir) = row, dirs
    stem = os.path.splitext(f)[0]
    if not (idir / f).is_file():
        raise DataError(f"{src}: image '{f}' not found: expected {idir / f}")
    if tdir is None:
        txt = xdir / f"{stem}.txt"
        if not txt.is_file():
            raise DataError(f"{src}: text of '{f}' not found: expected {txt}")
        return Pair(stem, y, str(idir / f), read_text_file(txt, src), "", src)
    for part in ("token", "pm"):
        if not (tdir / f"{stem}_{part}.npy").is_file():
            raise DataError(f"{src}: text of '{f}' not found: expected {tdir / f'{stem}_{part}.npy'}")
    return Pair(stem, y, str(idir / f), "", str(tdir / f"{stem}_token.npy"), src)


def load_it_splits(dataset, root, layout="auto", skip_bad=False):
    """Detect the layout and return dict(layout, classes, train, dev (None without a dev split), test:
    lists of Pair, skipped: count). skip_bad drops (and counts) pairs whose image or text file is missing."""
    root = Path(root)
    tag = IT_TAGS.get(dataset, dataset)
    layout = detect_it_layout(dataset, root, layout)
    lists = {}
    for split in ("train", "dev", "test"):
        path = root / (f"{split}.jsonl" if layout == "jsonl" else f"my_{split}_{tag}.txt")
        if split == "dev" and not path.is_file():
            continue
        lists[split] = (path, jsonl_rows(path) if layout == "jsonl" else mla_it_rows(path))
    classes, class_src = it_classes(root, tag, [r[1] for r in lists["train"][1]], lists["train"][0])
    out = {"layout": layout, "classes": classes, "dev": None, "skipped": 0}
    for split, (path, rows) in lists.items():
        dirs = _mla_dirs(root, split, rows) if layout == "mla" else None
        pairs = []
        for row in rows:
            y = _label_index(row[1], classes, row[-1], class_src)
            try:
                pairs.append(_pair_jsonl(root, row, y) if layout == "jsonl" else _pair_mla(dirs, row, y))
            except DataError:
                if not skip_bad:
                    raise
                out["skipped"] += 1
        if not pairs:
            raise DataError(f"{path}: no usable pairs in the {split} split")
        out[split] = pairs
    return out


def load_tokenizer(name_or_path):
    """A transformers tokenizer: a folder holding only a BERT vocab.txt (read as BERT uncased), a saved
    tokenizer folder, or a hub name (needs internet or the local HF cache)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")      # data-loader workers fork after use
    from transformers import AutoTokenizer, BertTokenizer
    p = Path(name_or_path)
    try:
        if p.is_dir() and (p / "vocab.txt").is_file() and not any(
                (p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return BertTokenizer.from_pretrained(str(p), do_lower_case=True)
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise DataError(f"{name_or_path}: cannot load a tokenizer ({type(e).__name__}: {str(e)[:200]}); pass "
                        "--tokenizer with a local folder holding a BERT uncased vocab.txt or a saved transformers "
                        "tokenizer (a hub name needs internet or the Hugging Face cache)") from None


def fit_length(ids, pad, length, pad_id=0):
    """Cut or pad token ids and padding mask (1 = padding) to `length`."""
    ids, pad = ids[:length], pad[:length]
    n = length - len(ids)
    if n > 0:
        ids = np.concatenate([ids, np.full(n, pad_id, ids.dtype)])
        pad = np.concatenate([pad, np.ones(n, pad.dtype)])
    return ids, pad


class ITDataset(torch.utils.data.Dataset):
    """Returns (image [3, S, S], text [2, max_len], label, index); text row 0 holds the token ids, row 1
    the padding mask (1 on padding = 1 - attention mask, as in the MLA token files). Raw text is
    tokenised with `tokenizer` (special tokens only if `special_tokens`: M3AE adds its own CLS);
    pre-tokenised files are used as they are, cut or padded to max_len."""

    def __init__(self, pairs, train, image_size=256, max_len=256, tokenizer=None, special_tokens=False,
                 vocab_size=None):
        self.pairs, self.train, self.max_len = list(pairs), train, max_len
        self.tokenizer, self.special_tokens, self.vocab_size = tokenizer, special_tokens, vocab_size
        self.transform = frame_transform(image_size, train)
        if tokenizer is None and any(not p.tokens for p in self.pairs):
            raise ValueError("raw text needs a tokenizer")

    def __len__(self):
        return len(self.pairs)

    def load_tokens(self, pair):
        arrays = []
        for path in (pair.tokens, pair.tokens[:-len("_token.npy")] + "_pm.npy"):
            try:
                a = np.squeeze(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable .npy (pair at {pair.src}): {e}") from None
            if a.ndim != 1:
                raise DataError(f"{path}: array of shape {a.shape} (pair at {pair.src}); expected (1, length) "
                                "or (length,)")
            arrays.append(a)
        ids, pad = arrays
        if len(ids) != len(pad):
            raise DataError(f"{pair.tokens}: {len(ids)} tokens but {len(pad)} padding-mask entries "
                            f"(pair at {pair.src}); expected the same length")
        return ids.astype(np.int64), (pad > 0.5).astype(np.int64)

    def text(self, pair):
        if pair.tokens:
            ids, pad = self.load_tokens(pair)
            pad_id = 0
        else:
            enc = self.tokenizer(pair.text, add_special_tokens=self.special_tokens, truncation=True,
                                 max_length=self.max_len)
            ids = np.asarray(enc["input_ids"], np.int64)
            pad = np.zeros(len(ids), np.int64)
            pad_id = self.tokenizer.pad_token_id or 0
        ids, pad = fit_length(ids, pad, self.max_len, pad_id)
        if self.vocab_size and len(ids) and (ids.max() >= self.vocab_size or ids.min() < 0):
            raise DataError(f"{pair.tokens or pair.src}: token id {ids.max()} outside the vocabulary of "
                            f"{self.vocab_size} (pair at {pair.src}); expected BERT uncased ids (--vocab_size)")
        return torch.from_numpy(np.stack([ids, pad]))

    def __getitem__(self, i):
        pair = self.pairs[i]
        return self.transform(load_image(pair.image, pair.src)), self.text(pair), pair.label, i


TOY_IT_CLASSES = ["apple_pie", "baklava", "caesar_salad", "greek_salad", "miso_soup", "ramen"]


def make_toy_it(root, seed=0, n_train=600, n_dev=120, n_test=240, px=32, cue=0.8, class_blobs=4,
                clutter_blobs=4, fillers=3):
    """Write a small Food-101-like image-text set in the MMBT jsonl layout (train/dev/test.jsonl,
    images/<split>/<id>.jpg) and its tokenizer (tokenizer/vocab.txt, a BERT vocabulary of the
    caption words), generated deterministically from `seed`.

    Six classes in three pairs. The caption names the pair with one word (learned in a few steps)
    and, for the class inside the pair, has only a cue word that agrees with the label with
    probability `cue`, among random filler words; the image names the class by the colour of
    `class_blobs` small blobs among `clutter_blobs` random ones: slower to learn, but it holds what
    the text lacks. Joint training leans on the text and leaves the image under-trained, as on Food-101.
    """
    from PIL import Image, ImageDraw
    root = Path(root)
    rng = np.random.RandomState(seed)
    pair_words = ["dessert", "salad", "soup"]
    cue_words = [["sweet", "warm"], ["fresh", "cold"], ["spicy", "hot"]]      # [cue of class 2k, of 2k+1]
    openers = ["a photo of", "my", "look at this", "homemade", "tonight", "the best"]
    filler = ["with", "and", "plate", "bowl", "table", "good", "nice", "lunch", "dinner", "friends", "today",
              "recipe", "yummy", "kitchen", "fork", "served", "lovely", "classic", "simple", "tasty"]
    palette = [(220, 40, 40), (40, 200, 40), (40, 80, 230), (230, 210, 40), (200, 40, 220), (40, 210, 210)]
    words = sorted({w for p in openers for w in p.split()} | set(pair_words) | set(filler)
                   | {w for c in cue_words for w in c})
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)
                                                  + "\n")
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            y = i % 6
            pid = f"{split}{i:04d}"
            keep = rng.rand() < cue
            cue_word = cue_words[y // 2][y % 2 if keep else 1 - y % 2]
            caption = [openers[rng.randint(len(openers))], pair_words[y // 2], cue_word]
            caption += [filler[j] for j in rng.randint(0, len(filler), fillers)]
            order = [0] + (1 + rng.permutation(len(caption) - 1)).tolist()        # opener first, rest shuffled
            text = " ".join(caption[j] for j in order)
            im = Image.new("RGB", (px, px), tuple(int(v) for v in rng.randint(60, 190, 3)))
            dr = ImageDraw.Draw(im)
            blobs = [tuple(int(v) for v in rng.randint(0, 256, 3)) for _ in range(clutter_blobs)]
            blobs += [tuple(int(np.clip(c + rng.randint(-25, 26), 0, 255)) for c in palette[y])] * class_blobs
            for colour in [blobs[j] for j in rng.permutation(len(blobs))]:
                x0, y0, r = rng.randint(0, px), rng.randint(0, px), rng.randint(2, 5)
                dr.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
            im.save(root / "images" / split / f"{pid}.jpg", quality=90)
            lines.append(json.dumps({"id": pid, "label": TOY_IT_CLASSES[y], "text": text,
                                     "img": f"images/{split}/{pid}.jpg"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ==================================================================================================
# 4. Encoders
# ==================================================================================================

def init_weights(module):
    """SPEC init: Kaiming-normal (fan_out) convs, Xavier-normal linear layers, zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resnet18_trunk(in_channels):
    """torchvision ResNet-18 without its classifier: (N, C, H, W) -> (N, 512), pooled over space."""
    import torchvision
    net = torchvision.models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class AudioResNet(nn.Module):
    """Fbank (B, 1, T, F) -> (B, 512)."""
    dim = 512

    def __init__(self):
        super().__init__()
        self.net = resnet18_trunk(1)

    def forward(self, x):
        return self.net(x)


class VideoResNet(nn.Module):
    """Frames (B, T, 3, H, W) folded into the batch -> (B, 512), averaged over time and space."""
    dim = 512

    def __init__(self):
        super().__init__()
        self.net = resnet18_trunk(3)

    def forward(self, x):
        b, t = x.shape[:2]
        return self.net(x.flatten(0, 1)).view(b, t, -1).mean(1)


# ==================================================================================================
# 4b. Encoders: transformers (image, text)
# ==================================================================================================
# M3AE-shaped encoder in plain PyTorch. Parameter names follow the official conversion of the M3AE JAX
# weights to PyTorch (cls_token, image_embedding, text_embedding, encoder_{image,text}_type_embedding,
# encoder.blocks.<i>.{layer_norm1, attention.qkv_linear, attention.fc, layer_norm2, transformer_mlp.fc1,
# transformer_mlp.fc2}, encoder.layer_norm), so such a state dict loads as it is. As in the JAX model:
# LayerNorm eps 1e-6, tanh-approximated GELU, patches flattened as (row, column, channel).

def sincos_1d(dim, positions):
    """Fixed position embedding (len, dim): [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], 1).float()


def sincos_2d(dim, grid):
    """(grid * grid, dim) for patches in row-major order; the first half of the width encodes the
    patch's column, the second half its row (the MAE/M3AE convention)."""
    idx = torch.arange(grid)
    return torch.cat([sincos_1d(dim // 2, idx.repeat(grid)), sincos_1d(dim // 2, idx.repeat_interleave(grid))], 1)


def patchify(images, patch):
    """(B, 3, H, W) -> (B, H/p * W/p, p * p * 3), patches in row-major order, each flattened (row, col, channel)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image of {h} x {w} pixels is not a whole number of {patch} x {patch} patches")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class M3AEAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv_linear = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, keep=None):
        b, n, d = x.shape
        q, k, v = self.qkv_linear(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]        # padding keys are never attended to
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.fc(x.transpose(1, 2).reshape(b, n, d))


class M3AEMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class M3AEBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = M3AEAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.transformer_mlp = M3AEMLP(dim, mlp_ratio * dim)

    def forward(self, x, keep=None):
        x = x + self.attention(self.layer_norm1(x), keep)
        return x + self.transformer_mlp(self.layer_norm2(x))


class M3AETransformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(M3AEBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, keep=None):
        for block in self.blocks:
            x = block(x, keep)
        return self.layer_norm(x)


class M3AEEncoder(nn.Module):
    """One modality of an M3AE-base-shaped encoder (SPEC 4): CLS token + the modality's tokens (linear
    embedding of 16 x 16 patches, or BERT-vocabulary word embeddings) + fixed sin-cos positions (2-D or
    1-D) + the modality's type embedding, a pre-norm transformer, then the mean over the tokens (padding
    left out) -> (B, dim). Image input: (B, 3, H, W); text input: (B, 2, L) = token ids and padding mask."""

    def __init__(self, modality, dim=768, depth=12, heads=12, mlp_ratio=4, patch_size=16, vocab_size=30522):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"M3AE modality {modality!r}; expected image or text")
        if dim % heads or dim % 4:
            raise ValueError(f"M3AE width {dim} must be a multiple of 4 and of the head count {heads}")
        self.modality, self.dim, self.patch_size = modality, dim, patch_size
        if modality == "image":
            self.image_embedding = nn.Linear(patch_size * patch_size * 3, dim)
            self.encoder_image_type_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.text_embedding = nn.Embedding(vocab_size, dim)
            self.encoder_text_type_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = M3AETransformer(dim, depth, heads, mlp_ratio)
        self.reset_parameters()

    def reset_parameters(self):
        """M3AE's initialisation: Xavier-uniform linear layers, N(0, 1) word embeddings, N(0, 0.02) CLS
        and type embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 1.0)
        for name, p in self.named_parameters(recurse=False):
            nn.init.normal_(p, 0.0, 0.02)

    def forward(self, x):
        if self.modality == "image":
            patches = patchify(x, self.patch_size)
            grid = int(round(patches.shape[1] ** 0.5))
            if grid * grid != patches.shape[1]:
                raise ValueError(f"M3AE needs square images; got {tuple(x.shape[-2:])}")
            pos = sincos_2d(self.dim, grid).to(x.device, x.dtype)
            tokens = self.image_embedding(patches) + pos + self.encoder_image_type_embedding
            keep = None
        else:
            ids, pad = x[:, 0], x[:, 1]
            pos = sincos_1d(self.dim, torch.arange(ids.shape[1])).to(x.device)
            tokens = self.text_embedding(ids) + pos + self.encoder_text_type_embedding
            keep = F.pad(pad == 0, (1, 0), value=True)                  # the CLS token is always kept
        h = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1)
        h = self.encoder(h, keep)
        if keep is None:
            return h.mean(1)
        w = keep.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1)


def _short(keys, n=20):
    keys = list(keys)
    return (", ".join(keys[:n]) + (f" ... ({len(keys) - n} more)" if len(keys) > n else "")) or "none"


def load_m3ae_checkpoint(encoder, path):
    """Load a converted M3AE PyTorch state dict (optionally under 'state_dict' or 'model', keys possibly
    prefixed 'module.') into one M3AEEncoder. The other modality's input layers are not used by this
    encoder and are left out. Prints and returns (missing, unexpected) keys; a tensor whose shape does
    not fit (width, depth, patch, vocabulary) is an error."""
    import pickle
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: M3AE checkpoint not found; expected a converted PyTorch state dict") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a loadable PyTorch state dict ({str(e)[:200]})") from None
    while isinstance(sd, dict) and not all(torch.is_tensor(v) for v in sd.values()) and any(
            isinstance(sd.get(k), dict) for k in ("state_dict", "model")):      # a training checkpoint
        sd = next(sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict))
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"{path}: expected a state dict (parameter name -> tensor)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    other = ("text_embedding.", "encoder_text_type_embedding") if encoder.modality == "image" else \
        ("image_embedding.", "encoder_image_type_embedding")
    sd = {k: v for k, v in sd.items() if not k.startswith(other)}
    own = encoder.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise DataError(f"{path}: {len(bad)} tensors do not fit the {encoder.modality} encoder (checkpoint vs "
                        f"model: {_short(bad, 4)}); set --m3ae_dim/--m3ae_depth/--m3ae_heads/--patch_size/"
                        "--vocab_size to the checkpoint's")
    missing, unexpected = encoder.load_state_dict(sd, strict=False)
    print(f"M3AE {encoder.modality} encoder <- {path}: {len(sd) - len(unexpected)} tensors loaded; "
          f"missing keys: {_short(missing)}; unexpected keys: {_short(unexpected)}")
    return list(missing), list(unexpected)


class HFEncoder(nn.Module):
    """A transformers image or text model (AutoModel from a local folder or hub name) pooled to one
    vector: the mean of the last hidden states over the tokens (padding left out) or over space for
    convolutional models, or the model's pooler output (pool='pooler'); then a linear projection to
    `dim` when that differs from the model's width. Image input: (B, 3, H, W) normalised pixels; text
    input: (B, 2, L) = token ids and padding mask."""

    def __init__(self, name_or_path, modality, pool="mean", image_size=None):
        super().__init__()
        from transformers import AutoModel
        try:
            self.model = AutoModel.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as e:
            raise DataError(f"{name_or_path}: cannot load a transformers model ({type(e).__name__}: "
                            f"{str(e)[:200]}); pass a local folder saved with save_pretrained (a hub name "
                            "needs internet or the Hugging Face cache)") from None
        cfg = self.model.config
        width = getattr(cfg, "hidden_size", None) or (getattr(cfg, "hidden_sizes", None) or [None])[-1]
        if not width:
            raise DataError(f"{name_or_path}: cannot tell the model's output width from its config")
        expected = getattr(cfg, "image_size", None)
        if modality == "image" and image_size and isinstance(expected, int) and expected != image_size:
            raise DataError(f"{name_or_path}: the model takes {expected} x {expected} images; pass --image_size "
                            f"{expected}")
        self.modality, self.pool, self.width, self.dim = modality, pool, width, width
        self.proj = nn.Identity()

    def project_to(self, dim):
        """Add a linear projection width -> dim (nothing when they are equal)."""
        self.dim = dim
        self.proj = nn.Identity() if dim == self.width else nn.Linear(self.width, dim)

    def forward(self, x):
        if self.modality == "image":
            out, keep = self.model(pixel_values=x), None
        else:
            keep = x[:, 1] == 0
            out = self.model(input_ids=x[:, 0], attention_mask=keep.long())
        if self.pool == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("this model has no pooler output; use --hf_pool mean")
            return self.proj(out.pooler_output.flatten(1))
        h = out.last_hidden_state
        if h.dim() == 4:                            # convolutional: (B, C, H, W)
            return self.proj(h.mean((2, 3)))
        if keep is None:
            return self.proj(h.mean(1))
        w = keep.unsqueeze(-1).to(h.dtype)
        return self.proj((h * w).sum(1) / w.sum(1).clamp_min(1))


def build_it_encoders(args, modalities=("image", "text"), vocab_size=30522):
    """The image and/or text encoders of args.encoder (m3ae | hf), one per modality, all of one width."""
    if args.encoder == "m3ae":
        encoders = [M3AEEncoder(m, args.m3ae_dim, args.m3ae_depth, args.m3ae_heads, args.m3ae_mlp_ratio,
                                args.patch_size, vocab_size) for m in modalities]
        if args.m3ae_ckpt:
            for e in encoders:
                load_m3ae_checkpoint(e, args.m3ae_ckpt)
        else:
            print("WARNING: no --m3ae_ckpt: the M3AE encoders start from RANDOM weights (the paper fine-tunes "
                  "pretrained M3AE-base; see README for the weights)", file=sys.stderr)
        return encoders
    names = {"image": args.image_model, "text": args.text_model}
    absent = [f"--{m}_model" for m in modalities if not names[m]]
    if absent:
        raise DataError(f"--encoder hf needs {' and '.join(absent)} (a local folder or a hub name)")
    encoders = [HFEncoder(names[m], m, args.hf_pool, args.image_size) for m in modalities]
    dim = args.proj_dim or max(e.width for e in encoders)
    for e in encoders:
        e.project_to(dim)
    return encoders


# ==================================================================================================
# 5. Methods
# ==================================================================================================
# Unimodal accuracy (SPEC 3): methods with a head per modality (sum, late_fusion, qmf, mla) report that
# head's prediction; methods that fuse features before one head (concat, film, bigated, ogm, ogm_ge)
# report the fused head's prediction with every other modality's features set to zero.

class Method(nn.Module):
    def __init__(self, encoders, num_classes, modalities):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.dim = encoders[0].dim

    def encode(self, xs):
        return [f(x) for f, x in zip(self.encoders, xs)]

    # fused-feature methods define fuse(zs); per-head methods override logits()
    def fuse(self, zs):
        raise NotImplementedError

    def logits(self, zs):
        """(fused logits, [unimodal logits per modality])."""
        fused = self.fuse(zs)
        unis = [self.fuse([z if j == m else torch.zeros_like(z) for j, z in enumerate(zs)])
                for m in range(len(zs))]
        return fused, unis

    def loss(self, fused, unis, y, idx):
        return F.cross_entropy(fused, y)

    def train_step(self, xs, y, idx, optimizer, progress):
        fused, unis = self.logits(self.encode(xs))
        loss = self.loss(fused, unis, y, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, xs):
        return self.logits(self.encode(xs))


class Sum(Method):
    """One linear head per modality; fused logits are their sum, trained by CE on the sum."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(encoders, num_classes, modalities)
        self.heads = nn.ModuleList(nn.Linear(self.dim, num_classes) for _ in encoders)

    def unimodal(self, zs):
        return [h(z) for h, z in zip(self.heads, zs)]

    def logits(self, zs):
        unis = self.unimodal(zs)
        return torch.stack(unis).sum(0), unis


class Concat(Method):
    """One linear head on the concatenated features."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(encoders, num_classes, modalities)
        self.head = nn.Linear(self.dim * len(encoders), num_classes)

    def fuse(self, zs):
        return self.head(torch.cat(zs, 1))


class LateFusion(Sum):
    """Independent unimodal models, each trained on its own CE; prediction = mean of their logits."""

    def logits(self, zs):
        unis = self.unimodal(zs)
        return torch.stack(unis).mean(0), unis

    def loss(self, fused, unis, y, idx):
        return sum(F.cross_entropy(u, y) for u in unis)


class FiLM(Method):
    """The condition modality gives (gamma, beta) = Linear(z_c); every other modality becomes
    gamma * z_m + beta; the modulated features (concatenated) go through a linear head."""

    def __init__(self, encoders, num_classes, modalities, condition=0):
        super().__init__(encoders, num_classes, modalities)
        self.condition = condition
        self.film = nn.Linear(self.dim, 2 * self.dim)
        self.head = nn.Linear(self.dim * (len(encoders) - 1), num_classes)

    def fuse(self, zs):
        gamma, beta = self.film(zs[self.condition]).chunk(2, dim=1)
        return self.head(torch.cat([gamma * z + beta for m, z in enumerate(zs) if m != self.condition], 1))


class BiGated(Method):
    """u_m = Linear_m(z_m); the gate modality gives g = sigmoid(u_gate); the other hidden states are
    multiplied by g, concatenated and classified by a linear head."""

    def __init__(self, encoders, num_classes, modalities, condition=0):
        super().__init__(encoders, num_classes, modalities)
        self.condition = condition
        self.hidden = nn.ModuleList(nn.Linear(self.dim, self.dim) for _ in encoders)
        self.head = nn.Linear(self.dim * (len(encoders) - 1), num_classes)

    def fuse(self, zs):
        u = [h(z) for h, z in zip(self.hidden, zs)]
        g = torch.sigmoid(u[self.condition])
        return self.head(torch.cat([g * v for m, v in enumerate(u) if m != self.condition], 1))


def ogm_coefficients(scores, alpha):
    """OGM-GE modulation coefficients. rho_m = s_m / (sum of the other modalities' scores); the
    modality with rho_m > 1 (the dominant one) gets 1 - tanh(alpha * rho_m), the others 1.
    With two modalities this is rho_a = s_a / s_v as in the OGM-GE paper."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    rho = s / (s.sum() - s).clamp_min(1e-12)
    coeff = torch.ones_like(s)
    dom = rho > 1
    coeff[dom] = 1 - torch.tanh(alpha * rho[dom])
    return coeff.tolist()


class OGM(Concat):
    """Concat fusion with on-the-fly gradient modulation (OGM); with ge=True, OGM-GE adds Gaussian
    noise N(0, std(grad)) to every encoder gradient. Active for epochs starts..ends inclusive."""

    def __init__(self, encoders, num_classes, modalities, alpha=0.3, starts=0, ends=50, ge=False):
        super().__init__(encoders, num_classes, modalities)
        self.alpha, self.starts, self.ends, self.ge = alpha, starts, ends, ge
        self.last_coeffs = None

    def train_step(self, xs, y, idx, optimizer, progress):
        zs = self.encode(xs)
        fused = self.fuse(zs)
        loss = F.cross_entropy(fused, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.starts <= progress["epoch"] <= self.ends:
            with torch.no_grad():
                _, unis = self.logits([z.detach() for z in zs])
                scores = [u.softmax(1).gather(1, y[:, None]).sum().item() for u in unis]
            self.modulate(ogm_coefficients(scores, self.alpha))
        optimizer.step()
        return loss.item()

    @torch.no_grad()
    def modulate(self, coeffs):
        self.last_coeffs = coeffs
        for enc, c in zip(self.encoders, coeffs):
            for p in enc.parameters():
                if p.grad is None:
                    continue
                std = p.grad.std().item() if p.grad.numel() > 1 else 0.0    # of the original gradient
                p.grad.mul_(c)
                if self.ge and std > 0:
                    p.grad.add_(torch.randn_like(p.grad) * std)


class QMF(Sum):
    """Quality-aware multimodal fusion on late-fusion heads. Confidence c_m = logsumexp(logits_m)/T,
    detached in the fusion; loss = CE(fused) + sum CE(logits_m) + lambda * sum rank_m, where rank_m
    asks a sample whose cumulative training loss (its history) is higher to have lower confidence."""

    def __init__(self, encoders, num_classes, modalities, num_train, temperature=10.0, lam=0.1):
        super().__init__(encoders, num_classes, modalities)
        self.temperature, self.lam = temperature, lam
        self.register_buffer("history", torch.zeros(len(encoders), num_train, dtype=torch.float64))

    def confidence(self, logits):
        return torch.logsumexp(logits, dim=1) / self.temperature

    def logits(self, zs):
        unis = self.unimodal(zs)
        fused = sum(self.confidence(u).detach()[:, None] * u for u in unis)
        return fused, unis

    def rank_loss(self, conf, idx, m):
        """Pairs (i, i+1 mod B); target = sign(h_i - h_j), margin = |normalised h_i - h_j|:
        max(0, target * (c_i - c_j) + margin) = 0 once the harder sample is less confident by margin."""
        h = self.history[m]
        lo, hi = h.min(), h.max()
        hn = ((h[idx] - lo) / (hi - lo) if hi > lo else torch.zeros_like(h[idx])).to(conf.dtype)
        target = torch.sign(hn - hn.roll(-1))
        margin = (hn - hn.roll(-1)).abs()
        return F.relu(target * (conf - conf.roll(-1)) + margin).mean()

    def loss(self, fused, unis, y, idx):
        loss = F.cross_entropy(fused, y)
        for m, u in enumerate(unis):
            per_sample = F.cross_entropy(u, y, reduction="none")
            loss = loss + per_sample.mean() + self.lam * self.rank_loss(self.confidence(u), idx, m)
            if self.training:
                self.history[m].index_add_(0, idx, per_sample.detach().to(self.history.dtype))
        return loss


def fusion_weights(unis, mode="dynamic", fixed=None):
    """MLA test-time fusion weights. dynamic: per sample, lambda_m = softmax_m(-entropy_m) (B, M);
    dynamic_batch: the official code's variant, entropy of a softmax over the batch axis, one weight
    per modality per batch (M,); fixed: the given weights (M,)."""
    if mode == "dynamic":
        ent = torch.stack([-(u.softmax(1) * u.log_softmax(1)).sum(1) for u in unis], 1)
        return torch.softmax(-ent, dim=1)
    if mode == "dynamic_batch":
        ent = torch.stack([-(u.softmax(0) * u.log_softmax(0)).sum() for u in unis])
        return torch.softmax(-ent, dim=0)
    if mode == "fixed":
        w = torch.as_tensor(fixed, dtype=unis[0].dtype, device=unis[0].device)
        if w.numel() != len(unis):
            raise ValueError(f"--fusion_weights has {w.numel()} values; expected {len(unis)}")
        return w
    raise ValueError(f"unknown fusion mode {mode!r}; expected dynamic, dynamic_batch or fixed")


class MLA(Method):
    """Multimodal Learning with Alternating unimodal adaptation (SPEC 2).

    One shared linear head. Each batch, for every modality m in turn: encoder m alone runs forward,
    CE on head(z_m), backward (other encoders get no gradient at all), the head's weight gradient is
    projected with P (HGM), one optimizer step. P (d x d, starts at the identity) remembers the
    head-input directions of all earlier steps. At test time the unimodal logits are fused with
    entropy-based weights (fusion='dynamic'), the official batch-axis variant, or fixed weights.
    """

    def __init__(self, encoders, num_classes, modalities, hgm=True, hgm_alpha=None, fusion="dynamic",
                 fusion_weights=None):
        super().__init__(encoders, num_classes, modalities)
        self.head = nn.Linear(self.dim, num_classes)
        self.hgm, self.hgm_alpha = hgm, hgm_alpha
        if fusion_weights is None:      # SPEC defaults: 0.5/0.5; audio/image/text 0.35/0.25/0.4
            fusion_weights = {2: [0.5, 0.5], 3: [0.35, 0.25, 0.4]}.get(len(encoders), [1 / len(encoders)] * len(encoders))
        self.fusion, self.fixed_weights = fusion, list(fusion_weights)
        self.register_buffer("P", torch.eye(self.dim))

    @torch.no_grad()
    def project_head_grad(self, hbar, alpha):
        """grad_W <- grad_W P (protect earlier steps' directions), then absorb hbar into P:
        k = P hbar, P <- P - k k^T / (alpha + hbar^T k)."""
        g = self.head.weight.grad
        g.copy_(g @ self.P)
        k = self.P @ hbar
        self.P.sub_(torch.outer(k, k) / (alpha + hbar @ k))

    def train_step(self, xs, y, idx, optimizer, progress):
        alpha = self.hgm_alpha
        if alpha is None:       # the official schedule: 0.1 ** (1 + i / n) for batch i of n
            alpha = 0.1 ** (1 + progress["step"] / max(1, progress["steps"]))
        total = 0.0
        for f, x in zip(self.encoders, xs):
            z = f(x)
            loss = F.cross_entropy(self.head(z), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.hgm:
                self.project_head_grad(z.detach().mean(0).to(self.P.dtype), alpha)
            optimizer.step()
            total += loss.item()
        return total / len(xs)

    def logits(self, zs):
        unis = [self.head(z) for z in zs]
        w = fusion_weights(unis, self.fusion, self.fixed_weights)
        w = w if w.dim() == 2 else w.expand(unis[0].shape[0], -1)
        fused = sum(w[:, m:m + 1] * u for m, u in enumerate(unis))
        return fused, unis


METHODS = ["sum", "concat", "late_fusion", "film", "bigated", "ogm", "ogm_ge", "qmf", "mla"]


def build_method(name, encoders, num_classes, modalities, args, num_train):
    """The method object for `name`, configured from the script's args (see train_av.py)."""
    cond = modalities.index(args.condition) if getattr(args, "condition", None) else 0
    if name == "sum":
        return Sum(encoders, num_classes, modalities)
    if name == "concat":
        return Concat(encoders, num_classes, modalities)
    if name == "late_fusion":
        return LateFusion(encoders, num_classes, modalities)
    if name == "film":
        return FiLM(encoders, num_classes, modalities, condition=cond)
    if name == "bigated":
        return BiGated(encoders, num_classes, modalities, condition=cond)
    if name in ("ogm", "ogm_ge"):
        return OGM(encoders, num_classes, modalities, alpha=args.alpha, starts=args.modulation_starts,
                   ends=args.modulation_ends, ge=name == "ogm_ge")
    if name == "qmf":
        return QMF(encoders, num_classes, modalities, num_train=num_train)
    if name == "mla":
        return MLA(encoders, num_classes, modalities, hgm=not args.no_hgm, hgm_alpha=args.hgm_alpha,
                   fusion=args.fusion, fusion_weights=args.fusion_weights)
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


# ==================================================================================================
# 6. Evaluation, training loop, sweeps and the run record
# ==================================================================================================

def to_device(batch, device):
    *xs, y, idx = batch
    nb = str(device).startswith("cuda")
    return [x.to(device, non_blocking=nb) for x in xs], y.to(device, non_blocking=nb), idx.to(device)


@torch.no_grad()
def evaluate(method, loader, device):
    """Accuracy in percent of every modality alone and of the fused prediction."""
    method.eval()
    correct = torch.zeros(len(method.modalities) + 1, dtype=torch.long)
    n = 0
    for batch in loader:
        xs, y, _ = to_device(batch, device)
        fused, unis = method.predict(xs)
        for m, u in enumerate(unis):
            correct[m] += (u.argmax(1) == y).sum().item()
        correct[-1] += (fused.argmax(1) == y).sum().item()
        n += len(y)
    acc = (100.0 * correct.double() / max(n, 1)).tolist()
    return {name: round(a, 4) for name, a in zip(method.modalities + ["multi"], acc)}


def train_one_epoch(method, loader, optimizer, epoch, device, desc=""):
    from tqdm import tqdm
    method.train()
    total, steps = 0.0, len(loader)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
    for step, batch in enumerate(bar):
        xs, y, idx = to_device(batch, device)
        loss = method.train_step(xs, y, idx, optimizer, {"epoch": epoch, "step": step, "steps": steps})
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at epoch {epoch}, step {step}")
        total += loss
        bar.set_postfix(loss=f"{loss:.3f}")
    return total / max(steps, 1)


RECORD_KEYS = ("script", "dataset", "method", "seed", "args", "modalities", "epochs", "select_on",
               "best_epoch", "test", "wall_time_s", "version")


def run_dir(args, *extra):
    """<out_dir>/<dataset>/<method>/seed<k>[/extra...]: where a run writes record.json and best.pt."""
    return Path(args.out_dir, args.dataset, args.method, f"seed{args.seed}", *extra)


def parse_methods(spec, known):
    """'mla', 'concat,mla' or 'all' -> a list of method names (ValueError naming an unknown one)."""
    names = list(known) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise ValueError(f"unknown method {bad[0] if bad else spec!r}; expected one of {', '.join(known)}, "
                         "a comma list of them, or 'all'")
    return names


def sweep(args, run_one, known_methods, record_path=None):
    """Run every (seed, method) of args.method (name, comma list or 'all') x args.seeds (comma list;
    default args.seed), seed by seed, one after another in this process. In a sweep a run whose
    record.json exists is skipped, so a killed sweep continues where it stopped; a single run always
    runs. Returns the records, in sweep order."""
    import copy
    methods = parse_methods(args.method, known_methods)
    seeds = [int(s) for s in str(args.seeds).split(",")] if getattr(args, "seeds", None) else [args.seed]
    runs = [(s, m) for s in seeds for m in methods]
    record_path = record_path or (lambda a: run_dir(a) / "record.json")
    records = []
    for k, (seed, method) in enumerate(runs, 1):
        a = copy.copy(args)
        a.method, a.seed = method, seed
        path = record_path(a)
        if len(runs) > 1 and path.is_file():
            print(f"[{k}/{len(runs)}] {method} seed {seed}: skipped, {path} exists", flush=True)
            records.append(json.loads(path.read_text()))
            continue
        rec = run_one(a)
        if len(runs) > 1:
            print(f"[{k}/{len(runs)}] {method} seed {seed}: test {fmt_acc(rec['test'])} "
                  f"(epoch {rec['best_epoch'] + 1} by {rec['select_on']}, {rec['wall_time_s']:.0f}s)", flush=True)
        records.append(rec)
    return records


def fmt_acc(acc):
    return "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())


def fit(method, optimizer, scheduler, loaders, args, out, script, device):
    """Train for args.epochs, select an epoch (args.select_on: val | test | last), checkpoint it to
    out/best.pt, evaluate it on the test split and write out/record.json. Returns the record.
    wall_time_s counts from the call (training and evaluation, not data discovery)."""
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.select_on == "val" and loaders.get("val") is None:
        raise ValueError("--select_on val needs a validation split (--val_ratio > 0)")
    if args.select_on == "test":
        print("NOTE: selecting the epoch on the TEST set (--select_on test, the official protocol); "
              "the reported test accuracy is optimistic.")
    log, best_epoch, best_score = [], None, -1.0
    for epoch in range(args.epochs):
        t0 = time.time()
        loss = train_one_epoch(method, loaders["train"], optimizer, epoch, device,
                               desc=f"epoch {epoch + 1}/{args.epochs}")
        scheduler.step()
        entry = {"epoch": epoch, "train_loss": round(loss, 6),
                 "val": evaluate(method, loaders["val"], device) if loaders.get("val") else None}
        if args.select_on == "test":
            entry["test"] = evaluate(method, loaders["test"], device)
        log.append(entry)
        shown = entry.get("test") if args.select_on == "test" else entry["val"]
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  "
              f"{'test' if args.select_on == 'test' else 'val'}: {fmt_acc(shown) if shown else '-'}"
              f"  ({time.time() - t0:.1f}s)", flush=True)
        score = {"val": (entry["val"] or {}).get("multi", -1), "test": (entry.get("test") or {}).get("multi", -1),
                 "last": epoch}[args.select_on]
        if score > best_score:
            best_score, best_epoch = score, epoch
            atomic_torch_save({"method": args.method, "epoch": epoch, "args": vars(args),
                               "modalities": method.modalities, "state_dict": method.state_dict()},
                              out / "best.pt")
    state = torch.load(out / "best.pt", map_location=device, weights_only=False)
    method.load_state_dict(state["state_dict"])
    test = evaluate(method, loaders["test"], device)
    record = {"script": script, "dataset": args.dataset, "method": args.method, "seed": args.seed,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "modalities": method.modalities, "epochs": log, "select_on": args.select_on,
              "best_epoch": best_epoch, "test": test, "wall_time_s": round(time.time() - start, 2),
              "version": code_version()}
    assert tuple(record) == RECORD_KEYS
    atomic_json_dump(record, out / "record.json")
    return record


# ==================================================================================================
# 7. Report and curves:  python common.py report RUNS_DIR [--paper] [--format md|csv]
#                        python common.py plot RUNS_DIR --out curves.png
# ==================================================================================================

# The paper's Tables 5, 6 and 7 (mean±std of test accuracy over three seeds; std missing where the
# source is garbled). Line: table, data set, method, then column=mean±std (Table 6: missing rate %).
PAPER_RESULTS = """
5 cremad concat audio=55.65±0.82 video=18.68±0.76 multi=61.56±0.91
5 cremad late_fusion audio=52.17±1.12 video=55.48±0.71 multi=66.32±1.08
5 cremad film audio=53.89±0.75 video=18.67±1.21 multi=60.07±1.25
5 cremad bigated audio=51.49±1.28 video=17.34±1.11 multi=59.21±1.14
5 cremad ogm_ge audio=53.76±0.98 video=28.09±1.17 multi=68.14±0.79
5 cremad qmf audio=59.41±0.71 video=39.11±1.03 multi=63.71±1.12
5 cremad mla audio=59.27±1.23 video=64.91±1.1 multi=79.7±0.87
5 ks sum audio=48.77±0.95 video=24.53±1.12 multi=64.72±0.97
5 ks concat audio=49.18±0.76 video=24.67±1.07 multi=64.84±1.05
5 ks late_fusion audio=47.87±1.1 video=46.76±0.85 multi=65.53±0.89
5 ks film audio=48.67±0.83 video=23.15±0.98 multi=63.33±0.76
5 ks bigated audio=49.96±1.21 video=23.77±1.14 multi=63.72±1.13
5 ks ogm_ge audio=48.87±1.05 video=29.73±1.06 multi=65.74±1.08
5 ks qmf audio=51.57±1.03 video=32.19±0.92 multi=65.78±0.97
5 ks mla audio=54.67±0.92 video=51.03±1.09 multi=71.35±1.22
5 food101 sum image=4.57±0.88 text=85.63±1.14 multi=86.19±0.86
5 food101 concat image=3.51±1.22 text=86.02±1.05 multi=86.32±1.18
5 food101 late_fusion image=58.46±1.03 text=85.19±1.21 multi=90.21±1.02
5 food101 film image=4.68±0.97 text=85.84±0.92 multi=87.21±1.05
5 food101 bigated image=14.2±1.18 text=85.79±1.1 multi=88.87±0.88
5 food101 ogm_ge image=22.35±1.27 text=85.17±1.09 multi=87.54±1.03
5 food101 qmf image=45.74±1.09 text=84.13±1.27 multi=92.87±1.01
5 food101 mla image=69.6±0.89 text=86.47±0.86 multi=93.33±0.92
5 mvsa sum text=73.33±1.03 image=28.46±1.12 multi=76.19±1.01
5 mvsa concat text=75.22±0.92 image=27.32±1.09 multi=76.25±0.95
5 mvsa late_fusion text=72.15±1.07 image=45.24±0.97 multi=76.88±0.82
5 mvsa film text=74.85±0.98 image=27.12±1.18 multi=75.34±1.07
5 mvsa bigated text=73.13±1.08 image=28.15±0.88 multi=75.94±0.88
5 mvsa ogm_ge text=74.76±0.87 image=31.98±1.03 multi=76.37±0.98
5 mvsa qmf text=74.87±1.15 image=32.99±1.09 multi=77.96±1.06
5 mvsa mla text=75.72±0.79 image=54.99±1.12 multi=79.94±0.97
5 iemocap sum audio=39.79±1.08 image=29.44±0.97 text=65.16±0.88 multi=74.18±1.03
5 iemocap concat audio=41.93±0.89 image=30.0±0.88 text=67.84±0.97 multi=75.91±0.92
5 iemocap late_fusion audio=43.12 image=32.38±0.97 text=68.79±1.07 multi=74.96±0.97
5 iemocap film audio=41.64±1.06 image=29.85±1.06 text=66.37±0.95 multi=74.32±1.12
5 iemocap bigated audio=42.23±0.88 image=27.45±1.08 text=65.16±1.08 multi=73.34±1.05
5 iemocap ogm_ge audio=41.38±1.13 image=30.24±1.02 text=70.79±1.03 multi=76.17±1.01
5 iemocap qmf audio=42.98±0.95 image=31.22±1.07 text=75.03±0.79 multi=76.17±0.95
5 iemocap mla audio=46.29±1.02 image=37.63±0.78 text=73.22±1.09 multi=78.92±1.07
6 iemocap late_fusion 10=72.95±1.12 20=69.06±0.88 30=64.89±1.25 40=61.09±0.99 50=56.48±1.18 60=52.41±1.01 70=45.07±1.21
6 iemocap qmf 10=73.49±1.1 20=71.33±1.27 30=65.89±0.78 40=62.27±0.95 50=57.94±1.07 60=55.6±0.84 70=50.25±1.09
6 iemocap cca 10=65.19±0.95 20=62.6±1.19 30=59.35±0.88 40=55.25±1.23 50=51.38±1.05 60=45.73±1.27 70=30.61±1.1
6 iemocap dcca 10=57.25±1.28 20=51.74±1.01 30=42.53±1.29 40=36.54±1.18 50=34.82±0.79 60=33.65±1.07 70=41.09±1.24
6 iemocap dccae 10=61.66±1.13 20=57.67±1.22 30=54.95±1.06 40=51.08±1.01 50=45.71±0.87 60=39.07±0.98 70=41.42±1.28
6 iemocap ae 10=71.36±0.94 20=67.4±0.79 30=62.02±1.18 40=57.24±0.94 50=50.56±0.77 60=43.04±0.96 70=39.86±0.82
6 iemocap cra 10=71.28±1.19 20=67.34±1.04 30=62.24±1.03 40=57.04±0.92 50=49.86±1.15 60=43.22±0.99 70=38.56±1.22
6 iemocap mmin 10=71.84±0.97 20=69.36±1.05 30=66.34±1.11 40=63.3±1.1 50=60.54±1.17 60=57.52±1.13 70=55.44±1.06
6 iemocap if_mmin 10=71.32±0.78 20=68.29±0.98 30=64.17±1.01 40=60.13±1.19 50=57.45±1.12 60=53.26±1.22 70=52.04±0.91
6 iemocap cpm_net 10=55.29±0.83 20=53.65±0.96 30=52.52±1.29 40=51.01±0.94 50=49.09±1.04 60=47.38±1.25 70=44.76±0.88
6 iemocap tate 10=67.84±1.02 20=63.22±1.08 30=62.19±0.98 40=60.36±1.06 50=58.74±1.21 60=57.99±1.03 70=54.35±1.07
6 iemocap mla 10=75.07±1.04 20=72.33±1.16 30=68.47±1.22 40=67.0±0.98 50=63.48±0.87 60=59.17±0.92 70=55.89±1.03
7 food101 clip image=63.07±0.12 text=83.98±0.08 multi=93.07±0.08
7 food101 clip_mla image=72.22±0.1 text=85.34±0.06 multi=93.47±0.04
"""

# Rows in the paper's order; the data set the toy sets stand in for; Table 7's name for CLIP + MLA.
TABLE_METHODS = {5: METHODS,
                 6: ["late_fusion", "qmf", "cca", "dcca", "dccae", "ae", "cra", "mmin", "if_mmin", "cpm_net",
                     "tate", "mla"],
                 7: ["clip", "mla"]}
SCRIPT_TABLE = {"train_av.py": 5, "train_it.py": 5, "train_ait.py": 5, "train_missing.py": 6, "train_clip.py": 7}
TOY_STANDS_FOR = {"train_av.py": "cremad", "train_it.py": "food101", "train_ait.py": "iemocap",
                  "train_missing.py": "iemocap", "train_clip.py": "food101"}
PAPER_DATASET = {"features": "iemocap", "mmin": "iemocap"}
PAPER_METHOD = {7: {"mla": "clip_mla"}}


def paper_results():
    """{(table, dataset, method): {column: (mean, std or None)}} from PAPER_RESULTS."""
    out = {}
    for line in PAPER_RESULTS.strip().splitlines():
        table, dataset, method, *cells = line.split()
        out[int(table), dataset, method] = {
            k: (float(v.split("±")[0]), float(v.split("±")[1]) if "±" in v else None)
            for k, v in (c.split("=") for c in cells)}
    return out


def load_records(runs_dir):
    records = []
    for path in sorted(Path(runs_dir).rglob("record.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"warning: {path}: unreadable record ({e}); left out", file=sys.stderr)
            continue
        if not all(k in rec for k in RECORD_KEYS):
            print(f"warning: {path}: not a run record (keys missing); left out", file=sys.stderr)
            continue
        rec["_path"] = str(path)
        records.append(rec)
    return records


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def report_rows(records):
    """One row per (script, dataset, method, column): mean, std, seeds, paper value and difference."""
    groups = {}
    for r in records:
        groups.setdefault((r["script"], r["dataset"]), []).append(r)
    papers, rows = paper_results(), []
    for (script, dataset), recs in sorted(groups.items()):
        table = SCRIPT_TABLE.get(script, 5)
        if table == 6:
            col_of = lambda r: [(f"{round(100 * r['args']['missing_rate'])}", r["test"]["multi"])]
            columns = sorted({c for r in recs for c, _ in col_of(r)}, key=float)
        else:
            col_of = lambda r: list(r["test"].items())
            columns = list(recs[0]["modalities"]) + ["multi"]
        all_seeds = sorted({r["seed"] for r in recs})
        toy = dataset == "toy"
        paper_ds = TOY_STANDS_FOR.get(script, "cremad") if toy else PAPER_DATASET.get(dataset, dataset)
        order = TABLE_METHODS[table]
        methods = sorted({r["method"] for r in recs}, key=lambda m: (order.index(m) if m in order else 99, m))
        for method in methods:
            cells = {}
            for r in recs:
                if r["method"] == method:
                    for col, v in col_of(r):
                        cells.setdefault(col, []).append((r["seed"], v, r["select_on"]))
            paper = papers.get((table, paper_ds, PAPER_METHOD.get(table, {}).get(method, method)), {})
            for col in columns:
                got = cells.get(col, [])
                row = {"script": script, "dataset": dataset, "table": table, "method": method, "column": col,
                       "mean": None, "std": None, "n": len({s for s, _, _ in got}), "n_expected": len(all_seeds),
                       "on_test": any(sel == "test" for _, _, sel in got), "paper_dataset": paper_ds,
                       "paper_is_other_data": toy, "paper_mean": None, "paper_std": None, "diff": None}
                if got:
                    mean, std = _mean_std([v for _, v, _ in got])
                    row["mean"], row["std"] = round(mean, 4), None if std is None else round(std, 4)
                if col in paper:
                    row["paper_mean"], row["paper_std"] = paper[col]
                    if row["mean"] is not None:
                        row["diff"] = round(row["mean"] - row["paper_mean"], 4)
                rows.append(row)
    return rows


def _cell(mean, std, n=None, n_expected=None, on_test=False):
    if mean is None:
        return "—" if n is None else "missing"
    s = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    if n is not None:
        s += f" (n={n}" + (f" of {n_expected}" if n < n_expected else "") + ")"
    return s + (" †" if on_test else "")


def report(runs_dir, paper=False, fmt="md"):
    """The tables of every record under runs_dir, in the paper's shape (see the section banner)."""
    rows = report_rows(load_records(runs_dir))
    if not rows:
        return f"no records under {runs_dir}"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["script"], r["dataset"]), []).append(r)
    for (script, dataset), rr in groups.items():
        table, cols = rr[0]["table"], list(dict.fromkeys(r["column"] for r in rr))
        what = "fused test accuracy by missing rate (%)" if table == 6 else "test accuracy (%)"
        out.append(f"### {script} · {dataset} · Table {table} shape · {what}, mean ± std over seeds (n = seeds)")
        if paper:
            pds = rr[0]["paper_dataset"]
            out.append(f"paper: {pds}, Table {table}" + (
                f" — DIFFERENT DATA: the toy set only stands in for {pds}; this is not a reproduction"
                if rr[0]["paper_is_other_data"] else ""))
        head = ["method"] + [c for col in cols for c in ([col, "paper", "Δ"] if paper else [col])]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(r["method"] for r in rr):
            cells = [f"`{method}`"]
            for r in (x for x in rr if x["method"] == method):
                cells.append(_cell(r["mean"], r["std"], r["n"], r["n_expected"], r["on_test"]))
                if paper:
                    cells += [_cell(r["paper_mean"], r["paper_std"]),
                              "—" if r["diff"] is None else f"{r['diff']:+.2f}"]
            out.append("| " + " | ".join(cells) + " |")
        if any(r["on_test"] for r in rr):
            out.append("† epoch selected on the test set (--select_on test, the official protocol): optimistic")
        out.append("")
    return "\n".join(out)


def plot_curves(runs_dir, out):
    """Per method, validation accuracy of each modality and of the fused prediction over epochs
    (mean over seeds; the test curve for runs without a validation split). Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot needs matplotlib, an optional dependency: pip install matplotlib") from None
    records = [r for r in load_records(runs_dir) if r["epochs"]]
    if not records:
        raise SystemExit(f"no records with epochs under {runs_dir}")
    panels = {}
    for r in records:
        panels.setdefault((r["script"], r["dataset"], r["method"]), []).append(r)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    def paper_order(item):
        (script, dataset, method), _ = item
        order = TABLE_METHODS[SCRIPT_TABLE.get(script, 5)]
        return script, dataset, order.index(method) if method in order else 99, method

    for ax, ((script, dataset, method), recs) in zip(axes.flat, sorted(panels.items(), key=paper_order)):
        split = "val" if recs[0]["epochs"][0].get("val") else "test"
        for name in list(recs[0]["modalities"]) + ["multi"]:
            curves = [[e[split][name] for e in r["epochs"] if e.get(split)] for r in recs]
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=name, lw=2.2 if name == "multi" else 1.4)
        ax.set_title(f"{method} · {dataset} ({len(recs)} seed{'s' * (len(recs) > 1)})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cli(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python common.py", description="Tables and curves from run records.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="the tables of all records under RUNS_DIR, in the paper's shape")
    r.add_argument("runs_dir")
    r.add_argument("--paper", action="store_true", help="add the paper's value and our difference per cell")
    r.add_argument("--format", default="md", choices=["md", "csv"])
    q = sub.add_parser("plot", help="per-modality and fused accuracy over epochs, one panel per method")
    q.add_argument("runs_dir")
    q.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    if args.cmd == "report":
        print(report(args.runs_dir, args.paper, args.format))
    else:
        print(f"wrote {plot_curves(args.runs_dir, args.out)}")


if __name__ == "__main__":
    _cli()
