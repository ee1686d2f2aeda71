"""What the train_*.py scripts share: the methods, the encoders, the data, the training helpers.

Contents, in reading order (a part uses only what stands above it; each starts at its '# ======== '
line, whose title is repeated here):
  1. Methods.  1a. MLA: the alternating unimodal update and its test-time fusion (needs only torch)
      1b. The contract of every method; the collectives and batch helpers the methods call; small helpers
      1c. The Table 5 baselines (sum, concat, late_fusion, film, bigated, ogm, ogm_ge, qmf), the balancing ones
      1d. The Table 6 methods (cca, dcca, dccae, ae, cra, mmin, if_mmin, cpm_net, tate) and their MLP encoder
      1e. The registry: a method's name, class, paper, the scripts that run it, its flags
  2. Encoders.  2a. torchvision ResNet-18 for audio and video, the initialisation
      2b. Image and text: M3AE-shaped encoders, their checkpoints, transformers models and tokenizers
      2c. CAV-MAE's audio transformer and its checkpoint loader; the A-I-T audio encoder
      2d. CLIP towers (transformers' CLIPModel) and the toy CLIP
  3. Data.  3a. Files (full disk, atomic writes, checksums), WAV, fbank, frames, transforms, splits, toys
      3b. Audio-video: CREMA-D (three layouts), Kinetics-Sounds, AVE, VGGSound, videos (PyAV), toy, the cache
      3c. Image-text sets: Food-101 and MVSA-Single (jsonl and MLA layouts), the toy I-T set
      3d. IEMOCAP (audio fbank, face image, text) in the MLA list layout, the toy A-I-T set
      3e. Table 6 features (features.npz, the MMIN layout), the missing-view mask, the toy features
      3f. Table 7 CLIP features: batched extraction, the feature cache and data set; the toy CLIP's pretraining
  4. The loop: seeding, the loader, evaluation, one epoch, train/val/test, torch.compile
  5. Torchrun helpers the scripts call: the process group, the processes, the model, rank 0's values
  6. The run: checkpoints, other settings, Run, resume, the record, sweeps and their locks, the shared flags
  7. Report, plot, command line: python common.py report RUNS_DIR | plot RUNS_DIR | probe RUN_DIR | prepare | convert_m3ae

A batch is (xs, y, idx[, mask]): xs one tensor per modality, in the order of `modalities`; mask (B, M)
bool, True = view present, for the Table 6 data sets (their `masked = True`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import datetime
import errno
import importlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


HERE = Path(__file__).resolve().parent


# ======== 1. Methods.  1a. MLA: the alternating unimodal update and its test-time fusion (needs only torch) ========

def fusion_weights(unis, mode="dynamic", fixed=None, mask=None):
    """MLA's test-time fusion weights from unimodal logits (M of (B, C)). dynamic: per sample, softmax over m of
    -entropy(logits_m), (B, M); dynamic_batch (the official code's): the entropy of a softmax over the batch, (M,);
    fixed: the given weights, (M,). A mask (B, M) of present views: 0 for the missing, renormalised."""
    if mode == "dynamic":
        ent = torch.stack([-(u.softmax(1) * u.log_softmax(1)).sum(1) for u in unis], 1)
        ent = ent if mask is None else ent.masked_fill(~mask, float("inf"))          # weight exp(-inf) = 0
        return torch.softmax(-ent, dim=1)
    if mode == "dynamic_batch":
        rows = [slice(None)] * len(unis) if mask is None else mask.T      # the rows where each view is present
        ent = torch.stack([-(u[p].softmax(0) * u[p].log_softmax(0)).sum() for u, p in zip(unis, rows)])
        w = torch.softmax(-ent, dim=0)
    elif mode == "fixed":
        w = torch.as_tensor(fixed, dtype=torch.float32, device=unis[0].device)
        if w.numel() != len(unis):
            raise ValueError(f"--fusion_weights has {w.numel()} values; expected {len(unis)}")
    else:
        raise ValueError(f"unknown fusion mode {mode!r}; expected dynamic, dynamic_batch or fixed")
    return w if mask is None else (w * mask) / (w * mask).sum(1, keepdim=True)


class MLA(nn.Module):
    """Multimodal Learning with Alternating unimodal adaptation: per modality in turn its encoder forward, loss(head(z),
    y), backward, the head's gradient projected with P (HGM), a step; test: entropy-weighted fusion. Method's contract"""

    def __init__(self, encoders, num_classes, modalities=None, hgm=True, hgm_alpha=None, fusion="dynamic",
                 fusion_weights=None, hgm_alpha_scale=False, hgm_forget=1.0):
        super().__init__()
        self.encoders, self.dim = nn.ModuleList(encoders), encoders[0].dim
        if any(f.dim != self.dim for f in encoders):     # common.one_width's check; a copy, so that MLA stands alone
            raise ValueError(f"encoders of widths {[f.dim for f in encoders]}; the methods expect one width (`dim`) "
                             "for all: project the others to it, e.g. with common.Projected(encoder, dim)")
        self.modalities, self.num_classes = list(modalities or [f"m{i}" for i in range(len(encoders))]), num_classes
        self.head = nn.Linear(self.dim, num_classes)
        self.hgm, self.hgm_alpha, self.hgm_alpha_scale, self.hgm_forget = hgm, hgm_alpha, hgm_alpha_scale, hgm_forget
        self.alpha = 0.1 if hgm_alpha is None else hgm_alpha
        paper = {2: [0.5, 0.5], 3: [0.35, 0.25, 0.4]}.get(len(encoders), [1 / len(encoders)] * len(encoders))
        self.fusion, self.fixed_weights = fusion, list(paper if fusion_weights is None else fusion_weights)
        self.register_buffer("P", torch.eye(self.dim))
        self.register_buffer("hbar_sq", torch.zeros(len(encoders)) if hgm_alpha_scale else None)  # mean hbar^T hbar

    def schedule(self, epoch, step, steps):         # HGM's alpha: the official 0.1 ** (1 + step / steps), or hgm_alpha
        self.alpha = 0.1 ** (1 + step / max(1, steps)) if self.hgm_alpha is None else self.hgm_alpha

    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False): pass        # hooks MLA needs not
    def end_epoch(self, epoch, loaders, device, amp=False): pass
    def encoder_params(self): return [list(f.parameters()) for f in self.encoders]         # the loop's grad_norm

    def unimodal_features(self, xs, mask=None):     # the linear probe's: each encoder's output (its present rows)
        return [f(x if mask is None else x[mask[:, m]]) for m, (f, x) in enumerate(zip(self.encoders, xs))]

    def epoch_log(self):                # the share of the head-input space P leaves open, trace(P) / dim
        return {"hgm_p_trace": round(float(torch.trace(self.P)) / self.dim, 6) if self.hgm else None}

    def loss(self, logits, y):          # one modality's loss from its logits head(z): override to try another
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def project_head_grad(self, hbar, alpha, m=0):
        """grad_W <- grad_W P; k = P hbar, P <- (P - k k^T / (a + hbar^T k)) / hgm_forget, a = alpha (x mean hbar^2)"""
        with torch.autocast(self.P.device.type, enabled=False):    # P stays in full precision under AMP
            if (g := self.head.weight.grad) is not None:          # None: no rows here (torchrun)
                g.copy_(g.to(self.P.dtype) @ self.P)
            if self.hgm_alpha_scale:            # the running mean: the first value, then momentum 0.1
                self.hbar_sq[m] = (hbar @ hbar).lerp(self.hbar_sq[m], 0.9 * (self.hbar_sq[m] > 0))
                alpha = alpha * self.hbar_sq[m].clamp_min(1e-12)         # a zero hbar absorbs nothing
            k = self.P @ hbar
            self.P.sub_(torch.outer(k, k) / (alpha + hbar @ k)).div_(self.hgm_forget)

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        """A step per modality (a mask (B, M), True = present: on m's present rows); their mean loss, on the device"""
        total, steps = 0.0, 0
        for m, f in enumerate(self.encoders):
            rows, here = (slice(None), True) if mask is None else (mask[:, m], bool(mask[:, m].any()))
            z = f(xs[m][rows]) if here else self.P.new_zeros(0, self.dim)
            job = torch.cat([z.detach().to(self.P.dtype).sum(0), self.P.new_tensor([len(z), 1.0])])  # [sum h, rows,
            if torch.distributed.is_available() and torch.distributed.is_initialized():    # processes]; torchrun:
                torch.distributed.all_reduce(job)         # the job's; a process without rows steps gradient-less
            if mask is not None and job[-2] == 0: continue      # no row of this view in the job's batch
            optimizer.zero_grad(set_to_none=True)
            if here:                            # x rows x processes / job's rows: the processes' mean is the job's
                loss = self.loss(self.head(z), y[rows]) * (len(z) * job[-1] / job[-2])
                loss.backward()
            if self.hgm:
                self.project_head_grad(job[:-2] / job[-2], self.alpha, m)
            optimizer.step()
            total, steps = total + (loss.detach().double() if here else 0.0), steps + 1   # stays on the device
        return total / steps if steps else torch.zeros((), dtype=torch.float64, device=y.device)

    @torch.no_grad()
    def predict(self, xs, mask=None):       # (fused, [unimodal] logits); with a mask an encoder sees its present rows
        if mask is None:
            unis = [self.head(f(x)) for f, x in zip(self.encoders, xs)]
        else:
            unis = [x.new_zeros(len(x), self.num_classes) for x in xs]
            for f, x, u, present in zip(self.encoders, xs, unis, mask.T):
                if present.any():
                    u[present] = self.head(f(x[present]))
        w = fusion_weights(unis, self.fusion, self.fixed_weights, mask).expand(len(unis[0]), -1)     # (B, M)
        return sum(w[:, m:m + 1] * u for m, u in enumerate(unis)), unis


# ======== 1b. The contract of every method; the collectives and batch helpers the methods call; small helpers ========

class Method(nn.Module):
    """The contract every method meets (MLA meets it on its own, above). The loop calls, for every method:
      start_epoch(epoch, epochs, loaders, optimizer, device, amp)  before an epoch, every split's loader at hand
      schedule(epoch, step, steps)                                  before each of the epoch's steps
      train_step(xs, y, optimizer, mask=None, idx=None) -> loss   one step; the loss a detached 0-dim tensor left
                                                                    on the device (so a step never waits for the GPU)
      end_epoch(epoch, loaders, device, amp)                        after the epoch's steps, before its evaluation
      epoch_log() -> {name: value}                                  added to the epoch's entry of the record
      predict(xs, mask=None) -> (fused logits, [unimodal logits])  evaluation
      unimodal_features(xs, mask=None) -> [features]               the linear probe's input (linear_probe)
    xs: one tensor per modality, in the order of `modalities`; mask (B, M) bool, True = view present (the Table 6
    data; None elsewhere); idx: the batch's sample indices (QMF's and CPM-Net's per-sample state). The hooks
    here do nothing: a method overrides those it needs. epoch, step: from 0."""

    def __init__(self, num_classes, modalities):
        super().__init__()
        self.num_classes, self.modalities = num_classes, list(modalities)

    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False):
        """G-Blending's weights, PMR's prototypes, CCA's closed-form fit."""

    def schedule(self, epoch, step, steps):
        """OGM's and AGM's active epochs, PMR's terms, ReconBoost's phase."""

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        raise NotImplementedError

    def end_epoch(self, epoch, loaders, device, amp=False):
        """DCCA's projections and classifier fitted on the training split."""

    def epoch_log(self):
        """G-Blending's weights (MLA: its P's trace); the balancing methods' diagnostics (EpochMeans.read)."""
        return {}

    def predict(self, xs, mask=None):
        raise NotImplementedError

    def unimodal_features(self, xs, mask=None):
        """Each modality's representation from its view alone, what the linear probe reads: one (n, d_m) tensor per
        modality, with a mask of the rows where its view is present, in order. Here encoder m's output; a method
        whose unimodal representation is another (no encoder per view, an output layer) overrides it."""
        return [f(x) for f, x in zip(self.encoders, present_rows(xs, mask))]

    def encoder_params(self):
        """Each modality's encoder parameters, one list per modality (the loop's grad_norm diagnostic reads those that
        train); a method without an encoder per modality (one network over every view) returns []."""
        return [list(f.parameters()) for f in self.encoders]


def present_rows(xs, mask=None):
    """Each view's rows where it is present (mask (B, M), True = present); all of them without a mask."""
    return list(xs) if mask is None else [x[mask[:, m]] for m, x in enumerate(xs)]


def one_width(encoders):
    """The width `dim` of every encoder's output (batch -> (B, dim)); ValueError when they differ."""
    if len({f.dim for f in encoders}) > 1:
        raise ValueError(f"encoders of widths {[f.dim for f in encoders]}; the methods expect one width (`dim`) for "
                         "all: project the others to it, e.g. with common.Projected(encoder, dim)")
    return encoders[0].dim


def optimizer_step(optimizer, loss):
    """zero_grad, backward, step; returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# torchrun: one process per GPU (or CPU process), the global batch split evenly over them

def under_torchrun():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world():
    """(rank, processes) of a torchrun job; (0, 1) in a single process."""
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if under_torchrun() else (0, 1)


def all_sum(t):
    """t summed over the processes of a torchrun job, in place (t itself in a single process)."""
    if under_torchrun():
        torch.distributed.all_reduce(t)
    return t


def all_mean(tensors):
    """The tensors (a list) averaged over the processes of a torchrun job, in place, in one all-reduce."""
    if under_torchrun() and tensors:
        flat = all_sum(torch.cat([t.flatten().float() for t in tensors])) / world()[1]
        for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(v.view_as(t))
    return tensors


class EpochMeans:
    """Diagnostics of an epoch: per quantity and modality, the mean over the training steps of what each step adds
    (add: summed where the values are, on the device, nothing read back); read() gives {quantity: {modality: mean,
    None where no step added one (e.g. outside a method's active epochs)}} once per epoch and starts over. A plain
    attribute, not a buffer: checkpoints keep their keys; only train_step adds (evaluation adds nothing). Under
    torchrun the job's means: every process's sums over every process's counts."""

    def __init__(self, modalities, names):
        self.modalities, self.names, self.sums = list(modalities), list(names), {}

    def add(self, name, values, m=None):
        """A step's values of every modality (a tensor or floats, one each), or with m, modality m's alone."""
        v = torch.as_tensor(values, dtype=torch.float64).detach()
        if name not in self.sums:
            self.sums[name] = (torch.zeros(len(self.modalities), dtype=torch.float64, device=v.device),
                               [0] * len(self.modalities))
        total, counts = self.sums[name]
        if m is None:
            total += v
            counts[:] = [c + 1 for c in counts]
        else:
            total[m] += v
            counts[m] += 1

    def read(self):
        if not self.names:                      # a method that modulates nothing
            return {}
        M, zeros = len(self.modalities), torch.zeros(2 * len(self.modalities), dtype=torch.float64)
        sums = torch.stack([zeros if t is None else torch.cat([t.cpu(), torch.tensor(c, dtype=torch.float64)])
                            for t, c in (self.sums.get(name, (None, None)) for name in self.names)])   # (names, 2M)
        if under_torchrun():                    # the job's means: every process's sums over all their counts
            nccl = torch.distributed.get_backend() == "nccl"
            sums = all_sum(sums.cuda() if nccl else sums).cpu()
        self.sums = {}
        return {name: {mod: round(t / c, 6) if c else None for mod, t, c in zip(self.modalities, row[:M].tolist(),
                                                                              row[M:].tolist())}
                for name, row in zip(self.names, sums)}


def mean_grads(params):
    """Under torchrun: every gradient that exists in any process becomes its mean over the processes (a process
    without it adds zeros: e.g. no row of a modality in its share); one that exists nowhere stays None."""
    if not under_torchrun():
        return
    params = list(params)
    has = all_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                               device=params[0].device)).tolist()
    grads = []
    for p, h in zip(params, has):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    all_mean(grads)


def job_batch(t):
    """Under torchrun: the job's batch of a per-row tensor t (b, ...), its rows in the order one process would see
    them (the DistributedSampler deals the rows round-robin), this process's keeping their gradient."""
    if not under_torchrun():
        return t
    rank, n = world()
    parts = [torch.empty_like(t) for _ in range(n)]
    torch.distributed.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.stack(parts, 1).flatten(0, 1)


def job_grad(loss):
    """A loss of the job's batch (job_batch) whose value stays and whose gradient is times the processes: each holds
    its own rows' part of the gradient, and the optimizer's mean over the processes (mean_grads) sums them."""
    n = world()[1]
    return loss if n == 1 else loss + (n - 1) * (loss - loss.detach())


def split_rows(t, total):
    """Under torchrun: a split's rows from every process's evaluation shard (item i in process i % n), in order."""
    pad = -(-total // world()[1]) - len(t)                  # shards differ by at most a row
    return job_batch(torch.cat([t, t.new_zeros(pad, *t.shape[1:])]))[:total]


@contextlib.contextmanager
def rank0_first():
    """Under torchrun the body runs in the first process, then in the others (a cache built once, then read); they
    wait up to the job's timeout, 3 hours (for more, build the cache in one process first)."""
    rank, n = world()
    if rank > 0:
        torch.distributed.barrier()
    yield
    if rank == 0 and n > 1:
        torch.distributed.barrier()


def set_epoch(loader, epoch):
    """Under torchrun: the training loader's DistributedSampler draws epoch `epoch`'s order (a resumed run's too);
    a no-op otherwise (a GatherLoader has no sampler). Call it before anything reads the epoch's batches (a method's
    start_epoch, the epoch)."""
    if isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)


def autocast(device, amp):
    """bf16 autocast on `device` when amp (bf16 needs no loss scaling); a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)


def to_device(batch, device, masked=False):
    """A batch (*xs, y, idx) -> (xs, y, idx) on the device. With masked=True (the data set has
    `masked = True`) the batch is (*xs, mask, y, idx) -> (xs, y, idx, mask), mask (B, M) bool,
    True = view present."""
    nb = str(device).startswith("cuda")
    if masked:
        *xs, mask, y, idx = batch
    else:
        *xs, y, idx = batch
    out = [x.to(device, non_blocking=nb) for x in xs], y.to(device, non_blocking=nb), idx.to(device, non_blocking=nb)
    return (*out, mask.to(device, non_blocking=nb)) if masked else out


def device_batches(loader, device, train, masked=False):
    """Each batch of the loader on the device, after the data set's `device_transform` (if it has one),
    as (xs, y, idx, mask or None). On CUDA the copy and the transform of batch k+1 are queued on a side
    stream before batch k is handed out, so they run on the GPU while batch k trains."""
    tf = getattr(loader.dataset, "device_transform", None)

    def move(batch):
        xs, y, idx, *mask = to_device(batch, device, masked)
        if tf is not None:
            xs = tf(xs, train=train, index=batch[-1])      # the item indices, still on the CPU
        return xs, y, idx, (mask[0] if masked else None)

    device = torch.device(device)
    if device.type != "cuda":
        yield from map(move, loader)
        return
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)

    def stage(batch):
        with torch.cuda.stream(side):
            out = move(batch)
        return out, side.record_event()

    def ready(staged):
        out, done = staged
        main.wait_event(done)
        xs, y, idx, mask = out
        for t in [*xs, y, idx] + ([mask] if mask is not None else []):
            t.record_stream(main)       # made on the side stream, used on the main one
        return out

    staged = None
    for batch in loader:
        following = stage(batch)
        if staged is not None:
            yield ready(staged)
        staged = following
    if staged is not None:
        yield ready(staged)


def collect(loader, device):
    """The whole (masked) split of a loader as tensors: (xs, mask, y); under torchrun every process's share
    (each item once) gathered into the split's order, the same in every process."""
    if under_torchrun():
        rank, n = world()
        shard = range(rank, len(loader.dataset), n)
        loader = torch.utils.data.DataLoader(loader.dataset, loader.batch_size, sampler=shard)
    parts = [to_device(b, device, masked=True) for b in loader]
    xs = [torch.cat([p[0][m] for p in parts]) for m in range(len(parts[0][0]))]
    out = xs, torch.cat([p[3] for p in parts]), torch.cat([p[1] for p in parts])
    if not under_torchrun():
        return out
    rows = lambda t: split_rows(t, len(loader.dataset))
    return [rows(x) for x in out[0]], rows(out[1]), rows(out[2])


# ---- small helpers every part uses: the data error, one-time warnings, progress lines
class DataError(Exception):
    """Bad or missing input data. The message names the file (and line) and what was expected."""


WARNED = set()


def warn_once(text):
    """Print a warning to stderr the first time only in a command (list_runs starts one): a sweep builds its
    encoders again for every run."""
    if text not in WARNED:
        WARNED.add(text)
        print(text, file=sys.stderr)


PROGRESS_EVERY = 30.0       # seconds between plain progress lines when the output is not a terminal


class Progress:
    """A loop's steps: a tqdm bar on a terminal; elsewhere (a log file, a cluster job) a plain line on stdout
    '<desc>: step S/N[, loss L] (Ts)' every `every` seconds (PROGRESS_EVERY). torchrun: the first process only."""

    def __init__(self, total, desc, every=None):
        from tqdm import tqdm
        first, tty = world()[0] == 0, sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (first and tty))
        self.plain, self.total, self.desc, self.step, self.loss = first and not tty, total, desc, 0, None
        self.every = PROGRESS_EVERY if every is None else every
        self.start = self.shown = time.time()

    def set_loss(self, loss):
        self.loss = loss
        self.bar.set_postfix(loss=f"{loss:.3f}")

    def update(self):
        self.step += 1
        self.bar.update()
        if self.plain and time.time() - self.shown >= self.every:
            self.shown = time.time()
            loss = "" if self.loss is None else f", loss {self.loss:.4f}"
            print(f"{self.desc}: step {self.step}/{self.total}{loss} ({self.shown - self.start:.0f}s)", flush=True)

    def close(self):
        self.bar.close()


def with_progress(items, total, desc):
    """Iterate `items` (`total` of them) showing a Progress."""
    bar = Progress(total, desc)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


# ======== 1c. The Table 5 baselines (sum, concat, late_fusion, film, bigated, ogm, ogm_ge, qmf), the balancing ones ========

# Unimodal accuracy: methods with a head per modality (sum, late_fusion, qmf, mla) report that head's
# prediction; methods that fuse features before one head (concat, film, bigated, ogm, ogm_ge) report the
# fused head's prediction with every other modality's features set to zero.

class Fusion(Method):
    """Base of the Table 5 baselines and the balancing methods: encoders of one width (`dim`); a subclass defines
    fuse(zs) (one head on fused features) or logits(zs) (a head per modality). What a balancing method modulates goes
    into self.diagnostics (an EpochMeans of the quantities it names), read by epoch_log."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(num_classes, modalities)
        self.encoders, self.dim = nn.ModuleList(encoders), one_width(encoders)
        self.diagnostics = EpochMeans(modalities, [])        # none here; OGM, QMF, AGM, MMPareto, PMR name theirs

    def epoch_log(self):
        return self.diagnostics.read()

    def encode(self, xs):
        return [f(x) for f, x in zip(self.encoders, xs)]

    def present_logits(self, xs, mask, heads):
        """Per modality, head(encoder(x)) on the rows where the view is present and zeros on the others:
        an encoder never sees a missing view."""
        out = []
        for f, h, x, present in zip(self.encoders, heads, xs, mask.T):
            u = x.new_zeros(len(x), self.num_classes)
            if present.any():
                u[present] = h(f(x[present]))
            out.append(u)
        return out

    def fuse(self, zs):
        raise NotImplementedError

    def logits(self, zs):
        """(fused logits, [unimodal logits per modality])."""
        fused = self.fuse(zs)
        unis = [self.fuse([z if j == m else torch.zeros_like(z) for j, z in enumerate(zs)])
                for m in range(len(zs))]
        return fused, unis

    def loss(self, fused, unis, y, mask=None, idx=None):
        return F.cross_entropy(fused, y)

    def no_mask(self, mask):
        if mask is not None:
            raise ValueError(f"{type(self).__name__} trains on complete views: it has no way to handle a mask of "
                             "missing ones (override train_step and predict for that, as LateFusion does)")

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        self.no_mask(mask)
        fused, unis = self.logits(self.encode(xs))
        return optimizer_step(optimizer, self.loss(fused, unis, y))

    @torch.no_grad()
    def predict(self, xs, mask=None):
        self.no_mask(mask)
        return self.logits(self.encode(xs))


class Sum(Fusion):
    """One linear head per modality; fused logits are their sum, trained by CE on the sum."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(encoders, num_classes, modalities)
        self.heads = nn.ModuleList(nn.Linear(self.dim, num_classes) for _ in encoders)

    def unimodal(self, zs):
        return [h(z) for h, z in zip(self.heads, zs)]

    def logits(self, zs):
        unis = self.unimodal(zs)
        return torch.stack(unis).sum(0), unis


class Concat(Fusion):
    """One linear head on the concatenated features."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(encoders, num_classes, modalities)
        self.head = nn.Linear(self.dim * len(encoders), num_classes)

    def fuse(self, zs):
        return self.head(torch.cat(zs, 1))


class LateFusion(Sum):
    """Independent unimodal models, each trained on its own CE; prediction = mean of their logits. With a
    mask of missing views, each head trains on the rows where its view is present, and the fused logits
    are the mean over each row's present views."""

    def logits(self, zs):
        unis = self.unimodal(zs)
        return torch.stack(unis).mean(0), unis

    def loss(self, fused, unis, y, mask=None, idx=None):
        rows = [slice(None)] * len(unis) if mask is None else mask.T
        return sum(F.cross_entropy(u[p], y[p]) for u, p in zip(unis, rows) if mask is None or p.any())

    def fuse_unimodal(self, unis, mask):
        w = mask.to(unis[0].dtype)
        return sum(w[:, m:m + 1] * u for m, u in enumerate(unis)) / w.sum(1, keepdim=True)

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        if mask is None:
            fused, unis = self.logits(self.encode(xs))
        else:
            unis = self.present_logits(xs, mask, self.heads)
            fused = self.fuse_unimodal(unis, mask)
        if under_torchrun():            # torchrun: the job's loss, from every process's rows (job_grad)
            fused, unis, y = job_batch(fused), [job_batch(u) for u in unis], job_batch(y)
            mask, idx = (None if mask is None else job_batch(mask)), (None if idx is None else job_batch(idx))
        return optimizer_step(optimizer, job_grad(self.loss(fused, unis, y, mask, idx)))

    @torch.no_grad()
    def predict(self, xs, mask=None):
        if mask is None:
            return super().predict(xs)
        unis = self.present_logits(xs, mask, self.heads)
        return self.fuse_unimodal(unis, mask), unis


class FiLM(Fusion):
    """The condition modality gives (gamma, beta) = Linear(z_c); every other modality becomes
    gamma * z_m + beta; the modulated features (concatenated) go through a linear head. condition: a modality's
    name (default the first)."""

    def __init__(self, encoders, num_classes, modalities, condition=None):
        super().__init__(encoders, num_classes, modalities)
        self.condition = self.modalities.index(condition) if condition else 0
        self.film = nn.Linear(self.dim, 2 * self.dim)
        self.head = nn.Linear(self.dim * (len(encoders) - 1), num_classes)

    def fuse(self, zs):
        gamma, beta = self.film(zs[self.condition]).chunk(2, dim=1)
        return self.head(torch.cat([gamma * z + beta for m, z in enumerate(zs) if m != self.condition], 1))


class BiGated(Fusion):
    """u_m = Linear_m(z_m); the gate modality gives g = sigmoid(u_gate); the other hidden states are
    multiplied by g, concatenated and classified by a linear head. condition: the gate's name (default the first)."""

    def __init__(self, encoders, num_classes, modalities, condition=None):
        super().__init__(encoders, num_classes, modalities)
        self.condition = self.modalities.index(condition) if condition else 0
        self.hidden = nn.ModuleList(nn.Linear(self.dim, self.dim) for _ in encoders)
        self.head = nn.Linear(self.dim * (len(encoders) - 1), num_classes)

    def fuse(self, zs):
        u = [h(z) for h, z in zip(self.hidden, zs)]
        g = torch.sigmoid(u[self.condition])
        return self.head(torch.cat([g * v for m, v in enumerate(u) if m != self.condition], 1))


def ogm_ratio(scores):
    """OGM's score ratio rho_m = s_m / (sum of the other modalities' scores), float64 on the CPU."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return s / (s.sum() - s).clamp_min(1e-12)


def ogm_coefficients(scores, alpha):
    """OGM-GE modulation coefficients. rho_m = ogm_ratio(scores); the
    modality with rho_m > 1 (the dominant one) gets 1 - tanh(alpha * rho_m), the others 1.
    With two modalities this is rho_a = s_a / s_v as in the OGM-GE paper."""
    rho = ogm_ratio(scores)
    coeff = torch.ones_like(rho)
    dom = rho > 1
    coeff[dom] = 1 - torch.tanh(alpha * rho[dom])
    return coeff.tolist()


class OGM(Concat):
    """Concat fusion with on-the-fly gradient modulation (OGM); with ge=True, OGM-GE adds Gaussian
    noise N(0, std(grad)) to every encoder gradient. Active for epochs starts..ends inclusive
    (schedule() tells it the epoch). Diagnostics: the mean coefficient and score ratio of its modulated steps."""

    def __init__(self, encoders, num_classes, modalities, alpha=0.3, starts=0, ends=50, ge=False):
        super().__init__(encoders, num_classes, modalities)
        self.alpha, self.starts, self.ends, self.ge = alpha, starts, ends, ge
        self.active = starts <= 0 <= ends
        self.last_coeffs = None
        self.diagnostics = EpochMeans(modalities, ["ogm_coeff", "ogm_ratio"])

    def schedule(self, epoch, step, steps):
        self.active = self.starts <= epoch <= self.ends

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        zs = self.encode(xs)
        fused = self.fuse(zs)
        loss = F.cross_entropy(fused, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.active:
            with torch.no_grad():
                _, unis = self.logits([z.detach() for z in zs])
                scores = all_sum(torch.stack([u.softmax(1).gather(1, y[:, None]).sum() for u in unis])).tolist()
            mean_grads(self.parameters())       # torchrun: the job's gradients (the GE noise's std is theirs)
            self.modulate(ogm_coefficients(scores, self.alpha))
            self.diagnostics.add("ogm_coeff", self.last_coeffs)        # host floats already: no read-back
            self.diagnostics.add("ogm_ratio", ogm_ratio(scores))
        optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def modulate(self, coeffs):
        self.last_coeffs = coeffs
        for enc, c in zip(self.encoders, coeffs):
            for p in enc.parameters():
                if p.grad is None:
                    continue
                # std of the original gradient, kept on the device (no read-back per parameter)
                std = p.grad.std() if self.ge and p.grad.numel() > 1 else None
                p.grad.mul_(c)
                if std is not None:
                    p.grad.add_(torch.randn_like(p.grad) * std)         # std 0 adds zeros


class QMF(LateFusion):
    """Quality-aware multimodal fusion on late-fusion heads. Confidence c_m = logsumexp(logits_m)/T,
    detached in the fusion; loss = CE(fused) + sum CE(logits_m) + lambda * sum rank_m, where rank_m
    asks a sample whose cumulative training loss (its history, by sample index) is higher to have lower
    confidence. Diagnostics: each modality's mean confidence over the training batches."""

    def __init__(self, encoders, num_classes, modalities, num_train, temperature=10.0, lam=0.1, rank="paper"):
        super().__init__(encoders, num_classes, modalities)
        self.temperature, self.lam, self.margin_sign = temperature, lam, {"paper": 1.0, "code": -1.0}[rank]
        self.register_buffer("history", torch.zeros(len(encoders), num_train, dtype=torch.float64))
        self.diagnostics = EpochMeans(modalities, ["qmf_conf"])

    def confidence(self, logits):
        return torch.logsumexp(logits, dim=1) / self.temperature

    def logits(self, zs):
        unis = self.unimodal(zs)
        return self.fuse_unimodal(unis), unis

    def fuse_unimodal(self, unis, mask=None):
        """sum_m c_m * logits_m over the present views (all views without a mask)."""
        w = [self.confidence(u).detach()[:, None] for u in unis]
        if mask is not None:
            w = [c * mask[:, m:m + 1] for m, c in enumerate(w)]
        return sum(c * u for c, u in zip(w, unis))

    def rank_loss(self, conf, idx, m):
        """Pairs (i, i+1 mod B); target = sign(h_i - h_j), margin = |normalised h_i - h_j|:
        max(0, target * (c_i - c_j) + margin) = 0 once the harder sample is less confident by margin (the
        confidence-ranking loss); rank="code": - margin, the authors' code (zero until the harder
        sample is more confident by more than the margin)."""
        h = self.history[m]
        lo, hi = h.min(), h.max()
        hn = torch.where(hi > lo, (h[idx] - lo) / (hi - lo), 0.0).to(conf.dtype)     # no read-back
        target = torch.sign(hn - hn.roll(-1))
        margin = (hn - hn.roll(-1)).abs()
        return F.relu(target * (conf - conf.roll(-1)) + self.margin_sign * margin).mean()

    def loss(self, fused, unis, y, mask=None, idx=None):
        """With a mask, modality m's CE, ranking loss and history use only the rows where it is present."""
        loss = F.cross_entropy(fused, y)
        for m, u in enumerate(unis):
            rows = slice(None) if mask is None else mask[:, m]
            if mask is not None and not rows.any():
                continue
            u, ym, im = u[rows], y[rows], idx[rows]
            per_sample, conf = F.cross_entropy(u, ym, reduction="none"), self.confidence(u)
            loss = loss + per_sample.mean() + self.lam * self.rank_loss(conf, im, m)
            if self.training:
                self.history[m].index_add_(0, im, per_sample.detach().to(self.history.dtype))
                self.diagnostics.add("qmf_conf", conf.detach().mean(), m)
        return loss


def agm_coefficients(scores, running, alpha, cap=10.0):
    """AGM's coefficients from the batch's mono-modal scores s_m (CE of each modality's Shapley response) and
    their running means: r_m = exp(M/(M-1) (mean s - s_m)), eta_m the same on the running means, c_m =
    exp(alpha min(eta_m - r_m, cap)): a modality ahead of its usual share (r > eta) is slowed."""
    k = len(scores) / (len(scores) - 1)
    ratio = lambda v: torch.exp(k * (v.mean() - v))
    return torch.exp(alpha * (ratio(running) - ratio(scores)).clamp(max=cap))


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward gradient times `scale` (AGM's backward hook on each response)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0], None


class AGM(Concat):
    """AGM (Li et al., ICCV 2023; lihong2303/AGM_ICCV2023): the concat model's output for every non-empty
    subset of modalities (the others' inputs zeroed, in eval mode as the authors' code) gives each
    modality's Shapley response phi_m (v(empty) = 0, so sum_m phi_m = the full output); loss =
    CE(sum_m phi_m), with the gradient into phi_m scaled by agm_coefficients (running means of the scores
    over the run; the gap capped at 10 with two modalities, 7 with more, as the authors' CREMA-D and
    three-modality URFunny scripts), then clipped to norm 1 when a head gradient exceeds 1 (5 and 5 with three
    or more modalities). The coefficients change in the first `epochs` epochs; after, as the authors' hooks,
    the last ones stay applied (and the clip); unimodal predictions are the phi_m. Diagnostics: the mean coefficient
    applied and the mean score s_m of the steps that computed one."""

    def __init__(self, encoders, num_classes, modalities, alpha=1.0, epochs=20, cap=None):
        super().__init__(encoders, num_classes, modalities)
        self.alpha, self.epochs, self.active = alpha, epochs, epochs > 0
        self.cap = cap if cap is not None else 10.0 if len(encoders) == 2 else 7.0
        self.register_buffer("running", torch.zeros(len(encoders), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("coeffs", torch.ones(len(encoders), dtype=torch.float64))    # the last ones, held
        self.diagnostics = EpochMeans(modalities, ["agm_coeff", "agm_score"])

    def schedule(self, epoch, step, steps):
        self.active = epoch < self.epochs

    def responses(self, xs):
        """[phi_m], each (B, C): sum over S not holding m of |S|!(M-|S|-1)!/M! (v(S + m) - v(S))."""
        M, v, was = len(xs), {0: 0.0}, self.training
        for S in [2 ** M - 1, *range(1, 2 ** M - 1)]:   # the full pass first (it updates BatchNorm's statistics),
            self.train(was and S == 2 ** M - 1)       # then the zeroed ones in eval mode, with gradients (as theirs)
            v[S] = self.fuse(self.encode([x if S >> m & 1 else torch.zeros_like(x) for m, x in enumerate(xs)]))
        self.train(was)
        w = lambda n: math.factorial(n) * math.factorial(M - n - 1) / math.factorial(M)
        return [sum(w(bin(S).count("1")) * (v[S | 1 << m] - v[S]) for S in range(2 ** M) if not S >> m & 1)
                for m in range(M)]

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        phis = self.responses(xs)
        if self.active:                              # new coefficients; after the window the last ones are held
            with torch.no_grad():
                s = torch.stack([-p.softmax(1).gather(1, y[:, None]).clamp_min(1e-8).log().mean() for p in phis])
                s = all_sum(s.double()) / world()[1]              # torchrun: the job's scores
                self.coeffs.copy_(agm_coefficients(s, self.running, self.alpha, self.cap))
                self.steps += 1
                self.running.mul_((self.steps - 1) / self.steps).add_(s / self.steps)
            self.diagnostics.add("agm_score", s)
        self.diagnostics.add("agm_coeff", self.coeffs)
        loss = F.cross_entropy(sum(ScaleGrad.apply(p, self.coeffs[m].to(p.dtype)) for m, p in enumerate(phis)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mean_grads(self.parameters())                # torchrun: the job's gradients, then the clip
        grads, limit = [p.grad for p in self.parameters() if p.grad is not None], 1.0 if len(xs) == 2 else 5.0
        big = self.head.weight.grad.abs().max() > limit                # the authors' conditional clip, no sync:
        norm = torch.where(big, nn.utils.get_total_norm(grads), 0.0)  # a norm of 0 leaves the gradients as they are
        nn.utils.clip_grads_with_norm_(self.parameters(), limit, norm)
        optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, xs, mask=None):
        phis = self.responses(xs)
        return sum(phis), phis


class MMCosine(Sum):
    """MMCosine (Xu et al., ICASSP 2023; GeWu-Lab/MMCosine_ICASSP23): a modality's logits are the cosines of its
    L2-normalised features with each class's L2-normalised weight (no bias) times `scale` (the authors'
    --scaling 10); the fused logits are their sum, trained by CE."""

    def __init__(self, encoders, num_classes, modalities, scale=10.0):
        super().__init__(encoders, num_classes, modalities)
        self.heads = nn.ModuleList(nn.Linear(self.dim, num_classes, bias=False) for _ in encoders)
        self.scale = scale

    def unimodal(self, zs):
        return [self.scale * F.normalize(z, dim=1) @ F.normalize(h.weight, dim=1).T for h, z in zip(self.heads, zs)]


def pareto_weight(g, u):
    """MMPareto's weight c of the multimodal gradient g (1 - c goes to the unimodal u; flat tensors): 1/2 when
    they agree (cosine > 0), else the min-norm point of the two (MinNormSolver._min_norm_element_from2).
    Returns (c, the cosine)."""
    v11, v12, v22 = g @ g, g @ u, u @ u
    c = ((v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(1e-20)).clamp(0, 1)
    c = torch.where(v12 >= v11, 0.999, torch.where(v12 >= v22, 0.001, c))
    cos = F.cosine_similarity(g, u, dim=0)
    return torch.where(cos > 0, 0.5, c), cos


def flat_cat(tensors):
    """The tensors flattened into one."""
    return torch.cat([t.flatten() for t in tensors])


def pareto_grads(gs, us, gamma=1.5, c=None):
    """One encoder's gradients from its per-tensor multimodal (gs) and unimodal (us) ones, as MMPareto's code:
    c from the whole encoder (pareto_weight, unless given), then per tensor n = 2c g + 2(1 - c) u, scaled up to
    the norm of g + u when that is larger, times gamma."""
    c = pareto_weight(flat_cat(gs), flat_cat(us))[0] if c is None else c
    out = []
    for g, u in zip(gs, us):
        n = 2 * c * g + 2 * (1 - c) * u
        out.append(gamma * n * ((g + u).norm() / n.norm().clamp_min(1e-20)).clamp_min(1))
    return out


class ConcatHeads(Concat):
    """Concat's head on the concatenated features (the fused prediction) and a linear head per modality."""

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(encoders, num_classes, modalities)
        self.heads = nn.ModuleList(nn.Linear(self.dim, num_classes) for _ in encoders)

    def logits(self, zs):
        return self.fuse(zs), [h(z) for h, z in zip(self.heads, zs)]


class MMPareto(ConcatHeads):
    """MMPareto (Wei and Hu, ICML 2024; GeWu-Lab/MMPareto_ICML2024): loss = CE(fused) + sum_m CE(unimodal_m) on
    ConcatHeads. Encoder m's gradient is pareto_grads of its gradients from the fused loss and from its own
    (gamma 1.5, the authors'); the heads keep theirs. Diagnostics: per encoder the mean weight c of its fused
    gradient and the mean cosine of its fused and unimodal gradients."""

    def __init__(self, encoders, num_classes, modalities, gamma=1.5):
        super().__init__(encoders, num_classes, modalities)
        self.gamma = gamma
        self.diagnostics = EpochMeans(modalities, ["mmpareto_weight", "mmpareto_cos"])

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        fused, unis = self.logits(self.encode(xs))
        losses = [F.cross_entropy(fused, y)] + [F.cross_entropy(u, y) for u in unis]
        params = [[p for p in f.parameters() if p.requires_grad] for f in self.encoders]
        grad = lambda loss, ps: [torch.zeros_like(p) if g is None else g for p, g in
                                 zip(ps, torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True))]
        fused_grads = all_mean(grad(losses[0], sum(params, [])))         # torchrun: the job's gradients
        optimizer.zero_grad(set_to_none=True)
        start = 0
        for m, ps in enumerate(params):
            own, fused = all_mean(grad(losses[1 + m], ps)), fused_grads[start:start + len(ps)]
            c, cos = pareto_weight(flat_cat(fused), flat_cat(own))
            self.diagnostics.add("mmpareto_weight", c, m)
            self.diagnostics.add("mmpareto_cos", cos, m)
            for p, g in zip(ps, pareto_grads(fused, own, self.gamma, c)):
                p.grad = g
            start += len(ps)
        total = sum(losses)
        total.backward(inputs=[*self.head.parameters(), *self.heads.parameters()])
        optimizer.step()
        return total.detach()


def gb_weights(start, end, abs_gain=False, eps=1e-8):
    """G-Blending's weights from each head's (train, validation) loss at the start and at the end of a
    super-epoch, (K, 2) tensors: w_k = G_k / O_k^2 normalised to sum 1, G = the drop of the validation loss (at
    least 0: a head whose validation loss rose gets ~0; abs_gain: |G|, as GeWu-Lab/BalanceBenchmark), O = the
    growth of the validation-train gap (the overfitting); eps keeps a head that overfits without gaining at a
    weight of ~0 and a gap that did not move from dividing by 0."""
    gain = start[:, 1] - end[:, 1]
    gain = gain.abs() if abs_gain else gain.clamp_min(0)
    over = (end[:, 1] - end[:, 0]) - (start[:, 1] - start[:, 0])
    w = (gain / over.square().clamp_min(eps)).clamp_min(eps)
    return w / w.sum()


class GBlending(ConcatHeads):
    """Online Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020): loss = sum_k w_k CE_k over the unimodal heads and
    the fused one (k = M) of ConcatHeads. Every `super_epoch` epochs (start_epoch) the weights are estimated from
    the current model: a copy of each branch (encoder m and head m; every encoder and the fused head) trains alone
    with CE for the coming super-epoch, and w = gb_weights of its losses on the training and the validation split
    (eval mode) before and after. Predicts with the fused head."""

    def __init__(self, encoders, num_classes, modalities, super_epoch=10, abs_gain=False):
        super().__init__(encoders, num_classes, modalities)
        self.super_epoch, self.abs_gain = super_epoch, abs_gain
        self.register_buffer("weights", torch.full((len(encoders) + 1,), 1 / (len(encoders) + 1)))

    def branch(self, xs, k):
        return self.fuse(self.encode(xs)) if k == len(xs) else self.heads[k](self.encoders[k](xs[k]))

    def branch_params(self, k):
        return [*self.parameters()] if k == len(self.encoders) else [*self.encoders[k].parameters(),
                                                                      *self.heads[k].parameters()]

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        fused, unis = self.logits(self.encode(xs))
        loss = sum(w * F.cross_entropy(u, y) for w, u in zip(self.weights, unis + [fused]))
        return optimizer_step(optimizer, loss)

    @torch.no_grad()
    def branch_losses(self, loader, device, ks, amp=False):
        """The mean CE of each branch in ks over the loader, in eval mode."""
        was, total, n = self.training, torch.zeros(len(ks), device=device), 0
        self.eval()
        for xs, y, _, _ in device_batches(loader, device, False):
            with autocast(device, amp):
                total += torch.stack([F.cross_entropy(self.branch(xs, k).float(), y, reduction="sum") for k in ks])
            n += len(y)
        self.train(was)
        return (all_sum(total.double()) / all_sum(torch.tensor(float(n), device=device))).cpu()   # torchrun: the job's

    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False):
        if epoch % self.super_epoch:
            return
        if not loaders.get("val"):
            raise ValueError("gblending measures overfitting on the validation split: use --val_ratio > 0")
        K, n = len(self.encoders) + 1, min(self.super_epoch, epochs - epoch)
        start = torch.stack([self.branch_losses(loaders[s], device, range(K), amp) for s in ("train", "val")], 1)
        end, hyper = [], {h: optimizer.param_groups[0][h] for h in ("lr", "momentum", "weight_decay")}
        for k in range(K):
            twin = copy.deepcopy(self)                    # branch k alone, from the current weights
            opt = torch.optim.SGD(twin.branch_params(k), **hyper)
            opt.register_step_pre_hook(lambda *_: mean_grads(twin.parameters()))      # torchrun: as the model
            twin.train()
            for i in range(n):
                set_epoch(loaders["train"], epoch + i)             # torchrun: a new order each pass
                for xs, y, _, _ in device_batches(loaders["train"], device, True):
                    with autocast(device, amp):
                        optimizer_step(opt, F.cross_entropy(twin.branch(xs, k).float(), y))
            end.append([twin.branch_losses(loaders[s], device, [k], amp)[0] for s in ("train", "val")])
            del twin, opt                                 # one copy at a time
        self.weights.copy_(gb_weights(start, torch.tensor(end, dtype=torch.float64), self.abs_gain))
        names = self.modalities + ["fused"]
        print("G-Blending weights: " + ", ".join(f"{m} {w:.3f}" for m, w in zip(names, self.weights.tolist())))

    def epoch_log(self):
        return {"gb_weights": [round(w, 6) for w in self.weights.tolist()]}


def proto_logits(z, prototypes):
    """PMR's prototype logits: minus the Euclidean distance of each feature row to each class prototype, (B, C)."""
    return -(z[:, None].float() - prototypes[None]).square().sum(-1).clamp_min(1e-12).sqrt()


def pmr_coefficients(scores, binary=False):
    """PMR's imbalance ratio rho_m = s_m / (mean of the others' scores) (s_a / s_v for two modalities) and the
    coefficients (weak: clip(1/rho - 1, 0, 1) on its prototype CE; dominant: clip(rho - 1, 0, 1) on its entropy);
    binary: 1 for rho < 1 (weak) and for rho > 1 (dominant), as the authors' released script weighs its CE."""
    M = len(scores)
    rho = scores / ((scores.sum() - scores) / (M - 1)).clamp_min(1e-12)
    if binary:
        return rho, (rho < 1).to(rho.dtype), (rho > 1).to(rho.dtype)
    return rho, (1 / rho - 1).clamp(0, 1), (rho - 1).clamp(0, 1)


class PMR(Concat):
    """PMR (Fan et al., CVPR 2023; fanyunfeng-bit/Modal-Imbalance-PMR): concat fusion and per modality class
    prototypes, the class means of the encoder's features on a tenth of the training batches in eval mode,
    computed at the start of every epoch (start_epoch; `momentum` of the old prototype kept). The prototype
    logits (proto_logits; the unimodal predictions) give each modality's prototype CE (PCE) and its score s_m
    (the batch's sum of the prototype softmax at the label); with pmr_coefficients, loss = CE(fused)
    + alpha sum_m weak_m PCE_m - mu sum_m dominant_m H_m, H_m the prototype softmax's entropy summed over the batch
    (as GeWu-Lab/BalanceBenchmark 01458a1's PMR_PER), for the epochs up to `entropy_ends`; both terms for the epochs
    up to `ends` (plain concat after, as the authors' --modulation_ends). val_prototypes: the class means of the
    whole validation split instead (the authors' AVE runs). Diagnostics: the mean rho_m, weak_m and dominant_m."""

    def __init__(self, encoders, num_classes, modalities, alpha=1.0, mu=0.01, entropy_ends=10, momentum=0.0,
                 binary=False, ends=70, val_prototypes=False):
        super().__init__(encoders, num_classes, modalities)
        self.alpha, self.mu, self.entropy_ends, self.momentum, self.epoch = alpha, mu, entropy_ends, momentum, 0
        self.binary, self.ends, self.val_prototypes = binary, ends, val_prototypes
        self.register_buffer("prototypes", torch.zeros(len(encoders), num_classes, self.dim))
        self.diagnostics = EpochMeans(modalities, ["pmr_ratio", "pmr_coeff", "pmr_entropy_coeff"])

    def schedule(self, epoch, step, steps):
        self.epoch = epoch

    @torch.no_grad()
    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False):
        split, (M, C, d) = "val" if self.val_prototypes else "train", self.prototypes.shape
        if not loaders.get(split):
            raise ValueError("--pmr_val_prototypes takes the prototypes from the validation split: use --val_ratio > 0")
        loader, was = loaders[split], self.training
        sums, counts = torch.zeros(M, C, d, device=device), torch.zeros(C, device=device)
        n = len(loader) if self.val_prototypes else max(1, len(loader) // 10)      # all, or a tenth of train
        self.eval()
        for i, (xs, y, _, _) in zip(range(n), device_batches(loader, device, split == "train")):
            with autocast(device, amp):
                zs = self.encode(xs)
            for m, z in enumerate(zs):
                sums[m].index_add_(0, y, z.float())
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))   # (bincount would sync on CUDA)
        self.train(was)
        all_sum(sums), all_sum(counts)                            # torchrun: every process's first batches
        seen = counts > 0                                         # an unseen class keeps its prototype
        keep = self.momentum if epoch > 1 else 0.0               # the authors' first blend: after epoch 1
        self.prototypes[:, seen] = keep * self.prototypes[:, seen] + (1 - keep) * sums[:, seen] / counts[seen, None]

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        zs = self.encode(xs)
        loss = F.cross_entropy(self.fuse(zs), y)
        if self.epoch > self.ends:
            return optimizer_step(optimizer, loss)
        logits = [proto_logits(z, c) for z, c in zip(zs, self.prototypes)]
        with torch.no_grad():
            scores = all_sum(torch.stack([u.softmax(1).gather(1, y[:, None]).sum() for u in logits]))   # the job's
            rho, weak, dominant = pmr_coefficients(scores, self.binary)
        self.diagnostics.add("pmr_ratio", rho)
        self.diagnostics.add("pmr_coeff", weak)
        if self.epoch <= self.entropy_ends:
            self.diagnostics.add("pmr_entropy_coeff", dominant)
        for m, u in enumerate(logits):
            loss = loss + self.alpha * weak[m] * F.cross_entropy(u, y)
            if self.epoch <= self.entropy_ends:           # summed over the batch (the job's, under torchrun)
                loss = loss - self.mu * world()[1] * dominant[m] * -(u.softmax(1) * u.log_softmax(1)).sum()
        return optimizer_step(optimizer, loss)

    @torch.no_grad()
    def predict(self, xs, mask=None):
        zs = self.encode(xs)
        return self.fuse(zs), [proto_logits(z, c) for z, c in zip(zs, self.prototypes)]


def reconboost_loss(logits, ensemble, y, w1=5.0, w2=1.0):
    """ReconBoost's loss of the modality in training, as the authors' code: mean of (w1 - w2 q_y) / C x CE(logits),
    q = softmax(ensemble), the other modalities' detached ensemble output (None: none yet, q_y = 1); so a sample
    the others already classify confidently counts less (boosting), w2 the reconcilement's weight."""
    q_y = 1.0 if ensemble is None else ensemble.detach().softmax(1).gather(1, y[:, None])[:, 0]
    return ((w1 - w2 * q_y) / logits.shape[1] * F.cross_entropy(logits, y, reduction="none")).mean()


class ReconBoost(Fusion):
    """ReconBoost (Hua et al., ICML 2024; huacong/ReconBoost): one head shared by every encoder (Linear, ReLU, Linear;
    256 hidden, the authors' common space) and a learned scalar boost_rate (starts at 1): F = boost_rate x the sum of
    head(encoder_m(x_m)) over the modalities trained so far. The epochs go in stages: modality m (in turn) trains
    alone for `stage_epochs` (its encoder and the head, on reconboost_loss against the others' F; they run
    without gradients), then every parameter for `correct_epochs` on CE(F) (the global rectification). Each phase
    starts from a fresh optimizer state, as the authors' new optimizer per phase. Predicts with F."""

    def __init__(self, encoders, num_classes, modalities, stage_epochs=4, correct_epochs=4, weights=(5.0, 1.0),
                 hidden=256):
        super().__init__(encoders, num_classes, modalities)
        self.head = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.boost_rate = nn.Parameter(torch.ones(()))
        self.stage_epochs, self.correct_epochs, (self.w1, self.w2) = stage_epochs, correct_epochs, weights
        self.register_buffer("members", torch.zeros(len(encoders), dtype=torch.bool))    # saved with the weights
        self.current, self.fresh, self.joined = 0, False, [False] * len(encoders)

    def schedule(self, epoch, step, steps):
        cycle = self.stage_epochs + self.correct_epochs
        stage, e = divmod(epoch, cycle)
        self.current = stage % len(self.encoders) if e < self.stage_epochs else None     # None: rectification
        self.fresh = step == 0 and e in (0, self.stage_epochs)
        self.joined = [epoch >= m * cycle for m in range(len(self.encoders))]   # from its first stage on (no sync)
        if step == 0:
            self.members.copy_(torch.tensor(self.joined))

    def ensemble(self, unis, members, skip=None):
        chosen = [u for m, u in enumerate(unis) if members[m] and m != skip]
        return self.boost_rate * sum(chosen) if chosen else None

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        if self.fresh:
            optimizer.state.clear()
        m, joined = self.current, self.joined
        if m is None:
            unis = [self.head(f(x)) if j else None for f, x, j in zip(self.encoders, xs, joined)]
            loss = F.cross_entropy(self.ensemble(unis, joined), y)
        else:
            with torch.no_grad():
                others = [self.head(f(x)) if j and k != m else None
                          for k, (f, x, j) in enumerate(zip(self.encoders, xs, joined))]
                ensemble = self.ensemble(others, joined, skip=m)
            loss = reconboost_loss(self.head(self.encoders[m](xs[m])), ensemble, y, self.w1, self.w2)
        return optimizer_step(optimizer, loss)

    @torch.no_grad()
    def predict(self, xs, mask=None):
        unis = [self.head(z) for z in self.encode(xs)]
        fused = self.ensemble(unis, self.members.tolist())
        return (self.boost_rate * sum(unis) if fused is None else fused), unis


# ======== 1d. The Table 6 methods (cca, dcca, dccae, ae, cra, mmin, if_mmin, cpm_net, tate) and their MLP encoder ========

# ---- shared parts of the Table 6 models

def mlp(sizes):
    """Linear + ReLU for every consecutive pair of sizes."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """The per-modality encoder of Table 6 (the paper's): input -> 128 -> 128 -> 128, ReLU after each."""

    def __init__(self, d_in, dim=128, layers=3):
        super().__init__()
        self.d_in, self.dim = d_in, dim
        self.net = mlp([d_in] + [dim] * layers)

    def forward(self, x):
        return self.net(x)


def mlp_decoder(dim, d_out, layers=3):
    """The mirror of MLPEncoder: dim -> ... -> dim (ReLU) -> d_out (linear)."""
    return nn.Sequential(mlp([dim] * layers), nn.Linear(dim, d_out))


def full_mask(xs):
    return torch.ones(len(xs[0]), len(xs), dtype=torch.bool, device=xs[0].device)


def zero_missing(xs, mask):
    return [x * mask[:, m:m + 1] for m, x in enumerate(xs)]


def views_alone(xs, mask=None):
    """Per view m, the input of a model that reads view m alone: (every view's rows where m is present, a mask of
    those rows with m alone present); the unimodal features of the methods without an encoder per view."""
    mask = full_mask(xs) if mask is None else mask
    for m in range(len(xs)):
        alone = torch.zeros_like(mask[mask[:, m]])
        alone[:, m] = True
        yield [x[mask[:, m]] for x in xs], alone


def view_mse(preds, targets, mask):
    """Mean over views of the mean squared error on the rows where the view is present in `mask` (under torchrun,
    the mean of the processes' values is the job's)."""
    total = 0.0
    for m, (p, t) in enumerate(zip(preds, targets)):
        w = mask[:, m].to(p.dtype)                   # torchrun: over the job's present rows (the processes' mean)
        total = total + (((p - t) ** 2).mean(1) * w).sum() / (all_sum(w.sum().detach()).clamp_min(1) / world()[1])
    return total / len(preds)


def hide_views(mask, p):
    """Training input of the imputation methods: with probability p, a sample with two or more present
    views has one of them (drawn uniformly) hidden, so its known value can supervise the imputation."""
    pick = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1).argmax(1)
    rows = (mask.sum(1) >= 2) & (torch.rand(len(mask), device=mask.device) < p)
    out = mask.clone()
    out[rows, pick[rows]] = False
    return out


def split_views(z, sizes):
    return list(torch.split(z, list(sizes), dim=1))


def multiset_cca(xs, mask, k, reg=1e-3):
    """Linear CCA of M views with missing rows (multiset CCA, sum of pairwise correlations): maximise
    sum_ij w_i' C_ij w_j subject to sum_i w_i' C_ii w_i = 1, i.e. the generalised eigenproblem
    A w = lambda D w with A = [C_ij] and D = blockdiag(C_ii) (+ reg I on the diagonal blocks).
    C_ij is computed on the rows where both views are present. For two views lambda = 1 + rho.
    Returns ([W_m (d_m, k)], [mean_m], top-k eigenvalues); each projection has unit variance."""
    mk = mask.double()
    mus = [(x.double() * mk[:, m:m + 1]).sum(0) / mk[:, m].sum().clamp_min(1) for m, x in enumerate(xs)]
    xc = [(x.double() - mu) * mk[:, m:m + 1] for m, (x, mu) in enumerate(zip(xs, mus))]
    blocks = []
    for i in range(len(xs)):
        row = []
        for j in range(len(xs)):
            n_ij = (mask[:, i] & mask[:, j]).sum().item()
            c = xc[i].T @ xc[j] / max(n_ij - 1, 1)
            row.append(c + reg * torch.eye(len(c), dtype=c.dtype, device=c.device) if i == j else c)
        blocks.append(row)
    A = torch.cat([torch.cat(row, 1) for row in blocks], 0)
    L = torch.linalg.cholesky(torch.block_diag(*[blocks[i][i] for i in range(len(xs))]))
    S = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A, upper=False).T, upper=False)
    evals, evecs = torch.linalg.eigh((S + S.T) / 2)
    top = torch.argsort(evals, descending=True)[:k]
    W = torch.linalg.solve_triangular(L.T, evecs[:, top], upper=True)
    Ws = torch.split(W, [x.shape[1] for x in xs], dim=0)
    Ws = [w / torch.sqrt(torch.diag(w.T @ blocks[m][m] @ w)).clamp_min(1e-12) for m, w in enumerate(Ws)]
    return [w.float() for w in Ws], [mu.float() for mu in mus], evals[top]


def store_projection(module, Ws, mus):
    for m, (w, mu) in enumerate(zip(Ws, mus)):
        getattr(module, f"W{m}").copy_(w)
        getattr(module, f"mu{m}").copy_(mu)


def mean_projection(module, hs, mask):
    """Mean over each sample's present views of (h_m - mu_m) W_m (the buffers W<m>, mu<m> of module)."""
    w = mask.to(hs[0].dtype)
    proj = [(h - getattr(module, f"mu{m}")) @ getattr(module, f"W{m}") * w[:, m:m + 1] for m, h in enumerate(hs)]
    return sum(proj) / w.sum(1, keepdim=True)


def cca_correlation(h1, h2, k=None, reg=1e-4):
    """The DCCA objective (Andrew et al. 2013): the sum of the top-k canonical correlations of h1 and h2
    (n x o), i.e. the top-k singular values of T = S11^-1/2 S12 S22^-1/2 with centred, ridge-
    regularised covariances. Cholesky factors stand in for the inverse square roots: L1^-1 S12 L2^-T
    differs from T by orthogonal factors only, so it has the same singular values."""
    n = h1.shape[0]
    h1, h2 = h1 - h1.mean(0), h2 - h2.mean(0)
    eye = lambda h: torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    L1 = torch.linalg.cholesky(h1.T @ h1 / (n - 1) + reg * eye(h1))
    L2 = torch.linalg.cholesky(h2.T @ h2 / (n - 1) + reg * eye(h2))
    T = torch.linalg.solve_triangular(L1, h1.T @ h2 / (n - 1), upper=False)
    T = torch.linalg.solve_triangular(L2, T.T, upper=False).T
    sv = torch.linalg.svdvals(T)
    return sv[:k].sum() if k else sv.sum()


def cmd(a, b, order=5):
    """Central moment discrepancy (Zellinger et al. 2017) of two samples of features: the distance of
    the means plus the distances of the central moments of order 2..order (unscaled, as IF-MMIN's code)."""
    ma, mb = a.mean(0), b.mean(0)
    total = (ma - mb).norm()
    for k in range(2, order + 1):
        total = total + (((a - ma) ** k).mean(0) - ((b - mb) ** k).mean(0)).norm()
    return total


def fit_softmax_classifier(linear, z, y, weight_decay=1e-4, steps=100, reset=True):
    """Refit a linear classifier from scratch on fixed features: multinomial logistic regression by
    full-batch L-BFGS with an L2 penalty (reset=False: from the classifier's weights as they are)."""
    if reset:
        linear.reset_parameters()
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


class CascadedResidualAE(nn.Module):
    """MMIN's ResidualAE (AIM3-RUC/MMIN, the cascaded residual autoencoder of Tran et al. 2017): block k's
    encoder d -> widths (LeakyReLU 0.01 between layers, a linear bottleneck), its decoder back to d (ReLU
    between layers, linear out); block k reads x plus the sum of the earlier blocks' outputs and the result
    is transition(x_last + out_last) (Linear, ReLU, Linear). With `add` (IF-MMIN's invariant feature, width
    d; its autoencoder_2.ResidualAE as of 2024) block 0 reads x + add, block k > 0 decoder k-1's output +
    add, and the result is transition(out_last). Also returns the concatenated bottlenecks."""

    def __init__(self, d, widths=(128, 64, 32), blocks=3):
        super().__init__()
        sizes = [d] + list(widths)

        def encoder():
            layers = [nn.Linear(sizes[0], sizes[1])]
            for i, o in zip(sizes[1:-1], sizes[2:]):
                layers += [nn.LeakyReLU(0.01), nn.Linear(i, o)]
            return nn.Sequential(*layers)

        self.enc = nn.ModuleList(encoder() for _ in range(blocks))
        self.dec = nn.ModuleList(nn.Sequential(mlp(sizes[:0:-1]), nn.Linear(sizes[1], d)) for _ in range(blocks))
        self.transition = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.latent_dim = sizes[-1] * blocks

    def forward(self, x, add=None):
        latents, out = [], torch.zeros_like(x)
        for k, (enc, dec) in enumerate(zip(self.enc, self.dec)):
            if add is None:
                x = x + out                                 # MMIN: the running sum of the blocks' outputs
            else:
                x = (x if k == 0 else out) + add            # IF-MMIN: the previous block's output + add
            latents.append(enc(x))
            out = dec(latents[-1])
        return self.transition(out if add is not None else x + out), torch.cat(latents, 1)


# ---- the nine Table-6-only methods

class MissingMethod(Method):
    """Base of the Table-6-only methods. A subclass defines objective(xs, y, mask) for training and
    classify(xs, mask), the logits from each sample's present views (missing views are zeros in xs).
    predict() also gives each view's unimodal logits: the prediction from that view alone, on the
    samples where it is present (zeros elsewhere; evaluate() counts only those samples)."""

    grad_clip = None                           # a maximum gradient norm, for the methods that need one

    def __init__(self, encoders, num_classes, modalities):
        super().__init__(num_classes, modalities)
        self.dims = [e.d_in for e in encoders]

    def objective(self, xs, y, mask):
        raise NotImplementedError

    def classify(self, xs, mask):
        raise NotImplementedError

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        loss = self.objective(xs, y, full_mask(xs) if mask is None else mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            mean_grads(self.parameters())       # torchrun: the job's gradients, then the clip
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, xs, mask=None):
        mask = full_mask(xs) if mask is None else mask
        fused = self.classify(xs, mask)
        unis = []
        for m in range(len(xs)):
            u, rows = torch.zeros_like(fused), mask[:, m]
            if rows.any():
                alone = torch.zeros_like(mask[rows])
                alone[:, m] = True
                u[rows] = self.classify([x[rows] for x in xs], alone)
            unis.append(u)
        return fused, unis


class CCA(MissingMethod):
    """Linear CCA of the three views (multiset_cca), fitted in closed form before training on the
    training samples where the views are present; a sample is the mean of its present views'
    projections; a linear classifier on top is what the epochs train."""

    def __init__(self, encoders, num_classes, modalities, dim=32, reg=1e-3):
        super().__init__(encoders, num_classes, modalities)
        self.k = min([dim] + self.dims)
        for m, d in enumerate(self.dims):
            self.register_buffer(f"W{m}", torch.eye(d, self.k))
            self.register_buffer(f"mu{m}", torch.zeros(d))
        self.reg = reg
        self.classifier = nn.Linear(self.k, num_classes)

    def start_epoch(self, epoch, epochs, loaders, optimizer, device, amp=False):
        if epoch > 0:                               # fitted once, before the first epoch
            return
        xs, mask, _ = collect(loaders["train"], device)
        Ws, mus, _ = multiset_cca(xs, mask, self.k, self.reg)
        store_projection(self, Ws, mus)

    def classify(self, xs, mask):
        return self.classifier(mean_projection(self, xs, mask))

    def unimodal_features(self, xs, mask=None):     # each view's canonical projection (x_m - mu_m) W_m
        return [(x - getattr(self, f"mu{m}")) @ getattr(self, f"W{m}") for m, x in enumerate(present_rows(xs, mask))]

    def encoder_params(self):                       # one network over every view: no encoder per modality
        return []

    def objective(self, xs, y, mask):
        return F.cross_entropy(self.classify(xs, mask), y)


class DCCA(MissingMethod):
    """Deep CCA (Andrew et al. 2013): per view an MLP encoder and a linear output layer of `dim` units,
    trained to maximise the total canonical correlation of the outputs (summed over the pairs of views,
    each pair on the rows of the batch where both are present, and only when there are at least twice
    as many rows as outputs: fewer make the covariances near-singular). The correlation's gradients
    through near-singular covariances can be large, so the gradient norm is clipped at 5. After every
    epoch a linear CCA of the outputs on the training set gives aligned projections, and a linear
    classifier is fitted on the mean of each sample's present projections."""
    grad_clip = 5.0

    def __init__(self, encoders, num_classes, modalities, dim=10, reg=1e-3):
        super().__init__(encoders, num_classes, modalities)
        self.encoders = nn.ModuleList(encoders)
        self.outputs = nn.ModuleList(nn.Linear(e.dim, dim) for e in encoders)
        self.k, self.reg = dim, reg
        for m in range(len(encoders)):
            self.register_buffer(f"W{m}", torch.eye(dim))
            self.register_buffer(f"mu{m}", torch.zeros(dim))
        self.classifier = nn.Linear(dim, num_classes)

    def features(self, xs):
        return [g(f(x)) for f, g, x in zip(self.encoders, self.outputs, xs)]

    def unimodal_features(self, xs, mask=None):     # each view's network with its output layer (what CCA aligns)
        return self.features(present_rows(xs, mask))

    def correlation_loss(self, hs, mask):
        hs, mask = [job_batch(h) for h in hs], job_batch(mask)     # torchrun: the job's batch (job_grad below)
        loss = sum(h.sum() * 0 for h in hs)      # stays a graph when no pair of views has enough rows
        for i in range(len(hs)):
            for j in range(i + 1, len(hs)):
                both = mask[:, i] & mask[:, j]
                if both.sum() >= 2 * hs[i].shape[1]:
                    corr = cca_correlation(hs[i][both].double(), hs[j][both].double(), self.k, self.reg)
                    loss = loss - corr.to(hs[i].dtype)
        return job_grad(loss)

    def objective(self, xs, y, mask):
        return self.correlation_loss(self.features(xs), mask)

    def classify(self, xs, mask):
        return self.classifier(mean_projection(self, self.features(xs), mask))

    @torch.no_grad()
    def end_epoch(self, epoch, loaders, device, amp=False):
        was_training = self.training
        self.eval()
        xs, mask, y = collect(loaders["train"], device)
        hs = self.features(xs)
        Ws, mus, _ = multiset_cca(hs, mask, self.k, self.reg)
        store_projection(self, Ws, mus)
        fit_softmax_classifier(self.classifier, mean_projection(self, hs, mask), y)
        self.train(was_training)


class DCCAE(DCCA):
    """DCCA plus per-view decoders from the outputs back to the present views and their reconstruction
    loss (Wang et al. 2015): loss = -total correlation + recon_weight * reconstruction error."""

    def __init__(self, encoders, num_classes, modalities, dim=10, reg=1e-3, recon_weight=1.0, layers=3):
        super().__init__(encoders, num_classes, modalities, dim, reg)
        self.decoders = nn.ModuleList(nn.Sequential(mlp([dim, e.dim]), mlp_decoder(e.dim, e.d_in, layers))
                                      for e in encoders)
        self.recon_weight = recon_weight

    def objective(self, xs, y, mask):
        hs = self.features(xs)
        recon = view_mse([g(h) for g, h in zip(self.decoders, hs)], xs, mask)
        return self.correlation_loss(hs, mask) + self.recon_weight * recon


class AE(MissingMethod):
    """An autoencoder over the concatenated views (missing ones zero-filled) and the mask, trained to
    reconstruct every view whose value is known (with views hidden by hide_views, so it learns to fill
    them in), jointly with a linear classifier on the bottleneck."""

    def __init__(self, encoders, num_classes, modalities, dim=None, layers=3, recon_weight=1.0, hide_prob=0.5):
        super().__init__(encoders, num_classes, modalities)
        d, dim = sum(self.dims), dim or encoders[0].dim         # the bottleneck: the encoders' width
        self.encoder = MLPEncoder(d + len(self.dims), dim, layers)
        self.decoder = mlp_decoder(dim, d, layers)
        self.classifier = nn.Linear(dim, num_classes)
        self.recon_weight, self.hide_prob = recon_weight, hide_prob

    def bottleneck(self, xs, mask):
        return self.encoder(torch.cat(zero_missing(xs, mask) + [mask.to(xs[0].dtype)], 1))

    def impute(self, xs, mask):
        """Every view as reconstructed from the present ones."""
        return split_views(self.decoder(self.bottleneck(xs, mask)), self.dims)

    def classify(self, xs, mask):
        return self.classifier(self.bottleneck(xs, mask))

    def unimodal_features(self, xs, mask=None):     # the bottleneck of each view alone
        return [self.bottleneck(v, alone) for v, alone in views_alone(xs, mask)]

    def encoder_params(self):                       # one network over every view: no encoder per modality
        return []

    def objective(self, xs, y, mask):
        b = self.bottleneck(xs, hide_views(mask, self.hide_prob))
        recon = view_mse(split_views(self.decoder(b), self.dims), xs, mask)
        return F.cross_entropy(self.classifier(b), y) + self.recon_weight * recon


class CRA(MissingMethod):
    """Cascaded residual autoencoder (Tran et al. 2017): a CascadedResidualAE (MMIN's implementation of it,
    transition included) imputes the missing views
    of the zero-filled concatenated input (trained to output every known view, hidden ones included);
    the classifier (an MLP encoder and a linear layer) reads the input with its missing views imputed."""

    def __init__(self, encoders, num_classes, modalities, dim=None, layers=3, widths=(128, 64, 32), blocks=3,
                 recon_weight=1.0, hide_prob=0.5):
        super().__init__(encoders, num_classes, modalities)
        dim = dim or encoders[0].dim                             # the classifier's width: the encoders'
        self.cra = CascadedResidualAE(sum(self.dims), widths, blocks)
        self.classifier = nn.Sequential(MLPEncoder(sum(self.dims), dim, layers), nn.Linear(dim, num_classes))
        self.recon_weight, self.hide_prob = recon_weight, hide_prob

    def impute(self, xs, mask):
        return split_views(self.cra(torch.cat(zero_missing(xs, mask), 1))[0], self.dims)

    def completed(self, views, xs, mask):
        return torch.cat([torch.where(mask[:, m:m + 1], x, v) for m, (x, v) in enumerate(zip(xs, views))], 1)

    def classify(self, xs, mask):
        return self.classifier(self.completed(self.impute(xs, mask), xs, mask))

    def unimodal_features(self, xs, mask=None):     # the classifier's hidden layer on each view alone, imputed
        return [self.classifier[0](self.completed(self.impute(v, alone), v, alone))
                for v, alone in views_alone(xs, mask)]

    def encoder_params(self):                       # one network over every view: no encoder per modality
        return []

    def objective(self, xs, y, mask):
        seen = hide_views(mask, self.hide_prob)
        views = self.impute(xs, seen)
        recon = view_mse(views, xs, mask)
        return F.cross_entropy(self.classifier(self.completed(views, xs, seen)), y) + self.recon_weight * recon


class MMIN(MissingMethod):
    """Missing Modality Imagination Network (Zhao et al. 2021; AIM3-RUC/MMIN). Per-view MLP encoders (a
    missing view enters as zeros); a forward CascadedResidualAE imagines the embeddings of all views from
    the concatenated ones; a backward one maps the imagination back to the input embeddings, its target
    detached (the cycle loss); the classifier reads the concatenated bottlenecks of the forward AE. The
    paper's imagination targets come from encoders pretrained on full-modality data; here the training
    split has missing views too, so the targets are the model's own (detached) embeddings of the views
    that are present, with views hidden by hide_views to be imagined."""

    def __init__(self, encoders, num_classes, modalities, widths=(128, 64, 32), blocks=3, recon_weight=1.0,
                 hide_prob=0.5, cycle=True):
        super().__init__(encoders, num_classes, modalities)
        self.encoders = nn.ModuleList(encoders)
        self.sizes = [e.dim for e in encoders]
        self.forward_ae = CascadedResidualAE(sum(self.sizes), widths, blocks)
        self.backward_ae = CascadedResidualAE(sum(self.sizes), widths, blocks) if cycle else None
        hidden = encoders[0].dim
        self.classifier = nn.Sequential(mlp([self.forward_ae.latent_dim, hidden]), nn.Linear(hidden, num_classes))
        self.recon_weight, self.hide_prob = recon_weight, hide_prob

    def embed(self, xs, mask):
        return [f(x) for f, x in zip(self.encoders, zero_missing(xs, mask))]

    def imagine(self, es, mask):
        """(imagined embeddings of all views, forward-AE bottlenecks) from the embeddings es."""
        return self.forward_ae(torch.cat(es, 1))

    def impute(self, xs, mask):
        """Every view's embedding as imagined from the present ones."""
        return split_views(self.imagine(self.embed(xs, mask), mask)[0], self.sizes)

    def classify(self, xs, mask):
        return self.classifier(self.imagine(self.embed(xs, mask), mask)[1])

    def objective(self, xs, y, mask):
        return self.imagination_loss(xs, y, mask, hide_views(mask, self.hide_prob))[0]

    def imagination_loss(self, xs, y, mask, seen):
        """CE on the bottlenecks of the input with views hidden (`seen`), the imagination's MSE to the
        known views' embeddings and, with the backward AE, the cycle loss; also returns what was embedded."""
        es = self.embed(xs, seen)
        imagined, latent = self.imagine(es, seen)
        with torch.no_grad():
            target = self.embed(xs, mask)
        loss = F.cross_entropy(self.classifier(latent), y)
        loss = loss + self.recon_weight * view_mse(split_views(imagined, self.sizes), target, mask)
        if self.backward_ae is not None:         # the official code: mse(feat_fusion_miss.detach(), recon_cycle)
            loss = loss + self.recon_weight * F.mse_loss(self.backward_ae(imagined)[0], torch.cat(es, 1).detach())
        return loss, es, target


class IFMMIN(MMIN):
    """MMIN with invariant features (Zuo et al. 2023; ZhuoYulang/IF-MMIN). One projector shared by the
    views (Linear, LeakyReLU, Linear, LeakyReLU) maps each view's embedding into an invariant space; the
    concatenated invariant features of the input (the hidden views' embeddings of zeros included) are added
    to every block's input of the imagination AE, and trained to match those of all the known views
    (detached: the authors' frozen teacher, which needs full-modality data, is not available here). The
    views' invariant features are pulled together by the central moment discrepancy, averaged over the
    pairs of views (rows where both are seen, after hiding); the authors apply it in their pretraining stage. No
    backward (cycle) AE, as in the paper."""

    def __init__(self, encoders, num_classes, modalities, widths=(128, 64, 32), blocks=3, recon_weight=1.0,
                 hide_prob=0.5, cmd_weight=0.1, cmd_order=5):
        super().__init__(encoders, num_classes, modalities, widths, blocks, recon_weight, hide_prob, cycle=False)
        hidden = encoders[0].dim
        self.invariant = nn.Sequential(nn.Linear(hidden, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, hidden),
                                       nn.LeakyReLU(0.01))
        self.cmd_weight, self.cmd_order = cmd_weight, cmd_order

    def imagine(self, es, mask):
        return self.forward_ae(torch.cat(es, 1), torch.cat([self.invariant(e) for e in es], 1))

    def objective(self, xs, y, mask):
        seen = hide_views(mask, self.hide_prob)
        loss, es, target = self.imagination_loss(xs, y, mask, seen)
        inv = [self.invariant(e) for e in es]
        with torch.no_grad():                               # of the known views' embeddings
            known = torch.cat([self.invariant(e) for e in target], 1)
        loss = loss + self.recon_weight * F.mse_loss(torch.cat(inv, 1), known)
        pairs = [(i, j) for i in range(len(inv)) for j in range(i + 1, len(inv))]
        inv, seen = [job_batch(v) for v in inv], job_batch(seen)        # torchrun: the moments of the job's batch
        for i, j in pairs:
            both = seen[:, i] & seen[:, j]
            if both.sum() > 1:
                loss = loss + job_grad(self.cmd_weight * cmd(inv[i][both], inv[j][both], self.cmd_order) / len(pairs))
        return loss


class CPMNet(MissingMethod):
    """Cross Partial Multi-View Networks (Zhang et al. 2019; hanmenghan/CPM_Nets). Every training sample has
    a latent code h (a buffer, indexed by its data-set index); per view a linear network (dim -> dim ->
    d_v, dropout 0.1 on its output, as the authors') reconstructs the present view from h. The loss per
    sample is the squared error summed over its present views' dimensions plus lam times the authors'
    classification loss on h: class scores s_c(h_i) = h_i . (mean stored code of class c, the sample's own
    code left out), loss_i = 1[argmax_c s_c != y_i] + max_c s_c - s_y (0 when the prediction is right);
    a batch takes the mean over its samples (the authors sum over the full training set). Each step
    first refines the batch's codes with the networks fixed (code_steps Adam steps), stores them, then
    takes one optimizer step of the networks. A test sample's code is inferred from its present views by
    reconstruction alone (from the mean training code), the networks fixed; its class is argmax_c s_c(h)
    with the class means of all stored codes."""

    def __init__(self, encoders, num_classes, modalities, num_train, dim=None, lam=1.0, code_lr=0.05, code_steps=20):
        super().__init__(encoders, num_classes, modalities)
        dim = dim or encoders[0].dim                             # the codes' width: the encoders'
        self.decoders = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Linear(dim, d), nn.Dropout(0.1))
                                      for d in self.dims)
        self.register_buffer("codes", 0.1 * torch.randn(num_train, dim))
        self.register_buffer("labels", torch.full((num_train,), -1, dtype=torch.long))
        self.lam, self.code_lr, self.code_steps = lam, code_lr, code_steps

    def scores(self, h, idx=None):
        """h . class means of the stored codes (B, C); with idx, sample i's own stored code left out."""
        onehot = F.one_hot(self.labels.clamp_min(0), self.num_classes).to(h.dtype) * (self.labels >= 0)[:, None]
        sums, counts = onehot.T @ self.codes, onehot.sum(0)                # no boolean indexing: no host sync
        if idx is None:
            return h @ sums.T / counts.clamp_min(1)
        own = F.one_hot(self.labels[idx], self.num_classes).to(h.dtype) * (self.labels[idx] >= 0)[:, None]
        return (h @ sums.T - own * (h * self.codes[idx]).sum(1, keepdim=True)) / (counts - own).clamp_min(1)

    def class_loss(self, h, y, idx=None):
        s = self.scores(h, idx)
        wrong = (s.argmax(1) != y).to(s.dtype)
        return wrong + s.max(1).values - s.gather(1, y[:, None])[:, 0]

    def code_loss(self, h, xs, mask, y=None, idx=None):
        """Per sample: the squared error summed over its present views' dimensions (+ lam * class loss)."""
        loss = sum(((g(h) - x) ** 2).sum(1) * mask[:, m] for m, (g, x) in enumerate(zip(self.decoders, xs)))
        return loss if y is None else loss + self.lam * self.class_loss(h, y, idx)

    def refine_codes(self, h, xs, mask, y=None, idx=None):
        """code_steps Adam steps on the codes alone: the networks get no gradient and do not change."""
        h = h.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([h], lr=self.code_lr)
        with torch.enable_grad():
            for _ in range(self.code_steps):
                h.grad, = torch.autograd.grad(self.code_loss(h, xs, mask, y, idx).sum(), [h])
                opt.step()
        return h.detach()

    def train_step(self, xs, y, optimizer, mask=None, idx=None):
        mask = full_mask(xs) if mask is None else mask
        self.labels[job_batch(idx)] = job_batch(y)          # torchrun: every process stores the job's batch
        self.codes[job_batch(idx)] = job_batch(self.refine_codes(self.codes[idx], xs, mask, y, idx))
        loss = self.code_loss(self.codes[idx], xs, mask, y, idx).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def infer_codes(self, xs, mask):
        """Codes of new samples, from the mean training code."""
        return self.refine_codes(self.codes.mean(0).expand(len(xs[0]), -1), xs, mask)

    def classify(self, xs, mask):
        return self.scores(self.infer_codes(xs, mask))

    def unimodal_features(self, xs, mask=None):     # the code inferred from each view alone
        return [self.infer_codes(v, alone) for v, alone in views_alone(xs, mask)]

    def encoder_params(self):                       # no encoder: the codes are learned per sample
        return []


class TATE(MissingMethod):
    """Tag-Assisted Transformer Encoder (Zeng et al. 2022). Each present view becomes a token through its
    MLP encoder (a missing view's token is zeros); a tag token, an embedding of the pattern of missing
    views (tags()), and learned position embeddings join them; a transformer encoder mixes the tokens;
    per-view linear decoders reconstruct every known view from its output token (views hidden by
    hide_views included); a linear classifier reads the mean output token."""

    def __init__(self, encoders, num_classes, modalities, heads=4, layers=2, recon_weight=1.0, hide_prob=0.5):
        super().__init__(encoders, num_classes, modalities)
        self.encoders = nn.ModuleList(encoders)
        d, m = encoders[0].dim, len(encoders)
        self.tag = nn.Embedding(2 ** m, d)
        self.position = nn.Parameter(torch.zeros(m + 1, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoders = nn.ModuleList(nn.Linear(d, e.d_in) for e in encoders)
        self.classifier = nn.Linear(d, num_classes)
        self.recon_weight, self.hide_prob = recon_weight, hide_prob

    @staticmethod
    def tags(mask):
        """The missing-pattern code of every sample: bit m is set when view m is missing."""
        bits = 2 ** torch.arange(mask.shape[1], device=mask.device)
        return ((~mask).long() * bits).sum(1)

    def encode(self, xs, mask):
        tokens = [f(x) * mask[:, m:m + 1] for m, (f, x) in enumerate(zip(self.encoders, xs))]
        seq = torch.stack([self.tag(self.tags(mask))] + tokens, 1) + self.position
        return self.transformer(seq)

    def impute(self, xs, mask):
        out = self.encode(xs, mask)
        return [dec(out[:, 1 + m]) for m, dec in enumerate(self.decoders)]

    def classify(self, xs, mask):
        return self.classifier(self.encode(xs, mask).mean(1))

    def objective(self, xs, y, mask):
        seen = hide_views(mask, self.hide_prob)
        out = self.encode(xs, seen)
        recon = view_mse([dec(out[:, 1 + m]) for m, dec in enumerate(self.decoders)], xs, mask)
        return F.cross_entropy(self.classifier(out.mean(1)), y) + self.recon_weight * recon


# ======== 1e. The registry: a method's name, class, paper, the scripts that run it, its flags ========

@dataclass(frozen=True)
class Registered:
    cls: type
    paper: str
    scripts: tuple        # of av, it, ait (Table 5), missing (Table 6), clip (Table 7)
    flags: dict           # constructor keyword -> (flag, help[, argparse keywords]); see add_method_args
    fixed: dict           # constructor keywords the name sets (ogm_ge: ge=True)


REGISTRY = {}             # in the order of --method all, the report's columns and README's table


SCRIPTS = ("av", "it", "ait", "missing", "clip")


def register(name, cls, paper, scripts, flags=None, **fixed):
    """Method `name`: its class, paper, scripts (a space-separated list of SCRIPTS) and flags (constructor keyword ->
    (flag, help[, argparse keywords])), those of the nearest registered class it derives from first (an MLA with
    another loss keeps MLA's flags); `fixed`: constructor keywords the name sets."""
    if name in REGISTRY or not set(scripts.split()) <= set(SCRIPTS):
        raise ValueError(f"register({name!r}): " + (f"{name} is registered already" if name in REGISTRY else
                         f"scripts {scripts!r}: expected a space-separated list of {', '.join(SCRIPTS)}"))
    base = next((r.flags for c in cls.__mro__[1:] for r in REGISTRY.values() if r.cls is c), {})
    flags = {**base, **(flags or {})}
    if unknown := [kw for kw in flags if keyword_default(cls, kw) is inspect.Parameter.empty]:
        raise ValueError(f"register({name!r}): flags for {unknown}, which {cls.__name__}'s constructor does not take")
    REGISTRY[name] = Registered(cls, paper, tuple(scripts.split()), flags, fixed)


def keyword_default(cls, kw):
    """The default of constructor keyword `kw` of cls, or of the first base class whose constructor names it (a
    subclass passing **kwargs on); inspect.Parameter.empty when none does."""
    for c in cls.__mro__:
        p = inspect.signature(c).parameters.get(kw) if "__init__" in vars(c) else None
        if p is not None and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            return p.default
    return inspect.Parameter.empty


def methods_of(script):
    """The names of the methods a script runs ('av', 'it', 'ait', 'missing', 'clip'), in the registry's order."""
    return [name for name, r in REGISTRY.items() if script in r.scripts]


T5 = "av it ait"
OGM_FLAGS = {"alpha": ("alpha", "modulation strength"), "starts": ("modulation_starts", "first epoch modulated"),
             "ends": ("modulation_ends", "last epoch modulated")}
CONDITION = {"condition": ("condition", "the conditioning modality")}
RECON = {"recon_weight": ("recon_weight", "weight of the reconstruction (imagination) loss"),
         "hide_prob": ("hide_prob", "chance that a training sample with 2+ views has one hidden, to be imputed")}
CASCADE = {"widths": ("ae_widths", "widths of each residual AE's encoder (comma list)",
                      dict(type=lambda s: [int(v) for v in s.split(",")], default=[128, 64, 32])),
           "blocks": ("ae_blocks", "residual AEs in the cascade")}
LAYERS = {"layers": ("layers", "linear layers of its MLPs")}
CCA_REG = {"reg": ("cca_reg", "ridge added to the covariances")}
register("sum", Sum, "the sum of unimodal heads' logits", T5)
register("concat", Concat, "one head on the concatenated features", T5)
register("clip", Concat, "Table 7's CLIP: one head on both towers' features, trained jointly", "clip")
register("late_fusion", LateFusion, "independent unimodal models, their mean logits", T5 + " missing")
register("film", FiLM, "Perez et al., AAAI 2018", T5, CONDITION)
register("bigated", BiGated, "Kiela et al., 2018 (gated fusion)", T5, CONDITION)
register("ogm", OGM, "Peng et al., CVPR 2022, without GE", T5, OGM_FLAGS)
register("ogm_ge", OGM, "Peng et al., CVPR 2022", T5, OGM_FLAGS, ge=True)
register("qmf", QMF, "Zhang et al., ICML 2023", T5 + " missing", {"rank": (
    "qmf_rank", "its ranking loss: relu(t (c_i - c_j) + margin), the confidence-ranking loss QMF builds on; code: "
    "- margin, as the authors' code computes it", dict(choices=["paper", "code"]))})
register("cca", CCA, "Hotelling 1936; multiset CCA", "missing",
         {"dim": ("cca_dim", "canonical components kept"), **CCA_REG})
register("dcca", DCCA, "Andrew et al., ICML 2013", "missing",
         {"dim": ("dcca_dim", "output units per view (= canonical correlations)"), **CCA_REG})
register("dccae", DCCAE, "Wang et al., ICML 2015", "missing",
         {"dim": ("dcca_dim", "output units per view (= canonical correlations)"), **CCA_REG,
          "recon_weight": RECON["recon_weight"], **LAYERS})
register("ae", AE, "an autoencoder over the views", "missing", {**LAYERS, **RECON})
register("cra", CRA, "Tran et al., CVPR 2017", "missing", {**LAYERS, **CASCADE, **RECON})
register("mmin", MMIN, "Zhao et al., ACL 2021", "missing", {**CASCADE, **RECON})
register("if_mmin", IFMMIN, "Zuo et al., ICASSP 2023", "missing", {
    **CASCADE, **RECON, "cmd_weight": ("cmd_weight", "weight of the central moment discrepancy"),
    "cmd_order": ("cmd_order", "highest central moment in the CMD")})
register("cpm_net", CPMNet, "Zhang et al., CVPR 2019", "missing", {
    "lam": ("cpm_lambda", "weight of the classification loss on the codes"),
    "code_lr": ("code_lr", "Adam step size of the latent codes"),
    "code_steps": ("code_steps", "code refinement steps per batch and at test time")})
register("tate", TATE, "Zeng et al., SIGIR 2022", "missing", {
    "layers": ("tate_layers", "transformer encoder layers"), "heads": ("tate_heads", "attention heads"), **RECON})
register("mla", MLA, "Zhang et al., CVPR 2024; this paper", T5 + " missing clip", {
    "fusion": ("fusion", "test-time fusion: per-sample entropy weights; fixed weights; or the official code's "
                         "batch-axis entropy (one weight per batch)", dict(choices=["dynamic", "fixed", "dynamic_batch"])),
    "fusion_weights": ("fusion_weights", "weights for --fusion fixed (default 0.5 0.5; audio, image, text 0.35 0.25 "
                                         "0.4)", dict(type=float, nargs="+")),
    "hgm": ("hgm", "head-gradient projection (HGM) on", dict(off="HGM off (what the official code effectively runs)")),
    "hgm_alpha": ("hgm_alpha", "HGM alpha, a constant; default: 0.1 ** (1 + i/n) for batch i of n. A step absorbs the "
                               "share hbar'P hbar / (alpha + hbar'P hbar) of its direction: an alpha comparable to "
                               "hbar'P hbar absorbs it partly, so P fills up more slowly", dict(type=float)),
    "hgm_alpha_scale": ("hgm_alpha_scale", "alpha times the running mean of hbar'hbar (per modality): the share "
                                           "absorbed no longer depends on the features' units"),
    "hgm_forget": ("hgm_forget", "forgetting factor L in (0, 1] as in recursive least squares: P <- (P - k k' / "
                                 "(alpha + hbar'k)) / L, so absorbed directions come back (1: the paper's); as in RLS, "
                                 "a direction no step excites grows by 1/L a step (L^-t), so the head gradient can be "
                                 "amplified there: keep L near 1 for long runs")})
register("mmcosine", MMCosine, "Xu et al., ICASSP 2023", T5,
         {"scale": ("mmcosine_scale", "the cosine logits' scale (GeWu-Lab/MMCosine_ICASSP23's --scaling 10)")})
register("mmpareto", MMPareto, "Wei and Hu, ICML 2024", T5,
         {"gamma": ("mmpareto_gamma", "the final gradient scale (GeWu-Lab/MMPareto_ICML2024's 1.5)")})
register("agm", AGM, "Li et al., ICCV 2023", T5, {
    "alpha": ("agm_alpha", "modulation strength (AGM_ICCV2023's --alpha 1)"),
    "epochs": ("agm_epochs", "epochs that update the coefficients; later ones keep the last (AGM_ICCV2023's "
                             "--modulation_ends 20, its epochs counted from 1)")})
register("gblending", GBlending, "Wang et al., CVPR 2020 (online)", T5, {
    "super_epoch": ("gb_super_epoch", "epochs between weight estimates, each training a copy of every branch that "
                                      "long (GeWu-Lab/BalanceBenchmark's super_epoch 10; the authors publish no "
                                      "online code)"),
    "abs_gain": ("gb_abs_gain", "weigh a branch whose validation loss rose by |G| / O^2, as BalanceBenchmark "
                                "(default: ~0; the paper assumes a gain)")})
register("pmr", PMR, "Fan et al., CVPR 2023", T5, {
    "alpha": ("pmr_alpha", "weight of the weaker modality's prototype CE, times the paper's clip(1/rho - 1, 0, 1) "
                           "(Modal-Imbalance-PMR's --alpha 1; its released script weighs it alpha or 0)"),
    "mu": ("pmr_mu", "weight of the dominant modality's prototype entropy, summed over the batch (BalanceBenchmark "
                     "01458a1's PMR_PER mu 0.01, since removed; 0: none, as the authors' script)"),
    "entropy_ends": ("pmr_entropy_ends", "last epoch (from 0) with the entropy term (BalanceBenchmark 01458a1's "
                                         "norm_epoch 10)"),
    "ends": ("pmr_ends", "last epoch (from 0) with the prototype terms; plain concat after (the authors' released "
                         "CREMA-D and AVE runs: --modulation_ends 70)"),
    "val_prototypes": ("pmr_val_prototypes", "prototypes from the whole validation split, not a tenth of the "
                                             "training batches (the authors' AVE runs)"),
    "momentum": ("pmr_momentum", "share of the old prototype kept each epoch (the authors' runs: 0)"),
    "binary": ("pmr_binary", "coefficients 0 or 1 instead of the paper's clipped ratio; with --pmr_mu 0 the authors' "
                             "released script (main_Prototype_grad.py: alpha x the weaker modality's prototype CE)")})
register("reconboost", ReconBoost, "Hua et al., ICML 2024", T5, {
    "stage_epochs": ("reconboost_stage_epochs", "epochs of each modality's stage (default 4, huacong/ReconBoost's "
                                                "--epochs_per_stage; the toy sets: 1)", dict(default=None, type=int)),
    "correct_epochs": ("reconboost_correct_epochs", "epochs of the global rectification after each stage (default 4, "
                                                    "ReconBoost's --correct_epoch; the toy sets: 1)",
                       dict(default=None, type=int)),
    "weights": ("reconboost_weights", "the loss (w1 - w2 q_y) / C x CE; w2 weighs the reconcilement (ReconBoost's "
                                      "--weight1 5 --weight2 1 for CREMA-D)",
                dict(type=float, nargs=2, metavar=("W1", "W2"), default=[5.0, 1.0]))})


def build_method(name, encoders, num_classes, modalities, num_train=0, **options):
    """The registered method `name` on the encoders: its class with the keywords its name fixes, num_train (the
    training split's size, for the classes that take it: per-sample state) and `options`, constructor keywords
    (method_options gives them from the flags; the others keep the constructor's defaults)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(REGISTRY)}")
    r = REGISTRY[name]
    takes = inspect.signature(r.cls).parameters
    return r.cls(encoders, num_classes, modalities, **({"num_train": num_train} if "num_train" in takes else {}),
                 **r.fixed, **options)


def method_options(name, args):
    """The constructor keywords of method `name` from its flags' values in args (add_method_args)."""
    return {kw: getattr(args, f[0]) for kw, f in REGISTRY[name].flags.items()}


# ======== 2. Encoders.  2a. torchvision ResNet-18 for audio and video, the initialisation ========

def init_weights(module):
    """The paper's init: Kaiming-normal (fan_out) convs, Xavier-normal linear layers, zero biases."""
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


def init_heads(method):
    """The paper's init for everything of a method but its encoders (pretrained or self-initialised ones
    keep their weights): the heads, fusion layers and projections."""
    for name, child in method.named_children():
        if name != "encoders":
            child.apply(init_weights)


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
    dim, in_channels = 512, 1

    def __init__(self):
        super().__init__()
        self.net = resnet18_trunk(self.in_channels)

    def forward(self, x):
        return self.net(x)


class VideoResNet(AudioResNet):
    """Frames (B, T, 3, H, W) folded into the batch -> (B, 512), averaged over time and space."""
    in_channels = 3

    def forward(self, x):
        b, t = x.shape[:2]
        return self.net(x.flatten(0, 1)).view(b, t, -1).mean(1)


# ======== 2b. Image and text: M3AE-shaped encoders, their checkpoints, transformers models and tokenizers ========

# M3AE-shaped encoder in plain PyTorch (weights: young-geng/m3ae_public). Parameter names follow the official
# conversion of the M3AE JAX weights to PyTorch (cls_token, image_embedding, text_embedding, encoder_{image,text}_type_embedding,
# encoder.blocks.<i>.{layer_norm1, attention.qkv_linear, attention.fc, layer_norm2, transformer_mlp.fc1,
# transformer_mlp.fc2}, encoder.layer_norm), so such a state dict loads as it is; `python common.py convert_m3ae` writes
# one from the released JAX pickle (tests/test_weights.py: the authors' JAX model's outputs to 1e-5). As in the JAX model:
# LayerNorm eps 1e-6, tanh-approximated GELU, patches flattened as (row, column, channel).

def xavier_init(module, embedding_std=None):
    """The transformers' initialisation, in module order: Xavier-uniform linear layers with zero biases,
    LayerNorms at (1, 0), and embeddings N(0, embedding_std) when one is given."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif embedding_std is not None and isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, embedding_std)


def sincos_1d(dim, positions):
    """Fixed position embedding (len, dim): [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], 1).float()


def sincos_2d(dim, grid, cols=None):
    """(grid * cols, dim) for a grid of `grid` rows and `cols` columns (default: square) in row-major
    order; the first half of the width encodes the patch's column, the second half its row (the
    MAE/M3AE/CAV-MAE convention)."""
    cols = cols or grid
    return torch.cat([sincos_1d(dim // 2, torch.arange(cols).repeat(grid)),
                      sincos_1d(dim // 2, torch.arange(grid).repeat_interleave(cols))], 1)


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
    def __init__(self, dim, hidden, gelu="tanh"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gelu = gelu                # GELU approximation: 'tanh' (M3AE) or 'none' (exact, CAV-MAE)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class M3AEBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, eps=1e-6, gelu="tanh"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.attention = M3AEAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.transformer_mlp = M3AEMLP(dim, mlp_ratio * dim, gelu)

    def forward(self, x, keep=None):
        x = x + self.attention(self.layer_norm1(x), keep)
        return x + self.transformer_mlp(self.layer_norm2(x))


class M3AETransformer(nn.Module):
    """Pre-norm transformer blocks and a final LayerNorm (M3AE's defaults: eps 1e-6, tanh GELU)."""

    def __init__(self, dim, depth, heads, mlp_ratio, eps=1e-6, gelu="tanh"):
        super().__init__()
        self.blocks = nn.ModuleList(M3AEBlock(dim, heads, mlp_ratio, eps, gelu) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, keep=None):
        for block in self.blocks:
            x = block(x, keep)
        return self.layer_norm(x)


class M3AEEncoder(nn.Module):
    """One modality of an M3AE-base-shaped encoder (the paper's image-text encoder): CLS token + the modality's tokens (linear
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
        self._positions = {}                # (kind, n, device) -> position table, see position_table
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
        xavier_init(self, embedding_std=1.0)
        for name, p in self.named_parameters(recurse=False):
            nn.init.normal_(p, 0.0, 0.02)

    def position_table(self, kind, n, device):
        """The fixed sin-cos positions of n text tokens or an n x n patch grid, built once per device
        (a CPU-built table copied to the GPU on every forward would wait for the GPU each time)."""
        cache = self._positions
        key = (kind, n, str(device))
        if key not in cache:
            table = sincos_2d(self.dim, n) if kind == "image" else sincos_1d(self.dim, torch.arange(n))
            cache[key] = table.to(device)
        return cache[key]

    def forward(self, x):
        if self.modality == "image":
            patches = patchify(x, self.patch_size)
            grid = int(round(patches.shape[1] ** 0.5))
            if grid * grid != patches.shape[1]:
                raise ValueError(f"M3AE needs square images; got {tuple(x.shape[-2:])}")
            pos = self.position_table("image", grid, x.device).to(x.dtype)
            tokens = self.image_embedding(patches) + pos + self.encoder_image_type_embedding
            keep = None
        else:
            ids, pad = x[:, 0], x[:, 1]
            pos = self.position_table("text", ids.shape[1], x.device)
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


def read_state_dict(path, model):
    """The state dict (parameter name -> tensor) in the PyTorch file `path`: a training checkpoint's
    'state_dict'/'model' entry is unwrapped and a 'module.' prefix dropped. `model` names the weights
    in the error messages."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: {model} checkpoint not found; expected a converted PyTorch state dict") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a loadable PyTorch state dict ({str(e)[:200]})") from None
    while isinstance(sd, dict) and not all(torch.is_tensor(v) for v in sd.values()) and any(
            isinstance(sd.get(k), dict) for k in ("state_dict", "model")):      # a training checkpoint
        sd = next(sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict))
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise DataError(f"{path}: expected a state dict (parameter name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_reported(module, sd, path, model, what, hint, partial=False):
    """Load `sd` into `module` once every tensor it shares with the module has the module's shape (else a
    DataError ending with `hint`) and, unless `partial`, every tensor of the module is in `sd` (else a one-line
    DataError naming the missing keys and the checkpoint's other keys); keys the module lacks are left out.
    Print and return (missing, unexpected) keys."""
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise DataError(f"{path}: {len(bad)} tensors do not fit the {what} (checkpoint vs model: {_short(bad, 4)}); "
                        f"{hint}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing and not partial:
        raise DataError(f"{path}: {len(missing)} of the {what}'s {len(own)} tensors are not in the {model} checkpoint "
                        f"({_short(missing, 4)}); " + (f"it holds {_short(unexpected, 4)} instead" if unexpected else
                                                      "it holds no others" if sd else "it is empty") +
                        f"; {hint}, or pass --partial_ckpt to leave the missing ones at their random init")
    module.load_state_dict(sd, strict=False)
    print(f"{model} {what} <- {path}: {len(sd) - len(unexpected)} tensors loaded; "
          f"missing keys: {_short(missing)}; unexpected keys: {_short(unexpected)}")
    return missing, unexpected


def load_m3ae_checkpoint(encoder, path, partial=False):
    """Load a converted M3AE PyTorch state dict (optionally under 'state_dict' or 'model', keys possibly
    prefixed 'module.') into one M3AEEncoder. The other modality's input layers are not used by this
    encoder and are left out. Every tensor of the encoder must be in it unless `partial`; prints and returns
    (missing, unexpected) keys; a tensor whose shape does not fit (width, depth, patch, vocabulary) is an error."""
    sd = read_state_dict(path, "M3AE")
    other = ("text_embedding.", "encoder_text_type_embedding") if encoder.modality == "image" else \
        ("image_embedding.", "encoder_image_type_embedding")
    sd = {k: v for k, v in sd.items() if not k.startswith(other)}
    return load_reported(encoder, sd, path, "M3AE", f"{encoder.modality} encoder",
                         "set --m3ae_dim/--m3ae_depth/--m3ae_heads/--patch_size/--vocab_size to the checkpoint's "
                         "(a JAX pickle: convert it with python common.py convert_m3ae)", partial)


# ---- M3AE's released JAX pickles -> the state dict above, without JAX
# m3ae_main.py saves cloudpickle({"step", "epoch", "variant", "state"}), state a flax TrainState whose
# params["params"] hold the arrays (jax.device_get: numpy). The encoder's: cls_token, encoder_{image,text}_type_embedding,
# image_embedding/{kernel, bias}, text_embedding/embedding, encoder/Block_<i>/<part>/{kernel, scale, bias},
# encoder/LayerNorm_0; Dense kernels are (in, out), nn.Linear weights (out, in). The decoder is left out.

M3AE_BLOCK = {"LayerNorm_0": "layer_norm1", "Attention_0/Dense_0": "attention.qkv_linear",
              "Attention_0/Dense_1": "attention.fc", "LayerNorm_1": "layer_norm2",
              "TransformerMLP_0/fc1": "transformer_mlp.fc1", "TransformerMLP_0/fc2": "transformer_mlp.fc2"}
M3AE_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
M3AE_HEADS = {"small": 6, "base": 12, "large": 16, "huge": 16}      # model.py's get_transformer_by_config
NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer")}


class PickleStub:
    """Stands for every class and function of a pickle other than numpy's array builders: keeps the arguments and
    state the pickle hands it and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __call__(self, *args, **kwargs):
        return PickleStub(*args)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves numpy's array, dtype and scalar builders (numpy 1 names 'numpy.core.*' read under numpy 2 and
    back); every other global becomes a PickleStub subclass of that name, so no pickled code runs."""

    def find_class(self, module, name):
        key = (re.sub(r"^numpy\.core\b", "numpy._core", module), name)
        if key not in NUMPY_GLOBALS:
            return type(name, (PickleStub,), {"__module__": module})
        if np.lib.NumpyVersion(np.__version__) < "2.0.0":
            key = (key[0].replace("numpy._core", "numpy.core"), name)
        return getattr(importlib.import_module(key[0]), name)


def unstub(x):
    """The dict a PickleStub stands for (a dataclass's state such as a TrainState's, a FrozenDict's argument);
    anything else as it is."""
    while isinstance(x, PickleStub):
        state = getattr(x, "state", None)
        if isinstance(state, tuple):                            # (dict, slots) of a class with __slots__
            state = next((s for s in state if isinstance(s, dict)), None)
        x = state if isinstance(state, dict) else x.args[0] if x.args else None
    return x


def flat_params(tree, prefix=""):
    """Nested dicts (or stubs of them) -> {'a/b/c': leaf}."""
    tree = unstub(tree)
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for name, sub in tree.items() for k, v in flat_params(sub, f"{prefix}{name}/").items()}


def read_m3ae_pickle(path):
    """(flat parameters 'encoder/Block_0/LayerNorm_0/scale' -> numpy array, variant dict) of an M3AE pickle as
    m3ae_main.py saves it, read with NumpyOnlyUnpickler (no JAX, flax or cloudpickle needed)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = NumpyOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"{path}: M3AE pickle not found") from None
    except Exception as e:                     # a stub or numpy builder given what it cannot take: not such a file
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {str(e)[:200]})") from None
    state = unstub(data.get("state")) if isinstance(data, dict) else None
    params = unstub(state.get("params")) if isinstance(state, dict) else None
    params = unstub(params.get("params")) if isinstance(params, dict) else None
    if not isinstance(params, dict):
        raise DataError(f"{path}: expected an M3AE pickle as m3ae_main.py saves it, a dict whose 'state' holds "
                        "params['params']")
    variant = data.get("variant")
    return flat_params(params), variant if isinstance(variant, dict) else {}


def m3ae_torch_name(name):
    """M3AEEncoder's name for an M3AE JAX parameter path ('encoder/Block_3/Attention_0/Dense_0/kernel' ->
    'encoder.blocks.3.attention.qkv_linear.weight'); None for the decoder's and the mask embeddings."""
    if name in ("cls_token", "encoder_image_type_embedding", "encoder_text_type_embedding"):
        return name
    module, _, leaf = name.rpartition("/")
    block = re.fullmatch(r"encoder/Block_(\d+)/(.+)", module)
    if block and block.group(2) in M3AE_BLOCK:
        module = f"encoder.blocks.{block.group(1)}.{M3AE_BLOCK[block.group(2)]}"
    elif module == "encoder/LayerNorm_0":
        module = "encoder.layer_norm"
    elif module not in ("image_embedding", "text_embedding"):
        return None
    return f"{module}.{M3AE_LEAF[leaf]}" if leaf in M3AE_LEAF else None


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub can be asked for a download: False at once in offline mode or without a
    network (a download tried then fails only after about a minute of retries)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True                             # only the proxy knows
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def from_local_or_hub(load, name_or_path, what, hint):
    """load(name, local_files_only=...) (a transformers from_pretrained): a folder or the local HF cache first (no
    network, an answer at once), the hub only when it can be reached; a failure is a one-line DataError naming
    the `what` and ending with `hint`."""
    try:
        try:
            return load(str(name_or_path), local_files_only=True)
        except (OSError, ValueError):
            p, name = Path(name_or_path), str(name_or_path)
            if p.exists():
                raise
            if p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:      # a path, not a hub name
                raise DataError(f"{name_or_path}: no such {what} folder; {hint}") from None
            if not hub_reachable():
                raise DataError(f"{name_or_path}: no such {what} folder, not in the Hugging Face cache, and the hub "
                                f"cannot be reached; {hint}") from None
        return load(str(name_or_path))
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]                     # one line
        raise DataError(f"{name_or_path}: cannot load a {what} ({type(e).__name__}: {why}); {hint} (a hub name "
                        "needs internet or the Hugging Face cache)") from None


def load_tokenizer(name_or_path):
    """A transformers tokenizer: a folder holding only a BERT vocab.txt (read as BERT uncased), a saved
    tokenizer folder, or a hub name: from the local HF cache, else downloaded when the hub can be reached."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")      # data-loader workers fork after use
    from transformers import AutoTokenizer, BertTokenizer
    p = Path(name_or_path)
    if p.is_dir() and (p / "vocab.txt").is_file() and not any(
            (p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return BertTokenizer.from_pretrained(str(p), do_lower_case=True)
    return from_local_or_hub(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", "pass --tokenizer with a local "
                             "folder holding a BERT uncased vocab.txt or a saved transformers tokenizer")


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


def m3ae_encoders(modalities=("image", "text"), vocab_size=30522, m3ae=(768, 12, 12, 4, 16), ckpt=None, partial=False):
    """The image and/or text encoders, one per modality: M3AE-shaped transformers of m3ae = (width, depth, heads,
    MLP ratio, patch side), from the ckpt state dict (default: random, with a warning; tensors missing from it are
    an error unless `partial`)."""
    encoders = [M3AEEncoder(m, *m3ae, vocab_size) for m in modalities]
    if ckpt:
        for e in encoders:
            load_m3ae_checkpoint(e, ckpt, partial)
    else:
        warn_once("WARNING: no --m3ae_ckpt: the M3AE encoders start from RANDOM weights (the paper fine-tunes "
                  "pretrained M3AE-base; see README for the weights)")
    return encoders


def hf_encoders(modalities=("image", "text"), models=None, pool="mean", image_size=224, proj_dim=None):
    """The image and/or text encoders, one per modality, of one width: transformers models (models: {modality: local
    folder or hub name}) pooled by `pool` (mean | pooler), the narrower projected to proj_dim (default: the widest's
    width)."""
    names = models or {}
    absent = [f"--{m}_model" for m in modalities if not names.get(m)]
    if absent:
        raise DataError(f"--encoder hf needs {' and '.join(absent)} (a local folder or a hub name)")
    encoders = [HFEncoder(names[m], m, pool, image_size) for m in modalities]
    dim = proj_dim or max(e.width for e in encoders)
    for e in encoders:
        e.project_to(dim)
    return encoders


def image_text_encoders(kind, raw_text, tokenizer=None, vocab_size=None, image_size=224, max_len=256, **encoder):
    """The image and text encoders (m3ae_encoders or hf_encoders by `kind`, with **encoder) and ITDataset's text settings:
    the tokenizer when some text is raw (`tokenizer`, a folder or hub name; default bert-base-uncased for
    m3ae, the text model's for hf), whether to add special tokens (hf only) and the vocabulary size."""
    tok = None
    if raw_text:
        tok = load_tokenizer(tokenizer or {"m3ae": "bert-base-uncased",
                                           "hf": (encoder.get("models") or {}).get("text")}[kind])
    vocab_size = vocab_size or (len(tok) if tok is not None else 30522)
    encoders = m3ae_encoders(("image", "text"), vocab_size, **encoder) if kind == "m3ae" else \
        hf_encoders(("image", "text"), image_size=image_size, **encoder)
    if kind == "hf":
        vocab_size = getattr(encoders[1].model.config, "vocab_size", None)
    return encoders, dict(image_size=image_size, max_len=max_len, tokenizer=tok, special_tokens=kind == "hf",
                          vocab_size=vocab_size)


# ======== 2c. CAV-MAE's audio transformer and its checkpoint loader; the A-I-T audio encoder ========

# The audio branch of CAV-MAE as the MLA code runs it for IEMOCAP: the fbank turned to (mel bins x frames),
# 16 x 16 patches by a strided convolution, fixed 2-D sin-cos positions (rows = frequency, columns = time),
# the audio modality embedding, 11 audio blocks and 1 shared block with its audio LayerNorms, the audio
# LayerNorm, the mean over the patches (no CLS token). The blocks are section 4b's, with CAV-MAE's LayerNorm
# eps 1e-5 and exact GELU; the checkpoint loader renames CAV-MAE's keys to them.

class CAVMAEAudioEncoder(nn.Module):
    """Fbank (B, 1, T, F) -> (B, dim), CAV-MAE's audio branch (the paper's IEMOCAP audio encoder); T and F whole multiples of the patch."""

    def __init__(self, dim=768, depth=12, heads=12, mlp_ratio=4, patch_size=16, audio_len=1024, num_mel_bins=128):
        super().__init__()
        if audio_len % patch_size or num_mel_bins % patch_size:
            raise ValueError(f"a {audio_len} x {num_mel_bins} fbank is not a whole number of {patch_size} x "
                             f"{patch_size} patches")
        if dim % heads or dim % 4:
            raise ValueError(f"CAV-MAE width {dim} must be a multiple of 4 and of the head count {heads}")
        self.dim, self.patch_size = dim, patch_size
        self.patch_embed = nn.Conv2d(1, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(dim, num_mel_bins // patch_size, audio_len // patch_size)[None])
        self.modality_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = M3AETransformer(dim, depth, heads, mlp_ratio, eps=1e-5, gelu="none")
        self.reset_parameters()

    def reset_parameters(self):
        """CAV-MAE's initialisation: Xavier-uniform linear layers and patch embedding (as a matrix), N(0, 0.02)
        modality embedding."""
        xavier_init(self)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.dim, -1))
        nn.init.normal_(self.modality_embedding, 0.0, 0.02)

    def forward(self, x):
        h = self.patch_embed(x.transpose(2, 3))                       # (B, dim, F / p, T / p)
        h = h.flatten(2).transpose(1, 2) + self.pos_embed + self.modality_embedding
        return self.encoder(h).mean(1)


CAVMAE_TOP = {"patch_embed_a.proj.weight": "patch_embed.weight", "patch_embed_a.proj.bias": "patch_embed.bias",
              "pos_embed_a": "pos_embed", "modality_a": "modality_embedding",
              "norm_a.weight": "encoder.layer_norm.weight", "norm_a.bias": "encoder.layer_norm.bias"}
CAVMAE_BLOCK = {"attn.qkv": "attention.qkv_linear", "attn.proj": "attention.fc", "mlp.fc1": "transformer_mlp.fc1",
                "mlp.fc2": "transformer_mlp.fc2"}
CAVMAE_NORMS = {"a": {"norm1": "layer_norm1", "norm2": "layer_norm2"},           # audio blocks: their own norms
                "u": {"norm1_a": "layer_norm1", "norm2_a": "layer_norm2"}}       # shared blocks: the audio norms
CAVMAE_UNUSED = re.compile(r"(patch_embed_v|pos_embed_v|modality_v|blocks_v\.|norm_v\.|norm\.|blocks_[au]\.\d+\.norm)")


def cavmae_name(key, n_audio_blocks):
    """This encoder's name for a CAV-MAE state dict key; None for a tensor the audio-only path does not use
    (the visual branch, the unified and visual LayerNorms); any other key as it is. blocks_a.<i> become
    blocks i, blocks_u.<j> blocks n_audio_blocks + j."""
    if key in CAVMAE_TOP:
        return CAVMAE_TOP[key]
    m = re.fullmatch(r"blocks_([au])\.(\d+)\.(\w+|attn\.\w+|mlp\.\w+)\.(weight|bias)", key)
    if m:
        branch, i, part, kind = m.groups()
        name = CAVMAE_NORMS[branch].get(part) or CAVMAE_BLOCK.get(part)
        if name:
            return f"encoder.blocks.{int(i) + (n_audio_blocks if branch == 'u' else 0)}.{name}.{kind}"
    return None if CAVMAE_UNUSED.match(key) else key


def load_cavmae_checkpoint(encoder, path, partial=False):
    """Load the audio branch of a CAV-MAE PyTorch checkpoint (pretrained or fine-tuned, as the CAV-MAE code saves
    it; a 'state_dict'/'model' wrapper and a 'module.' prefix are accepted) into a CAVMAEAudioEncoder; a state
    dict saved from this encoder loads too. Every tensor of the encoder must be in it unless `partial`. Prints and
    returns (missing keys, in this encoder's names; unexpected keys, in the checkpoint's); a tensor whose shape does
    not fit is an error."""
    sd = read_state_dict(path, "CAV-MAE")
    n_audio = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks_a\.(\d+)\.", k))), default=-1)
    own, renamed = encoder.state_dict(), {}
    for k, v in sd.items():
        name = cavmae_name(k, n_audio)
        if name is not None:
            renamed[name if name in own else k] = v
    return load_reported(encoder, renamed, path, "CAV-MAE", "audio encoder", "set --cavmae_dim/--cavmae_depth/"
                         "--cavmae_heads/--cavmae_patch/--audio_len/--num_mel_bins to the checkpoint's", partial)


class Projected(nn.Module):
    """An encoder followed by a linear map to `dim` (Xavier-normal), to give the modalities one width."""

    def __init__(self, encoder, dim):
        super().__init__()
        self.encoder, self.dim = encoder, dim
        self.proj = nn.Linear(encoder.dim, dim)
        init_weights(self.proj)

    def forward(self, x):
        return self.proj(self.encoder(x))


def build_ait_audio_encoder(kind, dim, cavmae=(768, 12, 12, 4, 16), audio_len=1024, num_mel_bins=128, ckpt=None,
                            partial=False):
    """The A-I-T audio encoder, projected to `dim` when its width differs. kind "resnet18": AudioResNet;
    "cavmae": CAV-MAE's audio branch of cavmae = (width, depth, heads, MLP ratio, patch side) over
    (audio_len, num_mel_bins) fbanks, from the ckpt checkpoint (default: random, with a warning; tensors
    missing from it are an error unless `partial`)."""
    if kind == "resnet18":
        enc = AudioResNet()
        enc.apply(init_weights)
    else:
        enc = CAVMAEAudioEncoder(*cavmae, audio_len, num_mel_bins)
        if ckpt:
            load_cavmae_checkpoint(enc, ckpt, partial)
        else:
            warn_once("WARNING: no --cavmae_ckpt: the CAV-MAE audio encoder starts from RANDOM weights (the paper "
                      "fine-tunes pretrained CAV-MAE; see README for the weights)")
    return enc if enc.dim == dim else Projected(enc, dim)


# ======== 2d. CLIP towers (transformers' CLIPModel) and the toy CLIP ========

# transformers' CLIPModel towers (a local folder or a hub name) as fixed feature extractors: each split's
# image and text features are computed once and cached on disk, and the Table 7 heads (concat = joint
# training, mla) train on them. With --finetune the towers themselves are the encoders.

CLIP_FEATURES = ["embeds", "pooled"]


class CLIPTower(nn.Module):
    """One tower of a CLIPModel: pixels (B, 3, S, S) -> image features, or text (B, 2, L) = token ids and
    padding mask (1 on padding) -> text features. feature='embeds': CLIP's joint embedding (the pooled
    output through the tower's projection); 'pooled': the pooled output itself (the image's CLS token,
    the text's end-of-text token, after the final LayerNorm). `dim` is the output width."""

    def __init__(self, model, modality, feature="embeds"):
        super().__init__()
        if modality == "image":
            self.model, self.projection = model.vision_model, model.visual_projection
            self.image_size = model.config.vision_config.image_size
        else:
            self.model, self.projection = model.text_model, model.text_projection
        self.modality, self.feature = modality, feature
        self.dim = self.projection.out_features if feature == "embeds" else self.projection.in_features

    def forward(self, x):
        if self.modality == "image":
            other_size = tuple(x.shape[-2:]) != (self.image_size, self.image_size)
            out = self.model(pixel_values=x, interpolate_pos_encoding=other_size)
        else:
            out = self.model(input_ids=x[:, 0], attention_mask=(x[:, 1] == 0).long())
        z = out.pooler_output
        return self.projection(z) if self.feature == "embeds" else z


class CLIPModalityEncoder(nn.Module):
    """One modality's encoder for the Table 7 methods: features (cached ones, or those of `tower` with
    --finetune), optionally L2-normalised, then a linear projection to `dim` when that differs from their
    width (the two modalities must share one width for MLA's head)."""

    def __init__(self, width, dim=None, normalize=False, tower=None):
        super().__init__()
        self.tower, self.normalize, self.width, self.dim = tower, normalize, width, dim or width
        self.proj = nn.Identity() if self.dim == width else nn.Linear(width, self.dim)

    def forward(self, x):
        z = x if self.tower is None else self.tower(x)
        if self.normalize:
            z = F.normalize(z, dim=1)
        return self.proj(z)


def _hash(*parts):
    import hashlib
    h = hashlib.sha1()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _config_key(d):
    """A model config as a dict without the entries that do not change what it computes (where it was
    loaded from, the transformers version, the dtype it was saved in)."""
    drop = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    return {k: _config_key(v) if isinstance(v, dict) else v for k, v in d.items() if k not in drop}


class CLIPBundle:
    """A CLIPModel with its image processor and tokenizer: the inputs they make, the towers, and the keys
    of the feature cache (model = its config and a hash of its weights; data = each item's image file
    (path, size, modification time) or text; preprocessing = the processor's settings, the tokenizer's
    vocabulary, special tokens and behaviour, max_len, the feature kind)."""
    VERSION = 1     # bump when the extraction code changes

    def __init__(self, model, processor, tokenizer, name, max_len=None, image_size=None, feature="embeds"):
        positions = model.config.text_config.max_position_embeddings
        max_len = max_len or positions
        if max_len > positions:
            raise DataError(f"{name}: --max_len {max_len} is longer than the model's {positions} text positions")
        if image_size and processor.crop_size.get("height") != image_size:
            processor = type(processor).from_dict({**processor.to_dict(), "size": {"shortest_edge": image_size},
                                                   "crop_size": {"height": image_size, "width": image_size}})
        self.model, self.processor, self.tokenizer = model.eval(), processor, tokenizer
        self.name, self.max_len, self.feature = str(name), max_len, feature
        self._fingerprint = None

    def tower(self, modality):
        return CLIPTower(self.model, modality, self.feature)

    def fingerprint(self):
        """sha1 of the model's config and of every weight tensor (name, dtype, shape, bytes)."""
        if self._fingerprint is None:
            import hashlib
            h = hashlib.sha1(_hash(_config_key(self.model.config.to_dict())).encode())
            for k, t in self.model.state_dict().items():
                t = t.detach().cpu().contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def preprocessing(self, modality):
        if modality == "image":
            return {"processor": self.processor.to_dict()}
        tok = self.tokenizer
        return {"tokenizer": type(tok).__name__, "vocab": _hash(sorted(tok.get_vocab().items())),
                "special": tok.all_special_ids, "max_len": self.max_len, "padding_side": tok.padding_side,
                "truncation_side": tok.truncation_side,
                "probe": tok("A Crème-Brûlée, 2 TACOS & naïve ramen!!")["input_ids"]}

    def cache_key(self, modality, pairs):
        """16 hex digits naming the features of `pairs` for `modality`."""
        if modality == "image":
            items = []
            for p in pairs:
                s = os.stat(p.image)
                items.append(f"{p.image}|{s.st_size}|{s.st_mtime_ns}")
        else:
            items = [p.text for p in pairs]
        return _hash({"version": self.VERSION, "model": self.fingerprint(), "modality": modality,
                      "feature": self.feature, "preprocessing": self.preprocessing(modality)}, items)[:16]


def load_clip(name_or_path, tokenizer=None, max_len=None, image_size=None, feature="embeds"):
    """A CLIPBundle from a local folder written by save_pretrained or a hub name (from the Hugging Face cache,
    else downloaded when the hub can be reached). The image processor is the folder's (CLIP's standard one for
    the model's image size when the folder has none); the tokenizer is the folder's or `tokenizer`'s."""
    from transformers import CLIPImageProcessor, CLIPModel
    model = from_local_or_hub(CLIPModel.from_pretrained, name_or_path, "CLIP model", "pass --clip_model a local "
                              "folder written by save_pretrained (or a hub name such as openai/clip-vit-base-patch32)")
    try:
        processor = from_local_or_hub(CLIPImageProcessor.from_pretrained, name_or_path, "CLIP image processor", "")
    except DataError:
        side = model.config.vision_config.image_size
        print(f"{name_or_path}: no image processor settings (preprocessor_config.json); using CLIP's standard "
              f"ones: bicubic resize of the short side to {side}, centre crop, CLIP mean and std")
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return CLIPBundle(model, processor, load_tokenizer(tokenizer or name_or_path), name_or_path, max_len,
                      image_size, feature)


def toy_clip(tokenizer, image_size=32, patch_size=8, sizes=(32, 2, 2), max_len=16, seed=0, feature="embeds"):
    """A tiny randomly initialised CLIP of sizes = (width, layers, heads) built in memory from a CLIPConfig (no
    download), for the toy set:
    the text tower's vocabulary and special tokens are `tokenizer`'s (the toy's BERT vocabulary, [CLS]
    first, pooled at [SEP]); the image processor is CLIP's at `image_size`. Its weights depend only on
    `seed`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    width, layers, heads = sizes
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=max_len, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **tower),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower), projection_dim=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return CLIPBundle(model, processor, tokenizer, "toy-clip", max_len, None, feature)


# ======== 3. Data.  3a. Files (full disk, atomic writes, checksums), WAV, fbank, frames, transforms, splits, toys ========

class DiskFull(OSError):
    """A file could not be written because its disk is full. Written files are replaced atomically, so
    the previous version of the file (a checkpoint, say) is still there."""

    def __init__(self, message):
        super().__init__(errno.ENOSPC, message)

    def __reduce__(self):                     # one argument: it crosses a process pool's pipe intact
        return DiskFull, (self.strerror,)


def free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def mb(n):
    return "?" if n is None else f"{n / 2**20:,.0f} MB"


def atomic_write(path, write, ready=None):
    """Write a file so that a crash at any moment leaves either the old file or the new one:
    write(f) into a temporary file beside it, flush and fsync, ready(temporary path) when given, then rename
    over the old one. The file gets the umask's permissions, as open() would give it. MLA_NO_FSYNC=1
    (the tests set it) leaves out the fsync, which only guards against a power loss, not a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)   # 0o666 & ~umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if os.environ.get("MLA_NO_FSYNC") != "1":
                os.fsync(f.fileno())
        if ready is not None:
            ready(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        # torch.save reports a short write as a RuntimeError ("unexpected pos ..."), not as ENOSPC
        free = free_bytes(path.parent) if isinstance(e, (OSError, RuntimeError)) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (free is not None
                                                                                   and free < 2**20):
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
            raise DiskFull(f"could not write {path}: its disk is full ({mb(free)} free; {type(e).__name__}: "
                           f"{e}); {kept}. Free some space, or write elsewhere (--out_dir, --cache_dir), and "
                           "rerun the same command (with --resume a run continues after its last finished epoch)"
                           ) from e
        raise


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_dump(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def checksum(data, chunk=1 << 24):
    """CRC-32 of the CRC-32s of a 1-D uint8 array's 16 MB chunks, as 8 hex digits. Every byte is read, by
    up to 8 threads (zlib lets go of the GIL), at 1-2 GB/s a core (sha1 runs at about half that, blake2b
    at a quarter); damage to a chunk goes unseen with probability 2**-32."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        crcs = pool.map(lambda at: zlib.crc32(data[at:at + chunk]).to_bytes(4, "little"), range(0, len(data), chunk))
        return f"{zlib.crc32(b''.join(crcs)):08x}"


def file_checksum(path, chunk=1 << 24):
    return checksum(np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8), chunk)


def tensor_checksum(t):
    return checksum(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def cache_damaged(path, why, folder, elsewhere):
    """A cache file that failed its check: one line saying why before it is built again; when `folder`
    (where it would be rebuilt) is read-only, a one-line error saying what to do instead."""
    if not os.access(folder, os.W_OK):
        raise DataError(f"{path}: {why}; the cache cannot be rebuilt in read-only {folder}: {elsewhere}")
    print(f"warning: {path}: {why}; building it again", file=sys.stderr, flush=True)


def where(path, line=None):
    return f"{path}:{line}" if line is not None else f"{path}"


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
    # only \n (and \r\n) ends a line: str.splitlines would also split at U+2028, U+2029 and U+0085,
    # which JSON allows unescaped inside a string (a tweet's text in a .jsonl file)
    return [(i, s.strip()) for i, s in enumerate(text.split("\n"), 1) if s.strip()]


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

    Returns (mono float32 numpy array in [-1, 1], sample_rate). Multi-channel audio is averaged. Plain PCM
    is read with the standard library's wave; wave (Python 3.11) refuses IEEE float and
    WAVE_FORMAT_EXTENSIBLE files, whose samples are read from the data chunk that wav_info found.
    """
    tag, channels, rate, bits, offset, n = wav_info(path)
    try:
        with wave.open(str(path), "rb") as w:
            pcm = w.readframes(n)
    except wave.Error:
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


def write_wav(path, samples, rate):
    """Write mono audio as 16-bit PCM to a path or an open binary file: int16 samples as they are, float
    ones in [-1, 1] scaled (fixtures, the toy set)."""
    x = np.asarray(samples)
    pcm = x if x.dtype == np.int16 else (np.clip(x.astype(np.float32), -1, 1) * 32767).astype(np.int16)
    with wave.open(path if hasattr(path, "write") else str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.astype("<i2").tobytes())


def pad_or_cut(x, length):
    """Zero-pad or cut a (T, F) tensor along T to `length` rows."""
    t = x.shape[0]
    if t < length:
        return F.pad(x, (0, 0, 0, length - t))
    return x[:length]


def wav_to_fbank(samples, rate, num_mel_bins=128, target_len=1024):
    """Kaldi-compatible log-mel fbank (the paper's audio input): 16 kHz, 25 ms Hanning window, 10 ms shift, dither 0,
    waveform mean removed; zero-padded or cut to `target_len` frames. Returns (target_len, bins)."""
    import torchaudio
    w = torch.as_tensor(np.asarray(samples), dtype=torch.float32).reshape(1, -1)
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
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")]
    return [folder / n for n in sorted(names, key=natural_key)]


def pick_even(n, k):
    """k indices spread evenly over n sorted items (centred in k equal segments; repeats if n < k)."""
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def frame_transform(image_size, train, crop_scale=0.08):
    """The paper's frames: train = RandomResizedCrop (area share in [crop_scale, 1]; torchvision's and the
    paper's 0.08) + horizontal flip, test (and train=False) = resize; ImageNet normalisation."""
    from torchvision.transforms import v2 as T
    head = ([T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True), T.RandomHorizontalFlip()]
            if train else [T.Resize((image_size, image_size), antialias=True)])
    return T.Compose([T.ToImage(), *head, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path, src=None):
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):          # 16-bit greyscale: PIL's RGB conversion would clip it at 255
                im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
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


def blob_image(rng, px, colour, clutter_blobs, class_blobs, radius=(2, 5)):
    """A toy set's px x px image: a random background, `clutter_blobs` blobs of random colours and
    `class_blobs` blobs of one jittered `colour` (None: none), drawn in a random order from `rng`."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (px, px), tuple(int(v) for v in rng.randint(60, 190, 3)))
    draw = ImageDraw.Draw(im)
    blobs = [tuple(int(v) for v in rng.randint(0, 256, 3)) for _ in range(clutter_blobs)]
    if colour is not None:
        blobs += [tuple(int(np.clip(c + rng.randint(-25, 26), 0, 255)) for c in colour)] * class_blobs
    for fill in [blobs[j] for j in rng.permutation(len(blobs))]:
        x0, y0, r = rng.randint(0, px), rng.randint(0, px), rng.randint(*radius)
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
    return im


@contextlib.contextmanager
def data_root(dataset, root, toy_prefix):
    """The data folder: `root` (--data_root), else data/<dataset>; the toy set without a root is generated
    into a temporary folder, deleted afterwards."""
    if dataset == "toy" and root is None:
        with tempfile.TemporaryDirectory(prefix=toy_prefix) as tmp:
            yield Path(tmp)
    else:
        yield Path(root or f"data/{dataset}")


def _ensure_toy(root, first_file, make, params):
    marker = root / "toy.json"
    if (root / first_file).is_file():
        made, want = json.loads(marker.read_text()) if marker.is_file() else None, json.loads(json.dumps(params))
        if made is not None and made != want:
            differ = ", ".join(f"{k} {made.get(k)} there, {want.get(k)} now" for k in sorted(set(made) | set(want))
                               if made.get(k) != want.get(k))
            print(f"warning: {root} holds a toy set made with other settings ({differ}); it is used as it is: "
                  "delete it, or pass another --data_root, to generate a new one", file=sys.stderr)
        return
    make(root, **params)
    atomic_json_dump(params, marker)


def ensure_toy(root, first_file, make, **params):
    """Generate a toy set into `root` with make(root, **params), unless `first_file` is there already.
    A toy set found there that was made with other parameters (its toy.json says) is used as it is,
    with a warning naming them."""
    with rank0_first():                         # torchrun: a shared --data_root is written once
        _ensure_toy(Path(root), first_file, make, params)


# ======== 3b. Audio-video: CREMA-D (three layouts), Kinetics-Sounds, AVE, VGGSound, videos (PyAV), toy, the cache ========

@dataclass
class Clip:
    id: str
    label: int
    audio: str           # .wav or precomputed fbank .npy
    frames: str          # folder of frames
    src: str             # "list_file:line" that named the clip, for error messages
    frame_names: tuple = ()   # the folder's images in natural order, as listed when the clip was resolved

    @property
    def n_frames(self):       # 0: not listed
        return len(self.frame_names)


class AVDataset(torch.utils.data.Dataset):
    """Returns (audio [1, audio_len, mel_bins], video [frames, 3, S, S], label, index). Training frames are
    cropped (area share in [crop_scale, 1]) and flipped; augment=False: resized as at test time."""

    def __init__(self, clips, train, image_size=224, frames=3, audio_len=1024, num_mel_bins=128, crop_scale=0.08,
                 augment=True):
        self.clips, self.train = list(clips), train and augment
        self.frames, self.audio_len, self.num_mel_bins = frames, audio_len, num_mel_bins
        self.transform = frame_transform(image_size, self.train, crop_scale)

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
                samples, rate = read_wav(clip.audio)
            except DataError as e:
                raise DataError(f"{e} (clip at {clip.src})") from None
            fb = wav_to_fbank(samples, rate, self.num_mel_bins, self.audio_len)
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
  CREMA-D, raw download:   AudioWAV/*.wav and VideoFlash/*.flv (frames extracted with PyAV) or
                           Image-01-FPS/<clip>/*.jpg; a seeded split is made (--actor_split for actor-disjoint)
  AVE:                     trainSet.txt, valSet.txt, testSet.txt ('Church bell&RUhOCu3LNXM&good&0&10'), optional
                           Annotations.txt; audio <VideoID>.wav or .npy, frames <VideoID>/ as for the others
  VGGSound:                vggsound.csv ('---g-f_I2yQ,1,people marching,test'), clips '<id>_<start:06d>'
  From videos:             python common.py prepare --videos DIR --out ROOT writes AudioWAV/, Image-01-FPS/
  Kinetics-Sounds (OGM-GE): my_train.txt, my_test.txt ('<ytid>_<start>_<end>,<any>,<label index>'),
                           audio as <clip>.wav or <clip>.npy (fbank) in e.g. audio/{split}/ or {split}_fbank/,
                           frames in e.g. Image-01-FPS/<clip>/ or visual/{split}_imgs/Image-01-FPS/<clip>/
  --audio_dir / --frames_dir override where audio and frames are looked for."""
CREMAD_DEFAULT_ORDER = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
CREMAD_EMOTIONS = f"CREMA-D's emotions {', '.join(CREMAD_DEFAULT_ORDER)}"


def best_dir(folders, names, has):
    """The folder that holds the most of the first 25 `names` (has(folder, name)), None if none holds any."""
    best, best_hits = None, 0
    for d in folders:
        if d.is_dir():
            hits = sum(1 for n in names[:25] if has(d, n))
            if hits > best_hits:
                best, best_hits = d, hits
    return best


def _find_dir(root, override, templates, split, entries, is_match, what, layout_help=LAYOUT_HELP):
    """The folder (from `templates`) holding the most of the first clips of a list."""
    cands = [Path(override.format(split=split))] if override else [root / t.format(split=split) for t in templates]
    probe, best_hits = entries[:25], 0
    best = best_dir(cands, [e[0] for e in probe], is_match)
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
        raise DataError(f"{src}: {what} of clip '{clip}' not found; looked in {tried}\n{layout_help}")
    return best


def check_audio(path, num_mel_bins=None):
    """Cheap check of one audio file before training: a WAV header, or a .npy fbank's shape."""
    if str(path).endswith(".npy"):
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
            if magic != b"\x93NUMPY":
                raise ValueError(f"not a .npy file (its first bytes are {magic!r}; a .npy starts with b'\\x93NUMPY')")
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable .npy: {e}; expected a (frames, mel bins) fbank array") from None
        if 0 in shape:
            raise DataError(f"{path}: fbank of shape {shape} holds no frames; expected a non-empty (frames, mel bins) "
                            "array")
        shape = tuple(n for n in shape if n != 1) or shape
        if len(shape) == 2 and num_mel_bins and shape[0] == num_mel_bins and shape[1] != num_mel_bins:
            raise DataError(f"{path}: fbank of shape {shape} looks transposed (mel bins x frames); expected "
                            f"(frames, {num_mel_bins}): save it as fbank.T")
        if len(shape) != 2 or (num_mel_bins and shape[1] != num_mel_bins):
            raise DataError(f"{path}: fbank of shape {shape}; expected (frames, {num_mel_bins or 'mel bins'})"
                            " — set --num_mel_bins to its width")
    else:
        wav_info(path)


@dataclass(frozen=True)
class AVFiles:
    """Where an A-V set's files are when its layout does not say (--audio_format, --audio_dir, --frames_dir):
    audio as .npy fbanks, .wav or either (auto); the audio and frame folders (default: searched for)."""
    audio_format: str = "auto"
    audio_dir: str | None = None
    frames_dir: str | None = None


def resolve_clips(root, split, entries, files=AVFiles(), skip_bad=False, stats=None, num_mel_bins=None):
    """entries: [(clip_id, label_index, 'file:line')] -> [Clip] with audio and frame paths checked
    (every audio file's header is read, so an empty or broken file stops the run before training)."""
    root = Path(root)
    exts = {"auto": (".npy", ".wav"), "npy": (".npy",), "wav": (".wav",)}[files.audio_format]
    has_audio = lambda d, c: any((d / (c + e)).is_file() for e in exts)
    has_frames = lambda d, c: (d / c).is_dir()
    adir = _find_dir(root, files.audio_dir, AUDIO_DIRS, split, entries, has_audio, "audio (" + "/".join(exts) + ")")
    fdir = _find_dir(root, files.frames_dir, FRAME_DIRS, split, entries, has_frames, "frame folder")
    clips, seen, bad = [], {}, []
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
            names = tuple(p.name for p in list_frames(fr))
            if not names:
                raise DataError(f"{src}: frame folder {fr}/ of clip '{clip_id}' is empty; expected .jpg frames")
            clips.append(Clip(clip_id, label, str(audio), str(fr), src, names))
        except DataError as e:
            bad.append(str(e))
    if bad and not skip_bad:            # all clips checked: the error counts them (VGGSound often lacks many)
        raise DataError(f"{bad[0]}\n({len(bad)} of the {len(entries)} clips of the {split} split are unusable; "
                        "--skip_bad leaves them out)")
    if bad and stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + len(bad)
        stats.setdefault("examples", []).extend(bad)
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


# The classes a data set defines (without a class file the labels give them: more than this is a typo).
DEFINED_CLASSES = {"CREMA-D": 6, "IEMOCAP": 4, "MVSA-Single": 3, "Food-101": 101}


def defined_classes(labels, srcs, name, class_file):
    """Refuse labels (their 'file:line' srcs) beyond the count data set `name` defines: the rarest label past
    it (a typo: 'DISGUST' for 'DIS') is an error naming its first line."""
    count = collections.Counter(labels)
    n = DEFINED_CLASSES[name]
    if len(count) > n:
        label = min(count, key=count.get)         # of the rarest, the first listed
        src = srcs[labels.index(label)]
        raise DataError(f"{src}: label '{label}' ({count[label]} of {len(labels)} lines) makes {len(count)} classes; "
                        f"{name} has {n}: fix the label, or name the classes in {class_file}")


def class_warnings(splits, classes):
    """Warn about a class with items in one split and none in another, or with under a tenth of the median
    training class's items (a typo, or a version of the data with another class list), once a command (warn_once).
    splits: {name: [label]}."""
    counts = {s: collections.Counter(ys) for s, ys in splits.items() if ys}
    for a, b in itertools.permutations(counts, 2):
        only = [classes[c] for c in sorted(counts[a]) if not counts[b][c]]
        if only:
            warn_once(f"warning: classes in {a} but not in {b} ({len(only)}): {', '.join(only[:10])}"
                      f"{' ...' if len(only) > 10 else ''}")
    train = counts.get("train", {})
    median = float(np.median(list(train.values()))) if train else 0
    few = [f"{classes[c]} ({n})" for c, n in sorted(train.items()) if n < median / 10]
    if few:
        warn_once(f"warning: classes with under a tenth of the median {median:g} training items: {', '.join(few[:10])}")


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
        defined_classes([r[1] for r in raw["train"]], [r[2] for r in raw["train"]], "CREMA-D", stat)
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
    else:                                               # CREMA-D's emotions, those the training list has
        classes = [c for c in CREMAD_DEFAULT_ORDER if c in {r[1] for r in raw["train"]}]
        class_src = f"{CREMAD_EMOTIONS}; a stat.csv naming the classes admits others"
    return {split: [(c, _label_index(l, classes, src, class_src), src) for c, l, src in rows]
            for split, rows in raw.items()}, classes


# ---- Raw videos -> the folders the loaders read: AudioWAV/<clip>.wav, Image-01-FPS/<clip>/frame_0000N.jpg (PyAV)
VIDEO_EXTS = (".mp4", ".flv", ".avi", ".mkv", ".webm")


def import_av():
    """PyAV, an optional dependency imported only where videos are decoded."""
    try:
        import av
    except ImportError:
        raise DataError("decoding videos needs PyAV, which is not installed: pip install av (its wheels bring "
                        "their own FFmpeg)") from None
    return av


def list_videos(folder):
    """The video files (VIDEO_EXTS, any case) under `folder`, recursively, sorted; dot files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of videos not found")
    videos = sorted(p for p in folder.rglob("*")
                    if p.suffix.lower() in VIDEO_EXTS and not p.name.startswith(".") and p.is_file())
    if not videos:
        raise DataError(f"{folder}: no videos found; expected files ending in {', '.join(VIDEO_EXTS)}")
    return videos


def short_side_size(h, w, side):
    """(h, w) scaled so that the short side is `side`."""
    if w >= h:
        return side, max(side, round(side * w / h))
    return max(side, round(side * h / w)), side


def decode_clip(video, fps, frame_size, sample_rate=None):
    """One pass over a video. Returns (samples, frames): with a sample_rate, its first audio stream as mono
    int16 (n,) at that rate (else None); frames every 1/fps s from the first, PIL RGB, short side
    `frame_size`. Raises DataError naming the video and why (not decodable, no audio stream, no frames)."""
    av = import_av()
    try:
        with av.open(str(video)) as c:
            if not c.streams.video or (sample_rate and not c.streams.audio):
                raise DataError(f"{video}: no {'video' if not c.streams.video else 'audio'} stream")
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            rate = float(vs.average_rate or 25)        # for frames without a timestamp
            resampler = sample_rate and av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            resample = resampler and resampler.resample
            pcm, frames, t0, n = [], [], None, 0
            for packet in c.demux(*[vs] + ([c.streams.audio[0]] if sample_rate else [])):
                for frame in packet.decode():
                    if packet.stream is not vs:
                        pcm += [f.to_ndarray().reshape(-1) for f in resample(frame)]
                        continue
                    t = frame.time if frame.time is not None else n / rate
                    t0, n = t if t0 is None else t0, n + 1
                    if t - t0 >= len(frames) / fps - 1e-3:       # the first frame at or after k / fps
                        h, w = short_side_size(frame.height, frame.width, frame_size)
                        frames.append(frame.to_image(width=w, height=h))
            if resample:
                pcm += [f.to_ndarray().reshape(-1) for f in resample(None)]      # flush
    except av.FFmpegError as e:
        raise DataError(f"{video}: cannot be decoded: {getattr(e, 'strerror', None) or e}") from None
    if not frames:
        raise DataError(f"{video}: no frames decoded from its video stream")
    samples = np.concatenate(pcm).astype(np.int16) if pcm else None
    if sample_rate and (samples is None or not len(samples)):
        raise DataError(f"{video}: its audio stream holds no samples")
    return samples, frames


def write_clip(out, clip, samples, rate, frames):
    """<out>/AudioWAV/<clip>.wav (samples not None) and <out>/Image-01-FPS/<clip>/frame_0000N.jpg (frames not
    None), each under a temporary name first, then renamed: an interrupted run leaves no half clip."""
    if samples is not None:
        atomic_write(out / "AudioWAV" / f"{clip}.wav", lambda f: write_wav(f, samples, rate))
    if frames is not None:
        folder = out / "Image-01-FPS" / clip
        part = folder.with_name(f".{clip}.part")
        shutil.rmtree(part, ignore_errors=True)             # left by an interrupted run
        part.mkdir(parents=True)
        for k, im in enumerate(frames, 1):
            im.save(part / f"frame_{k:05d}.jpg", quality=95)
        shutil.rmtree(folder, ignore_errors=True)           # a folder without frames
        os.replace(part, folder)


def prepare_clip(video, out, fps=1, sample_rate=16000, frame_size=256, audio=True):
    """Decode one video into <out>/AudioWAV/<clip>.wav (audio=True) and <out>/Image-01-FPS/<clip>/ (clip = its
    file name's stem), writing only what is not there yet. Returns 'skipped' when nothing was missing."""
    video, out = Path(video), Path(out)
    clip, fdir = video.stem, out / "Image-01-FPS" / video.stem
    need_audio = audio and not (out / "AudioWAV" / f"{clip}.wav").is_file()
    need_frames = not (fdir.is_dir() and list_frames(fdir))
    if not (need_audio or need_frames):
        return "skipped"
    samples, frames = decode_clip(video, fps, frame_size, sample_rate if need_audio else None)
    write_clip(out, clip, samples, sample_rate, frames if need_frames else None)
    return "done"


def _prepare_job(job):
    """prepare_clip in a worker process: (video, 'done' | 'skipped' | 'failed', reason)."""
    video, kwargs = job
    try:
        return video, prepare_clip(video, **kwargs), ""
    except DiskFull:
        raise
    except DataError as e:
        return video, "failed", str(e).removeprefix(f"{video}: ")
    except Exception as e:              # whatever else a broken file raises: listed, and the others go on
        return video, "failed", f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def process_map(workers):
    """map(f, items), unordered, over `workers` processes (1: in this one)."""
    if workers <= 1:
        yield map
        return
    import multiprocessing as mp
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        yield pool.imap_unordered


def prepare_videos(videos, out, fps=1, sample_rate=16000, frame_size=256, workers=1, audio=True):
    """prepare_clip for every video, over `workers` processes, with a progress bar. The failures go on (a
    video that cannot be decoded, without audio or frames, a clip name taken by another video) and are
    listed with their reasons in <out>/prepare_errors.txt. Returns {'done', 'skipped', 'failed'} counts."""
    from tqdm import tqdm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import_av()                                         # missing: one clear error, not one per video
    kwargs = dict(out=out, fps=fps, sample_rate=sample_rate, frame_size=frame_size, audio=audio)
    jobs, failed, first = [], [], {}
    for v in map(Path, videos):
        if v.stem in first:
            failed.append((v, f"clip name '{v.stem}' taken by {first[v.stem]}; expected one video per name"))
        else:
            first[v.stem] = v
            jobs.append((v, kwargs))
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with process_map(workers) as pmap:
        for video, status, reason in tqdm(pmap(_prepare_job, jobs), total=len(jobs), desc="preparing", unit="clip"):
            counts[status] += 1
            failed += [(video, reason)] if reason else []
    counts["failed"] = len(failed)
    errors = out / "prepare_errors.txt"
    if failed:
        errors.write_text("".join(f"{v}: {r}\n" for v, r in sorted(failed)))
    elif errors.exists():
        errors.unlink()
    return counts


def cremad_raw_frames(root, clips):
    """The 1-fps frames of the raw download's clips that have none, from VideoFlash/<clip>.flv (prepare_videos;
    its audio is AudioWAV's). A clip whose video is missing or broken is left to resolve_clips to report."""
    if not os.access(root, os.W_OK):
        raise DataError(f"{root}: frames of {len(clips)} clips are missing and the folder is read-only; "
                        f"extract them first: python common.py prepare --videos {root / 'VideoFlash'} --out {root}")
    videos = [root / "VideoFlash" / f"{c}.flv" for c in clips]
    counts = prepare_videos([v for v in videos if v.is_file()], root, workers=min(8, os.cpu_count() or 1),
                            audio=False)
    absent = sum(not v.is_file() for v in videos)
    if counts["failed"] or absent:
        print(f"note: frames of {counts['failed'] + absent} clips could not be extracted ({absent} without "
              f"VideoFlash/<clip>.flv; the reasons of the others in {root / 'prepare_errors.txt'})", file=sys.stderr)


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
    todo = [r[0] for r in rows if not (frames_root / r[0]).is_dir() or not list_frames(frames_root / r[0])]
    if todo:
        cremad_raw_frames(root, todo)
    classes = [c for c in CREMAD_DEFAULT_ORDER if c in {r[1] for r in rows}]
    labels = [_label_index(r[1], classes, r[3], CREMAD_EMOTIONS) for r in rows]
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


AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime"
AVE_SPLITS = {"train": "trainSet.txt", "dev": "valSet.txt", "test": "testSet.txt"}


def ave_rows(path):
    """An AVE list (Annotations.txt, trainSet.txt, ...): 'Category&VideoID&Quality&StartTime&EndTime' lines, a
    header line of those names allowed. Returns [(video_id, category, 'file:line')]."""
    rows = []
    for ln, s in _nonempty(read_text_lines(path), path, "Church bell&RUhOCu3LNXM&good&0&10"):
        parts = [p.strip() for p in s.split("&")]
        if "&".join(parts) == AVE_HEADER:
            continue
        if len(parts) != 5 or not parts[0] or not parts[1] or not all(re.fullmatch(r"\d+(\.\d*)?", t)
                                                                      for t in parts[3:]):
            raise DataError(f"{where(path, ln)}: '{s}'; expected '{AVE_HEADER}' (e.g. "
                            "'Church bell&RUhOCu3LNXM&good&0&10')")
        rows.append((parts[1], parts[0], where(path, ln)))
    return rows


def single_label(rows, path):
    """The rows of videos listed once. A video on several lines (AVE: events of two categories in one
    video) has no single label: it is left out, as OGM-GE's loader does, with a note."""
    n = collections.Counter(r[0] for r in rows)
    twice = [r for r in rows if n[r[0]] > 1]
    if twice:
        print(f"note: {path}: {len(twice)} lines name a video listed more than once (e.g. '{twice[0][0]}' at "
              f"{twice[0][2]}); left out, as in OGM-GE", file=sys.stderr)
    return [r for r in rows if n[r[0]] == 1]


def ave_lists(root):
    """AVE release: trainSet.txt, valSet.txt (the validation split), testSet.txt; clip = VideoID; the
    classes (28) are the sorted categories of Annotations.txt, else of the three lists."""
    raw = {split: single_label(ave_rows(root / name), root / name) for split, name in AVE_SPLITS.items()}
    ann = root / "Annotations.txt"
    names = {r[1] for r in ave_rows(ann)} if ann.is_file() else {r[1] for rows in raw.values() for r in rows}
    classes, class_src = sorted(names), str(ann) if ann.is_file() else "the categories of the AVE lists"
    return {split: [(c, _label_index(l, classes, src, class_src), src) for c, l, src in rows]
            for split, rows in raw.items()}, classes


def vggsound_lists(root):
    """VGGSound: vggsound.csv, no header, rows 'youtube_id,start_seconds,label,train|test' (a label with a comma
    is quoted); clip '<youtube_id>_<start:06d>'; the classes (309) are the sorted labels."""
    path, raw = root / "vggsound.csv", {"train": [], "test": []}
    for ln, s in _nonempty(read_text_lines(path), path, "---g-f_I2yQ,1,people marching,test"):
        row = [p.strip() for p in next(csv.reader([s]))]
        if len(row) != 4 or not row[0] or not re.fullmatch(r"\d+", row[1]) or not row[2] or row[3] not in raw:
            raise DataError(f"{where(path, ln)}: '{s}'; expected 'youtube_id,start_seconds,label,train|test' "
                            "(e.g. '---g-f_I2yQ,1,people marching,test')")
        raw[row[3]].append((f"{row[0]}_{int(row[1]):06d}", row[2], where(path, ln)))
    for split, rows in raw.items():
        if not rows:
            raise DataError(f"{path}: no '{split}' rows; expected rows for both train and test")
    classes = sorted({r[1] for rows in raw.values() for r in rows})
    return {split: [(c, classes.index(l), src) for c, l, src in rows] for split, rows in raw.items()}, classes


def detect_av_layout(dataset, root):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (pass --data_root)\n{LAYOUT_HELP}")
    if dataset == "ks":
        if (root / "my_train.txt").is_file():
            return "ks_ogm"
    elif dataset in ("ave", "vggsound"):
        if (root / ("trainSet.txt" if dataset == "ave" else "vggsound.csv")).is_file():
            return dataset
    else:
        if (root / "my_train_cre.txt").is_file():
            return "cremad_mla"
        if (root / "train.csv").is_file():
            return "cremad_ogm"
        if (root / "AudioWAV").is_dir():
            return "cremad_raw"
    raise DataError(f"{root}: no known {dataset} layout found\n{LAYOUT_HELP}")


def load_av_splits(dataset, root, split_seed=0, actor_split=False, files=AVFiles(), skip_bad=False, num_mel_bins=None):
    """Detect the layout and return dict(layout, classes, train=[Clip], test=[Clip], skipped=int), and
    dev=[Clip] where the data has a validation split (AVE's valSet.txt)."""
    root = Path(root)
    layout = detect_av_layout(dataset, root)
    if layout == "cremad_mla":
        lists, classes = cremad_mla_lists(root)
    elif layout == "cremad_ogm":
        lists, classes = cremad_ogm_lists(root)
    elif layout == "cremad_raw":
        lists, classes = cremad_raw_lists(root, split_seed, 0.1, actor_split)
    else:
        lists, classes = {"ks_ogm": ks_lists, "ave": ave_lists, "vggsound": vggsound_lists}[layout](root)
    stats, out = {}, {"layout": layout, "classes": classes}
    for split in lists:                                 # train, test and (AVE) dev
        out[split], out[split + "_audio_dir"], out[split + "_frames_dir"] = resolve_clips(
            root, split, lists[split], files, skip_bad, stats, num_mel_bins)
    class_warnings({split: [c.label for c in out[split]] for split in lists}, classes)
    out["skipped"] = stats.get("skipped", 0)
    return out


@dataclass(frozen=True)
class ToyAV:
    """How the toy A-V set is made (what its script does not set)."""
    rate: int = 8000             # audio: samples a second,
    seconds: float = 0.7         # a clip's length,
    cue: float = 0.85            # the probability that its in-pair cue agrees with the label
    px: int = 40                 # frames: px x px, showing class_blobs blobs in the class's colour
    class_blobs: int = 4
    clutter_blobs: int = 4       # among clutter_blobs random ones


def make_toy_av(root, seed=0, n_train=600, n_test=240, frames=3, recipe=ToyAV()):
    """Write a small CREMA-D-like A-V data set in the OGM-GE layout (train.csv, test.csv, stat.csv,
    AudioWAV/*.wav, Image-01-FPS/<clip>/*.jpg), generated deterministically from `seed`.

    Six classes in three pairs. Audio carries a loud tone that names the pair (learned in a few
    steps) and, for the class inside the pair, only a cue that agrees with the label with
    probability `recipe.cue`; video names the class by the colour of a few small blobs among
    random ones: slower to learn, but it holds what audio lacks. Joint training
    leans on audio and leaves video under-trained, as on CREMA-D.
    """
    root, (rate, seconds, cue) = Path(root), (recipe.rate, recipe.seconds, recipe.cue)
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
                blob_image(rng, recipe.px, palette[y], recipe.clutter_blobs, recipe.class_blobs).save(
                    d / f"frame_{k + 1:05d}.jpg", quality=90)
            rows[split].append(f"{clip},{classes[y]}")
    for split in rows:
        (root / f"{split}.csv").write_text("\n".join(rows[split]) + "\n")
    (root / "stat.csv").write_text("\n".join(classes) + "\n")
    return root


# ---- The preprocessed A-V cache (memory-mapped arrays, built once), batched reads, the GPU input transform
def default_cache_dir(root):
    """<data root>/.mla_cache when the data root is writable, else ~/.cache/mla (or $XDG_CACHE_HOME/mla)."""
    root = Path(root)
    if os.access(root, os.W_OK):
        return root / ".mla_cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mla"


def frame_cache_size(clips, image_size, train):
    """Stored frame size: test-time frames exactly as the test transform makes them (S x S); the canvas of
    training frames: short side = S, the aspect ratio of the data's first frame (see fit_frame)."""
    if not train:
        return image_size, image_size
    paths = list_frames(clips[0].frames)
    if not paths:
        raise DataError(f"{clips[0].frames}: no frames (clip at {clips[0].src}); expected .jpg files")
    w, h = load_image(paths[0], clips[0].src).size
    return short_side_size(h, w, image_size)


def fit_frame(image, canvas, side):
    """A training frame for the cache: resized with its own aspect ratio to short side `side` (or, when
    that overflows the canvas, as large as fits), at the top left of a uint8 canvas (3, H, W) whose
    rest repeats the last row and column (so bilinear sampling at the frame's edge reads the edge).
    Returns (canvas, (h, w) of the frame in it)."""
    from torchvision.transforms import v2 as T
    H, W = canvas
    h, w = short_side_size(image.height, image.width, side)
    if h > H or w > W:
        s = min(H / h, W / w)
        h, w = max(1, min(H, round(h * s))), max(1, min(W, round(w * s)))
    x = T.Resize((h, w), antialias=True)(T.ToImage()(image))
    out = torch.empty((3, H, W), dtype=torch.uint8)
    out[:, :h, :w] = x
    out[:, :h, w:] = x[:, :, -1:]
    out[:, h:, :] = out[:, h - 1:h, :]
    return out, (h, w)


class _CacheBuild(torch.utils.data.Dataset):
    """One clip decoded once: (fbank float16 (T, F), picked frames uint8 (K, 3, H, W), each frame's
    (h, w) in its canvas (K, 2)). Test frames are resized to exactly S x S, as the test transform does;
    training frames keep their aspect ratio (fit_frame)."""

    def __init__(self, clips, size, frames, audio_len, num_mel_bins, train, image_size):
        from torchvision.transforms import v2 as T
        self.av = AVDataset(clips, False, size[0], frames, audio_len, num_mel_bins)
        self.size, self.train, self.image_size = size, train, image_size
        self.resize = T.Compose([T.ToImage(), T.Resize(size, antialias=True)])

    def __len__(self):
        return len(self.av)

    def __getitem__(self, i):
        clip = self.av.clips[i]
        fb = self.av.load_audio(clip)[0].numpy().astype(np.float16)
        paths = list_frames(clip.frames)
        if not paths:
            raise DataError(f"{clip.frames}: no frames (clip at {clip.src}); expected .jpg files")
        images = [load_image(paths[k], clip.src) for k in pick_even(len(paths), self.av.frames)]
        if self.train:
            fr, hw = zip(*(fit_frame(im, self.size, self.image_size) for im in images))
        else:
            fr, hw = [self.resize(im) for im in images], [self.size] * len(images)
        return fb, torch.stack(fr).numpy(), np.array(hw, dtype=np.int32)


CACHE_ELSEWHERE = "give --cache_dir a folder on a larger disk, or pass --no_cache to decode every epoch"


def reserve(path, folder):
    """Allocate every block of a file that a memory map created sparse: a full disk is then an error
    here, not a SIGBUS at some later write through the map."""
    if not hasattr(os, "posix_fallocate"):          # macOS, Windows: the free-space check alone
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{folder}: no room on its disk for the cache's {path.name} "
                           f"({mb(os.fstat(fd).st_size)}); {CACHE_ELSEWHERE}") from e
        # a file system without fallocate (EOPNOTSUPP, EINVAL): go on as before
    finally:
        os.close(fd)


def discard(folder):
    """Move a damaged cache folder aside (one rename: a run opening it now finds it gone, not half deleted)
    and delete it."""
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.damaged."))
    try:
        os.rename(folder, aside / folder.name)
    except FileNotFoundError:       # another run moved it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def random_resized_crop_flip(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), extents=None):
    """RandomResizedCrop + RandomHorizontalFlip for a whole batch of uint8 images (N, 3, H, W) in one
    grid_sample (bilinear). Crop boxes are drawn as torchvision draws them (area share in `scale`,
    log-uniform aspect in `ratio`, ten tries, then a centre crop), inside each image's (h, w) at the top
    left (`extents`, (N, 2) on the CPU; default the whole image); returns float (N, 3, size, size)."""
    n, _, H, W = images.shape
    dev = images.device
    hw = torch.tensor([[H, W]] * n) if extents is None else extents
    h, w = hw[:, 0].double(), hw[:, 1].double()
    area = (h * w)[:, None] * torch.empty(n, 10).uniform_(*scale)
    logr = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    cw = torch.sqrt(area * torch.exp(logr)).round()
    ch = torch.sqrt(area / torch.exp(logr)).round()
    ok = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp_min(0)
    cw, ch = cw[torch.arange(n), pick], ch[torch.arange(n), pick]
    # no try fitted: the whole image, cut to the nearest allowed aspect ratio, centred
    fw = torch.where(w / h > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(w / h < ratio[0], torch.round(w / ratio[0]), h)
    bad = first < 0
    cw, ch = torch.where(bad, fw, cw), torch.where(bad, fh, ch)
    x0 = torch.floor(torch.rand(n) * (w - cw + 1))
    y0 = torch.floor(torch.rand(n) * (h - ch + 1))
    x0, y0 = torch.where(bad, torch.floor((w - fw) / 2), x0), torch.where(bad, torch.floor((h - fh) / 2), y0)
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / W * flip
    theta[:, 0, 2] = (2 * x0 + cw) / W - 1
    theta[:, 1, 1] = ch / H
    theta[:, 1, 2] = (2 * y0 + ch) / H - 1
    grid = F.affine_grid(theta.to(dev, non_blocking=dev.type == "cuda"), (n, 3, size, size), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class AVSizes:
    """The sizes of an A-V item: `frames` frames of image_size x image_size, an audio_len x num_mel_bins fbank."""
    image_size: int = 224
    frames: int = 3
    audio_len: int = 1024
    num_mel_bins: int = 128


def av_cache_key(clips, params):
    """The name of a cache folder: a hash of every preprocessing parameter and of each clip's files (path,
    size, modification time), so a change rebuilds it instead of reading stale data."""
    import hashlib
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for c in clips:
        a, f = os.stat(c.audio), os.stat(c.frames)
        h.update(f"{c.id}|{c.label}|{c.audio}|{a.st_size}|{a.st_mtime_ns}|{c.frames}|{f.st_mtime_ns}".encode())
        # a frame rewritten in place leaves its folder's mtime alone; the names listed by resolve_clips
        paths = [Path(c.frames) / n for n in c.frame_names] or list_frames(c.frames)
        for k in pick_even(len(paths), params["frames"]) if paths else []:
            s = os.stat(paths[k])
            h.update(f"|{paths[k].name}|{s.st_size}|{s.st_mtime_ns}".encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def av_cache_layout(clips, params):
    """Each cached array's (shape, dtype)."""
    n, k = len(clips), params["frames"]
    return {"fbank.npy": ((n, params["audio_len"], params["num_mel_bins"]), "float16"),
            "frames.npy": ((n, k, 3, *params["size"]), "uint8"), "extents.npy": ((n, k, 2), "int32")}


def av_cache_problem(folder, clips, params):
    """(file, why) when the cache folder must not be read, else None. It must have a meta.json that
    describes these settings and clips, and arrays of the shapes, types and byte sizes it records,
    whose every byte gives the checksum taken at build time: a sample of blocks could miss a few KB
    overwritten in a GB file, and every byte is checked at about 1 GB/s on 2 busy cores: about 5 s for
    CREMA-D's 6,698 training clips at the paper's sizes (4.6 GB), which the first epoch then finds in
    the page cache where memory allows."""
    meta_path, layout = folder / "meta.json", av_cache_layout(clips, params)
    want = json.loads(json.dumps({**params, "clips": [c.id for c in clips]}))
    try:
        meta = json.loads(meta_path.read_text())
        files = {name: dict(meta["files"][name]) for name in layout}
        same = {k: meta[k] for k in want} == want
    except FileNotFoundError:
        return meta_path, "missing (deleted, or left out of a copy)"
    except (KeyError, TypeError):
        return meta_path, "holds no checksums (a cache built by an earlier version)"
    except (OSError, ValueError) as e:
        return meta_path, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if not same:
        return meta_path, "describes other settings or clips"
    for name, (shape, dtype) in layout.items():
        path, rec = folder / name, files[name]
        if [rec.get("shape"), rec.get("dtype")] != [list(shape), dtype]:
            return meta_path, f"says {name} is {rec.get('dtype')} {rec.get('shape')}; expected {dtype} {list(shape)}"
        size = path.stat().st_size if path.is_file() else None
        if size != rec.get("bytes"):
            return path, f"{'missing' if size is None else f'{size} bytes'}; meta.json says {rec.get('bytes')}"
    for name in layout:
        if file_checksum(folder / name) != files[name].get("crc32"):
            return folder / name, "its bytes differ from those it was built with (overwritten or damaged)"
    return None


def build_av_cache(folder, clips, params, size, num_workers, train, image_size):
    """Decode `clips` once into a temporary folder beside `folder` (arrays, meta.json with their checksums)
    and rename it to `folder`: two runs building at once cannot corrupt it."""
    from tqdm import tqdm
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():                # one that failed its check: out of the way of the rename below
        discard(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building."))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)               # mkdtemp's 0700: the folder others may read, as mkdir makes it
    try:
        n, layout = len(clips), av_cache_layout(clips, params)
        need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in layout.values())
        free = free_bytes(tmp)
        if free is not None and need > free:
            raise DiskFull(f"{folder}: the cache needs {mb(need)} and its disk has {mb(free)} free; "
                           f"{CACHE_ELSEWHERE}")
        fb, fr = (np.lib.format.open_memmap(tmp / f, "w+", *layout[f][::-1]) for f in ("fbank.npy", "frames.npy"))
        for f in ("fbank.npy", "frames.npy"):
            reserve(tmp / f, folder)
        hw = np.zeros(*layout["extents.npy"])
        src = _CacheBuild(clips, size, params["frames"], params["audio_len"], params["num_mel_bins"],
                          train, image_size)
        # its own generator: building must not draw from the global RNG, or a run that builds the
        # cache would train differently from one that finds it built
        loader = torch.utils.data.DataLoader(src, batch_size=None, num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(0))
        for i, (a, v, e) in enumerate(tqdm(loader, total=n, desc=f"caching {folder.name}", unit="clip",
                                           disable=not sys.stderr.isatty() or world()[0] > 0)):
            fb[i], fr[i], hw[i] = a, v, e
        fb.flush()
        fr.flush()
        del fb, fr
        np.save(tmp / "extents.npy", hw)
        files = {f: {"shape": list(shape), "dtype": dtype, "bytes": os.path.getsize(tmp / f),
                     "crc32": file_checksum(tmp / f)} for f, (shape, dtype) in layout.items()}
        atomic_json_dump({**params, "clips": [c.id for c in clips], "files": files}, tmp / "meta.json")
        try:
            os.rename(tmp, folder)
        except OSError:             # another run finished the same cache first: use theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def av_device_transform(dataset, xs, train, index=None):
    """CachedAVDataset.device_transform: on the batch, on its device: uint8 frames -> (training,
    augment_on='device') random resized crop + flip inside each frame's extent (`index`: the batch's item
    indices, on the CPU) -> float, ImageNet-normalised (B, K, 3, S, S)."""
    audio, video = xs
    audio = audio.float()
    b, k = video.shape[:2]
    v = video.flatten(0, 1)
    if train and dataset.train and dataset.augment_on == "device":
        extents = None if index is None else dataset.extents[index].flatten(0, 1)
        v = random_resized_crop_flip(v, dataset.image_size, (dataset.crop_scale, 1.0), extents=extents)
    else:
        v = v.float()
    # built on the CPU and sent without waiting (torch.tensor(..., device=cuda) would sync)
    nb = v.device.type == "cuda"
    mean = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255).to(v.device, non_blocking=nb)
    std = (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255).to(v.device, non_blocking=nb)
    v = ((v - mean) / std).view(b, k, 3, *v.shape[-2:])
    return [audio, v]


class MappedAVClips(torch.utils.data.Dataset):
    """The reading side of the preprocessed A-V cache (CachedAVDataset sets clips, train, augment_on, crop,
    extents, folder and _arrays = None): items, and whole batches read in one go, from its memory maps."""

    # the memory maps are opened in each process that reads them, and never pickled (a pickled memmap
    # would copy the whole array into every loader worker started with 'spawn', as on macOS)
    def _open(self):
        if self._arrays is None:
            self._arrays = (np.load(self.folder / "fbank.npy", mmap_mode="r"),
                            np.load(self.folder / "frames.npy", mmap_mode="r"))
        return self._arrays

    @property
    def fbank(self):
        return self._open()[0]

    @property
    def frames(self):
        return self._open()[1]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self):
        return len(self.clips)

    @property
    def gatherable(self):
        """True when an item is only a read (no crop in the loader workers): see `gather`."""
        return not (self.train and self.augment_on == "workers")

    def gather(self, indices, pin=False):
        """The batch a DataLoader would collate from these items, read in one go from the memory maps
        straight into (pinned, with pin=True) tensors; for `gatherable` data sets. numpy's take does
        not hold the GIL, so several threads can gather batches at once (see GatherLoader)."""
        idx = np.asarray(indices, dtype=np.int64)
        fb, fr = self._open()
        audio = torch.empty((len(idx), 1, *fb.shape[1:]), dtype=torch.float16, pin_memory=pin)
        video = torch.empty((len(idx), *fr.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        np.take(fb, idx, axis=0, out=audio.numpy()[:, 0], mode="clip")   # indices come from a sampler
        np.take(fr, idx, axis=0, out=video.numpy(), mode="clip")
        labels = torch.tensor([self.clips[i].label for i in idx])
        index = torch.from_numpy(idx)
        if pin:
            labels, index = labels.pin_memory(), index.pin_memory()
        return audio, video, labels, index

    def __getitem__(self, i):
        audio = torch.from_numpy(np.array(self.fbank[i])).unsqueeze(0)         # float16 until the device
        video = torch.from_numpy(np.array(self.frames[i]))
        if self.train and self.augment_on == "workers":
            video = torch.stack([self.crop(f[:, :h, :w]) for f, (h, w) in zip(video, self.extents[i].tolist())])
        return audio, video, self.clips[i].label, i


class CachedAVDataset(MappedAVClips):
    """The clips of one split preprocessed once into memory-mapped arrays under `cache_dir`:
    fbank.npy (N, audio_len, mel_bins) float16, frames.npy (N, frames, 3, H, W) uint8 and extents.npy
    (N, frames, 2) int32: the (h, w) each training frame fills at the top left of its H x W canvas (its own
    aspect ratio kept; the crops are drawn inside it).

    The folder name is a hash of every preprocessing parameter and of each clip's files (path, size,
    modification time), so a change rebuilds it instead of reading stale data. A build writes to a
    temporary folder and renames it, so two runs building at once cannot corrupt it. meta.json records
    each array's shape, byte size and checksum; every open checks them (`av_cache_problem`), and a folder
    that fails is built again (one line says why), never read. Items are
    (audio float16 (1, T, F), frames uint8 (K, 3, H, W), label, index); `device_transform` turns a
    batch into float32 audio and normalised float frames on the training device. Training crops and flips are drawn per
    frame in the loader workers with torchvision (augment_on='workers', best on a CPU), or for the
    whole batch at once on the device (augment_on='device', for a GPU; bilinear without antialias).
    """
    VERSION = 2     # bump when the preprocessing code changes (2: training frames keep their aspect ratio)

    def __init__(self, clips, train, sizes=AVSizes(), cache_dir=None, num_workers=0, augment_on="workers",
                 crop_scale=0.08, augment=True):
        from torchvision.transforms import v2 as T
        image_size, frames = sizes.image_size, sizes.frames
        audio_len, num_mel_bins = sizes.audio_len, sizes.num_mel_bins
        train = train and augment               # augment=False: training clips stored and read as test clips
        self.clips, self.train, self.image_size = list(clips), train, image_size
        self.augment_on, self.crop_scale = augment_on, crop_scale
        self.crop = T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True),
                               T.RandomHorizontalFlip()])
        size = frame_cache_size(self.clips, image_size, train)
        params = {"version": self.VERSION, "train": train, "size": size, "frames": frames,
                  "audio_len": audio_len, "num_mel_bins": num_mel_bins}
        self.folder = Path(cache_dir) / f"{'train' if train else 'eval'}-{av_cache_key(self.clips, params)}"
        bad = av_cache_problem(self.folder, self.clips, params) if self.folder.exists() else None
        if bad is not None:
            cache_damaged(*bad, self.folder.parent, "pass --no_cache, or give --cache_dir a writable folder")
        if bad is not None or not self.folder.exists():
            self.build(params, size, num_workers)
        self._arrays = None
        self.extents = torch.from_numpy(np.load(self.folder / "extents.npy"))     # small: kept in memory

    def build(self, params, size, num_workers):
        build_av_cache(self.folder, self.clips, params, size, num_workers, self.train, self.image_size)

    def device_transform(self, xs, train, index=None):
        """The batch on its device as the model takes it (av_device_transform)."""
        return av_device_transform(self, xs, train, index)


class GatherLoader:
    """Batches of a data set with `gather(indices, pin)`, read by `threads` threads (0: in the caller)
    straight into pinned memory, a few batches ahead. The order is drawn from `generator` as a shuffled
    DataLoader draws it. No worker processes: nothing to start each epoch and no second copy into
    pinned memory, which is what limits a DataLoader fed from memory-mapped arrays."""

    def __init__(self, dataset, batch_size, train, generator, threads=4, drop_last=False, pin=True):
        self.dataset, self.generator, self.threads, self.pin = dataset, generator, threads, pin
        sampler = (torch.utils.data.RandomSampler(dataset, generator=generator) if train
                   else torch.utils.data.SequentialSampler(dataset))
        self.batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor
        # a DataLoader first draws its workers' base seed from the generator, then the order: the same
        # draws here give the same order for the same generator state
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        batches = iter(list(self.batch_sampler))
        if self.threads == 0:
            for b in batches:
                yield self.dataset.gather(b, self.pin)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gather")
        try:
            ahead = collections.deque(pool.submit(self.dataset.gather, b, self.pin)
                                      for b in itertools.islice(batches, self.threads + 2))
            while ahead:
                batch = ahead.popleft().result()
                following = next(batches, None)
                if following is not None:
                    ahead.append(pool.submit(self.dataset.gather, following, self.pin))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ======== 3c. Image-text sets: Food-101 and MVSA-Single (jsonl and MLA layouts), the toy I-T set ========

@dataclass
class Pair:
    id: str
    label: int
    image: str           # image file
    text: str            # raw text ('' when the text comes pre-tokenised)
    tokens: str          # '<stem>_token.npy' of pre-tokenised text, '<stem>_pm.npy' beside it ('' for raw text)
    src: str             # "list_file:line" that named the pair, for error messages


IT_TAGS = {"food101": "food", "mvsa": "mvsa", "toy": "toy"}      # the MLA layout's file-name tag
IT_NAMES = {"food101": "Food-101", "mvsa": "MVSA-Single"}
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
        if not isinstance(text, str):
            raise DataError(f"{src}: 'text' is {text!r}; expected a string (\"\" for no text)")
        if not isinstance(img, str) or not img:
            raise DataError(f"{src}: 'img' is {img!r}; expected an image path relative to the data root")
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


def it_classes(root, tag, train_labels, train_path, defined=None, srcs=()):
    """Class names and where they came from: stat_<tag>.txt / classes.txt (sorted), else the train labels,
    as many as data set `defined` has (DEFINED_CLASSES; `srcs`: the labels' 'file:line')."""
    for name in (f"stat_{tag}.txt", "classes.txt"):
        if (root / name).is_file():
            return sorted(_class_file(root / name)), str(root / name)
    if defined:
        defined_classes(train_labels, srcs, defined, root / f"stat_{tag}.txt")
    classes = sorted(set(train_labels))
    folded = {}
    for c in classes:
        folded.setdefault(" ".join(c.lower().split()), []).append(c)
    alike = [v for v in folded.values() if len(v) > 1]
    if alike:
        print(f"warning: labels of {train_path} that differ only in case or spaces are different classes: "
              f"{'; '.join(' / '.join(v) for v in alike)} (a stat_{tag}.txt naming the classes makes them errors)",
              file=sys.stderr)
    return classes, f"the labels of {train_path}"


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
    idir = best_dir([root / t.format(split=split) for t in IT_IMAGE_DIRS], files, lambda d, f: (d / f).is_file())
    if idir is None:
        tried = ", ".join(str(root / t.format(split=split)) for t in IT_IMAGE_DIRS)
        raise DataError(f"{rows[0][2]}: image '{files[0]}' not found; looked in {tried}\n{IT_LAYOUT_HELP}")
    folders = lambda templates: [root / t.format(split=split) for t in templates]
    tdir = best_dir(folders(IT_TOKEN_DIRS), stems, lambda d, s: (d / f"{s}_token.npy").is_file())
    xdir = None if tdir else best_dir(folders(IT_TEXT_DIRS), stems, lambda d, s: (d / f"{s}.txt").is_file())
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
    classes, class_src = it_classes(root, tag, [r[1] for r in lists["train"][1]], lists["train"][0],
                                    IT_NAMES.get(dataset), [r[-1] for r in lists["train"][1]])
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
    class_warnings({split: [p.label for p in out[split]] for split in lists}, classes)
    return out


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


@dataclass(frozen=True)
class ToyIT:
    """How the toy image-text set is made (what its scripts do not set)."""
    px: int = 32                 # images: px x px, showing class_blobs blobs in the class's colour
    class_blobs: int = 4
    clutter_blobs: int = 4       # among clutter_blobs random ones
    cue: float = 0.8             # captions: the probability that the cue word agrees with the label,
    fillers: int = 3             # among fillers random filler words


def make_toy_it(root, seed=0, n_train=600, n_dev=120, n_test=240, recipe=ToyIT()):
    """Write a small Food-101-like image-text set in the MMBT jsonl layout (train/dev/test.jsonl,
    images/<split>/<id>.jpg) and its tokenizer (tokenizer/vocab.txt, a BERT vocabulary of the
    caption words), generated deterministically from `seed`.

    Six classes in three pairs. The caption names the pair with one word (learned in a few steps)
    and, for the class inside the pair, has only a cue word that agrees with the label with
    probability `recipe.cue`, among random filler words; the image names the class by the colour of
    a few small blobs among random ones: slower to learn, but it holds what
    the text lacks. Joint training leans on the text and leaves the image under-trained, as on Food-101.
    """
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
            keep = rng.rand() < recipe.cue
            cue_word = cue_words[y // 2][y % 2 if keep else 1 - y % 2]
            caption = [openers[rng.randint(len(openers))], pair_words[y // 2], cue_word]
            caption += [filler[j] for j in rng.randint(0, len(filler), recipe.fillers)]
            order = [0] + (1 + rng.permutation(len(caption) - 1)).tolist()        # opener first, rest shuffled
            text = " ".join(caption[j] for j in order)
            blob_image(rng, recipe.px, palette[y], recipe.clutter_blobs, recipe.class_blobs).save(
                root / "images" / split / f"{pid}.jpg", quality=90)
            lines.append(json.dumps({"id": pid, "label": TOY_IT_CLASSES[y], "text": text,
                                     "img": f"images/{split}/{pid}.jpg"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ======== 3d. IEMOCAP (audio fbank, face image, text) in the MLA list layout, the toy A-I-T set ========

# The MLA code's IEMOCAP layout: list lines '<utt>.mp4 [split|sign] <text> [split|sign] <Label>', a
# fbank .npy per utterance, a folder of face images per utterance, text pre-tokenised or in the line.

@dataclass
class Utterance:
    id: str
    label: int
    audio: str           # fbank .npy (or .wav)
    image: str           # the face image used
    text: str            # the transcript from the list line
    tokens: str          # '<utt>_token.npy' of pre-tokenised text, '<utt>_pm.npy' beside it ('' = tokenise `text`)
    src: str             # "list_file:line" that named the utterance, for error messages


IEMO_SEP = "[split|sign]"
IEMO_EXAMPLE = "Ses01F_impro01_F000.mp4 [split|sign] Excuse me. [split|sign] Neutral"
IEMO_AUDIO_DIRS = ["audio/{split}_fbank", "{split}_fbank", "audio/{split}", "audio/fbank", "fbank", "audio",
                   "subaudio", "."]
IEMO_IMAGE_DIRS = ["visual/{split}_imgs", "{split}_imgs", "visual/{split}", "faces/{split}", "images/{split}",
                   "faces", "visual", "images"]
IEMO_LAYOUT_HELP = """accepted layout (the MLA code's IEMOCAP layout):
  lists:  my_train_iemo.txt and my_test_iemo.txt (optional my_dev_iemo.txt: the validation split), or a single
          list, my_iemo.txt or Session1.txt ... Session5.txt, split 60/20/20 (train/dev/test, seeded, stratified);
          lines '<utt>.mp4 [split|sign] <text> [split|sign] <Label>'; optional stat_iemo.txt (class names)
  audio:  a fbank <utt>.npy (frames x mel bins) or <utt>.wav, e.g. in audio/{split}_fbank/
  image:  a folder <utt>/ of face images (the middle one in sorted order is used) or one <utt>.jpg,
          e.g. in visual/{split}_imgs/
  text:   pre-tokenised text_token/{split}_token/<utt>_token.npy + <utt>_pm.npy when present, else the list
          line's text through the BERT tokenizer
  {split} is train, dev or test (all for a single list); --audio_dir / --image_dir name the folders if they
  are elsewhere."""


def iemocap_rows(path):
    """[(utt, label, 'file:line', text)] of an MLA IEMOCAP list. The text is whatever stands between the two
    separators (punctuation, brackets, quotes and any unicode kept); the first field may be a path, and its
    extension (.mp4, .wav) is dropped."""
    rows = []
    for ln, s in _nonempty(read_text_lines(path), path, IEMO_EXAMPLE):
        parts = [p.strip() for p in s.split(IEMO_SEP)]
        if len(parts) != 3 or not parts[0] or not parts[2]:
            shown = s if len(s) <= 120 else s[:117] + "..."
            raise DataError(f"{where(path, ln)}: '{shown}' has {len(parts) - 1} '{IEMO_SEP}' separators; "
                            f"expected '<utt>.mp4 {IEMO_SEP} <text> {IEMO_SEP} <Label>'")
        utt = os.path.splitext(parts[0].replace("\\", "/").rsplit("/", 1)[-1])[0]
        rows.append((utt, parts[2], where(path, ln), parts[1]))
    return rows


def iemocap_lists(root, split_seed=0):
    """The lists of each split: ({'train': rows, 'dev': rows or None, 'test': rows}, layout, the list that
    gives the class names when there is no stat_iemo.txt). Split files when present; otherwise one list
    (my_iemo.txt, or Session*.txt together) split 60/20/20 with a seeded stratified draw."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (pass --data_root)\n{IEMO_LAYOUT_HELP}")
    if (root / "my_train_iemo.txt").is_file() or (root / "my_test_iemo.txt").is_file():
        lists = {split: iemocap_rows(root / f"my_{split}_iemo.txt") for split in ("train", "test")}
        dev = root / "my_dev_iemo.txt"
        lists["dev"] = iemocap_rows(dev) if dev.is_file() else None
        return lists, "split lists", root / "my_train_iemo.txt"
    files = sorted(root.glob("Session*.txt"), key=lambda f: natural_key(f.name)) or \
        [f for f in [root / "my_iemo.txt"] if f.is_file()]
    if not files:
        raise DataError(f"{root}: no IEMOCAP list found (my_train_iemo.txt, my_iemo.txt or Session*.txt)\n"
                        f"{IEMO_LAYOUT_HELP}")
    rows = [r for f in files for r in iemocap_rows(f)]
    labels = [r[1] for r in rows]
    train, rest = stratified_split(labels, 0.4, split_seed)
    dev, test = stratified_split([labels[i] for i in rest], 0.5, split_seed)
    if not dev or not test:
        raise DataError(f"{files[0]}: {len(rows)} utterances leave the dev or test part of a 60/20/20 split "
                        "empty; expected more utterances")
    lists = {"train": [rows[i] for i in train], "dev": [rows[rest[i]] for i in dev],
             "test": [rows[rest[i]] for i in test]}
    return lists, f"one list, split 60/20/20 with seed {split_seed}", files[0] if len(files) == 1 else root


def _face_image(idir, utt, src):
    """The face image of an utterance: the middle image (natural sorted order) of the folder <utt>/, or <utt>.jpg."""
    folder = idir / utt
    if folder.is_dir():
        images = list_frames(folder)
        if not images:
            raise DataError(f"{src}: face image folder {folder}/ of '{utt}' is empty; expected .jpg images")
        return images[pick_even(len(images), 1)[0]]
    image = next((idir / (utt + e) for e in IMAGE_EXTS if (idir / (utt + e)).is_file()), None)
    if image is None:
        raise DataError(f"{src}: face image of '{utt}' missing: expected a folder {folder}/ or {folder}.jpg")
    return image


def _has_face(d, utt):
    return (d / utt).is_dir() or any((d / (utt + e)).is_file() for e in IMAGE_EXTS)


def iemocap_dirs(root, split, rows, audio_dir=None, image_dir=None):
    """The folders of one split's audio, face images and (when pre-tokenised) text: (audio, image, tokens or None)."""
    entries = [(utt, label, src) for utt, label, src, _ in rows]
    has_audio = lambda d, u: (d / f"{u}.npy").is_file() or (d / f"{u}.wav").is_file()
    adir = _find_dir(root, audio_dir, IEMO_AUDIO_DIRS, split, entries, has_audio, "audio (.npy/.wav)", IEMO_LAYOUT_HELP)
    idir = _find_dir(root, image_dir, IEMO_IMAGE_DIRS, split, entries, _has_face, "face image", IEMO_LAYOUT_HELP)
    tdir = best_dir([root / t.format(split=split) for t in IT_TOKEN_DIRS], [r[0] for r in rows],
                    lambda d, u: (d / f"{u}_token.npy").is_file())
    return adir, idir, tdir


def iemocap_split(split, rows, dirs, classes, class_src, num_mel_bins=None, skip_bad=False, stats=None):
    """[Utterance] of one split's rows in dirs (iemocap_dirs), every audio header or fbank shape checked. An
    utterance listed twice (stats['seen'] holds those of the splits read before) or an unknown label is an error;
    with skip_bad an utterance whose audio, image or token file is missing is skipped and counted in
    stats['skipped']."""
    stats = {} if stats is None else stats
    seen, (adir, idir, tdir) = stats.setdefault("seen", {}), dirs
    out = []
    for utt, label, src, text in rows:
        y = _label_index(label, classes, src, class_src)
        if utt in seen:
            raise DataError(f"{src}: utterance '{utt}' listed twice (first at {seen[utt]}); expected each utterance "
                            "once, in one split")
        seen[utt] = src
        try:
            audio = next((adir / (utt + e) for e in (".npy", ".wav") if (adir / (utt + e)).is_file()), None)
            if audio is None:
                raise DataError(f"{src}: audio of '{utt}' missing: expected {adir / utt}.npy (a fbank) or .wav")
            try:
                check_audio(audio, num_mel_bins)
            except DataError as e:
                raise DataError(f"{e} (utterance at {src})") from None
            image = _face_image(idir, utt, src)
            tokens = ""
            if tdir is not None:
                for part in ("token", "pm"):
                    if not (tdir / f"{utt}_{part}.npy").is_file():
                        raise DataError(f"{src}: text of '{utt}' not found: expected {tdir / f'{utt}_{part}.npy'}")
                tokens = str(tdir / f"{utt}_token.npy")
            out.append(Utterance(utt, y, str(audio), str(image), text, tokens, src))
        except DataError:
            if not skip_bad:
                raise
            stats["skipped"] = stats.get("skipped", 0) + 1
    if not out:
        raise DataError(f"{rows[0][2].rsplit(':', 1)[0]}: no usable utterances in the {split} split")
    return out


def load_iemocap_splits(root, split_seed=0, audio_dir=None, image_dir=None, num_mel_bins=None, skip_bad=False):
    """dict(layout, classes, train, dev (None without a dev split), test: lists of Utterance, skipped: count).
    Class names from stat_iemo.txt / classes.txt (sorted, as the official code sorts them), else the sorted
    labels of the training list."""
    root = Path(root)
    lists, layout, class_list = iemocap_lists(root, split_seed)
    classes, class_src = it_classes(root, "iemo", [r[1] for r in lists["train"]], class_list, "IEMOCAP",
                                    [r[2] for r in lists["train"]])
    one = layout.startswith("one list")
    out, stats = {"layout": layout, "classes": classes, "dev": None}, {}
    for split, rows in lists.items():
        if rows is not None:
            name = "all" if one else split                # of the error messages
            out[split] = iemocap_split(name, rows, iemocap_dirs(root, name, rows, audio_dir, image_dir), classes,
                                       class_src, num_mel_bins, skip_bad, stats)
    class_warnings({split: [u.label for u in out[split]] for split in lists if out.get(split)}, classes)
    out["skipped"] = stats.get("skipped", 0)
    return out


class AITDataset(torch.utils.data.Dataset):
    """Returns (audio [1, audio_len, mel_bins], image [3, S, S], text [2, max_len], label, index): the fbank
    read as the A-V loader reads it, then (fbank - fbank_mean) / fbank_std; image and text as ITDataset
    makes them (`text`: ITDataset's image_size, max_len, tokenizer, special_tokens, vocab_size)."""

    def __init__(self, utts, train, audio_len=1024, num_mel_bins=128, fbank_mean=0.0, fbank_std=1.0, **text):
        self.utts, self.fbank_mean, self.fbank_std = list(utts), fbank_mean, fbank_std
        self.audio = AVDataset([Clip(u.id, u.label, u.audio, "", u.src) for u in self.utts], train, frames=1,
                               audio_len=audio_len, num_mel_bins=num_mel_bins)
        self.it = ITDataset([Pair(u.id, u.label, u.image, u.text, u.tokens, u.src) for u in self.utts], train, **text)

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i):
        audio = (self.audio.load_audio(self.audio.clips[i]) - self.fbank_mean) / self.fbank_std
        image, text, label, _ = self.it[i]
        return audio, image, text, label, i


TOY_AIT_CLASSES = ["Neutral", "Angry", "Sad", "Happy"]
CAVMAE_FBANK_MEAN, CAVMAE_FBANK_STD = -5.081, 4.4849      # the fbank statistics CAV-MAE normalises with


@dataclass(frozen=True)
class ToyAIT:
    """How the toy A-I-T set is made (what its script does not set)."""
    text_cue: float = 0.55       # the probability that each modality shows its class (see make_toy_ait)
    audio_cue: float = 0.55
    image_cue: float = 0.5
    faces: int = 3               # face images an utterance, px x px, with class_blobs blobs in the class's colour
    px: int = 32
    class_blobs: int = 4
    clutter_blobs: int = 3       # among clutter_blobs random ones


def make_toy_ait(root, seed=0, n_train=1000, n_dev=200, n_test=400, frames=64, mel_bins=32, recipe=ToyAIT()):
    """Write a small IEMOCAP-like set in the MLA layout (my_{train,dev,test}_iemo.txt, stat_iemo.txt,
    audio/{split}_fbank/<utt>.npy, visual/{split}_imgs/<utt>/frame_0000k.jpg) and its tokenizer
    (tokenizer/vocab.txt, a BERT vocabulary of the transcript words), generated deterministically from
    `seed`; the transcripts stay in the list lines.

    Four emotions, two of low arousal (Neutral, Sad) and two of high (Angry, Happy). The transcript always
    holds an arousal word (learned in a few steps) and, with probability `text_cue`, an emotion word, among
    filler words and punctuation; the fbank has, with probability `audio_cue`, a raised band of mel bins at
    the class's position over half the clip (middling); the face images show, with probability
    `image_cue`, `class_blobs` blobs in the class's colour among `clutter_blobs` random ones (slow to learn).
    Without its cue a modality says nothing about the class (the text still names the arousal), so each
    alone tops out near text_cue + (1 - text_cue) / 2, audio_cue + (1 - audio_cue) / 4 and
    image_cue + (1 - image_cue) / 4 (defaults: 77.5, 66, 62.5 %), and together they hold more than any one.
    Text dominates, audio is middling and the image is weakest, as on IEMOCAP.
    """
    root, (text_cue, audio_cue, image_cue) = Path(root), (recipe.text_cue, recipe.audio_cue, recipe.image_cue)
    rng = np.random.RandomState(seed)
    arousal_words = [["calm", "quiet", "slowly"], ["wow", "loud", "hey"]]      # low (y even), high (y odd)
    emotion_words = [["okay", "fine", "sure"], ["furious", "hate", "stop"], ["miss", "lonely", "sorry"],
                     ["great", "love", "yay"]]                                 # in TOY_AIT_CLASSES order
    filler = ["i", "you", "we", "it", "the", "that", "this", "was", "is", "just", "so", "really", "well", "know",
              "think", "there", "home", "today", "again", "now", "café", "naïve"]
    marks = [".", ",", "!", "?", "...", "--", "'s"]
    palette = [(40, 200, 40), (220, 40, 40), (40, 80, 230), (230, 210, 40)]
    words = sorted({w for ws in emotion_words + arousal_words for w in ws} | {"cafe", "naive"} | set(filler[:-2]))
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "-", "'", "s"] + words) + "\n")
    (root / "stat_iemo.txt").write_text("\n".join(TOY_AIT_CLASSES) + "\n")
    band = max(1, mel_bins // 16)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        (root / "audio" / f"{split}_fbank").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            y = i % 4
            utt = f"Ses0{1 + i % 5}F_{split}{i:04d}"
            # text: filler words, the arousal word, maybe the emotion word, some punctuation
            words_i = [filler[j] for j in rng.randint(0, len(filler), 3)] + [arousal_words[y % 2][rng.randint(3)]]
            if rng.rand() < text_cue:
                words_i.append(emotion_words[y][rng.randint(3)])
            words_i = [words_i[j] for j in rng.permutation(len(words_i))]
            text = " ".join(w + (marks[rng.randint(len(marks))] if rng.rand() < 0.3 else "") for w in words_i)
            text = text[0].upper() + text[1:]
            # audio: a noisy floor falling with frequency, maybe a raised band at the class's position over half
            # the clip; stored in log-mel units (CAV-MAE's normalisation maps it back)
            fb = 0.8 * rng.randn(frames, mel_bins) + np.linspace(0.5, -0.5, mel_bins)[None]
            if rng.rand() < audio_cue:
                lo = y * (mel_bins // 4 + band)          # a different place in its patch row for each class
                t0 = rng.randint(0, frames // 2 + 1)
                fb[t0:t0 + frames // 2, lo:lo + band] += rng.uniform(1.5, 2.5)
            fb = CAVMAE_FBANK_MEAN + CAVMAE_FBANK_STD * fb
            np.save(root / "audio" / f"{split}_fbank" / f"{utt}.npy", fb.astype(np.float32))
            # face images: random blobs, maybe with blobs in the class's colour
            d = root / "visual" / f"{split}_imgs" / utt
            d.mkdir(parents=True, exist_ok=True)
            shows = rng.rand() < image_cue
            for k in range(recipe.faces):
                blob_image(rng, recipe.px, palette[y] if shows else None, recipe.clutter_blobs, recipe.class_blobs,
                           radius=(3, 6)).save(d / f"frame_{k + 1:05d}.jpg", quality=90)
            lines.append(f"{utt}.mp4 {IEMO_SEP} {text} {IEMO_SEP} {TOY_AIT_CLASSES[y]}")
        (root / f"my_{split}_iemo.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ======== 3e. Table 6 features (features.npz, the MMIN layout), the missing-view mask, the toy features ========

# Pre-extracted features of two or more views (IEMOCAP's: audio, visual, text) and a seeded mask of missing views.

FEATURE_MODALITIES = ["audio", "visual", "text"]
MMIN_FOLDERS = {"audio": "A", "visual": "V", "text": "L"}
MMIN_SPLITS = {"train": "trn", "val": "val", "test": "tst"}
FEATURE_LAYOUT_HELP = """accepted layouts:
  features.npz:  label (N,), split (N,) with values train/val/test (val optional: then --val_ratio of train
                 is held out) and one (N, d) array per view, e.g. audio, visual, text: every other array,
                 in the file's order (or the ones --modalities names)
  MMIN layout:   A/<name>.h5, V/<name>.h5, L/<name>.h5 (one dataset per utterance, (d,) or (T, d),
                 averaged over T), target/<fold>/{trn,val,tst}_label.npy (indices or one-hot) and
                 target/<fold>/{trn,val,tst}_int2name.npy (utterance names); reading .h5 needs h5py"""


def _split_data(xs, y, rows):
    return [x[rows] for x in xs], y[rows]


def load_features_npz(path, modalities=None):
    """features.npz -> dict(classes, modalities, layout, train=(xs, y), val=(xs, y) or None, test=(xs, y));
    xs is a list of float32 (n, d) arrays, one per view: `modalities`, or every array other than label and
    split in the file's order; y int64 labels."""
    path = Path(path)
    if path.suffix != ".npz":                    # a folder holding features.npz
        path = path / "features.npz"
    if not path.is_file():
        raise DataError(f"{path}: file not found\n{FEATURE_LAYOUT_HELP}")
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable .npz ({e}); expected arrays label, split and one per view "
                        "(string arrays as fixed-width unicode, not objects)") from None
    views = list(modalities or [k for k in arrays if k not in ("label", "split")])
    missing = [k for k in views + ["label", "split"] if k not in arrays]
    if missing:
        raise DataError(f"{path}: no array {', '.join(missing)}; found {', '.join(sorted(arrays))}\n"
                        f"{FEATURE_LAYOUT_HELP}")
    if len(views) < 2:
        raise DataError(f"{path}: views {', '.join(views) or '(none)'}; the missing-view methods need two or more "
                        f"(arrays besides label and split)\n{FEATURE_LAYOUT_HELP}")
    label = arrays["label"]
    label = label.argmax(1) if label.ndim == 2 and label.shape[1] > 1 else label.reshape(-1)    # one-hot or indices
    split = np.char.strip(arrays["split"].astype(str).reshape(-1))
    n = len(label)
    if len(split) != n:
        raise DataError(f"{path}: split has {len(split)} entries but label has {n}; expected one per sample")
    xs = []
    for name in views:
        x = arrays[name]
        if x.ndim != 2 or len(x) != n:
            raise DataError(f"{path}: array {name} has shape {x.shape}; expected ({n}, width), one row per label "
                            "(a view), or name the views with --modalities")
        if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
            raise DataError(f"{path}: array {name} holds non-numeric or non-finite values; expected finite numbers "
                            "(a view), or name the views with --modalities")
        xs.append(x.astype(np.float32))
    bad = sorted(set(split.tolist()) - {"train", "val", "test"})
    if bad:
        row = int(np.flatnonzero(split == bad[0])[0])
        raise DataError(f"{path}: split value '{bad[0]}' (row {row}); expected train, val or test")
    if np.issubdtype(label.dtype, np.integer):
        if label.min() < 0:
            raise DataError(f"{path}: negative label {label.min()}; expected class indices 0..C-1 or names")
        classes = [str(c) for c in range(int(label.max()) + 1)]
        y = label.astype(np.int64)
    else:
        names = np.char.strip(label.astype(str))
        classes = sorted(set(names.tolist()), key=natural_key)           # '2' before '10'
        y = np.array([classes.index(c) for c in names.tolist()], dtype=np.int64)
    out = {"classes": classes, "modalities": views, "layout": "features.npz"}
    for s in ("train", "val", "test"):
        rows = np.flatnonzero(split == s)
        if not len(rows) and s != "val":
            raise DataError(f"{path}: no sample with split '{s}'; expected a non-empty train and test split")
        out[s] = _split_data(xs, y, rows) if len(rows) else None
    return out


def _mmin_h5(folder, name=None):
    if name:
        path = folder / (name if name.endswith(".h5") else name + ".h5")
        if not path.is_file():
            raise DataError(f"{path}: file not found; expected the features named by --mmin_files")
        return path
    found = sorted(p for p in folder.glob("*.h5") if "mean_std" not in p.name)
    if len(found) != 1:
        what = "no .h5 file" if not found else f"{len(found)} .h5 files ({', '.join(p.name for p in found)})"
        raise DataError(f"{folder}: {what}; expected one, or name them with --mmin_files A,V,L "
                        f"(e.g. comparE,denseface,bert_large)\n{FEATURE_LAYOUT_HELP}")
    return found[0]


def load_mmin(root, fold=1, files=None):
    """The MMIN layout (see FEATURE_LAYOUT_HELP) for one cross-validation fold; same dict as
    load_features_npz. h5py is imported here only, as it is an optional dependency."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (pass --data_root)\n{FEATURE_LAYOUT_HELP}")
    h5_paths = [_mmin_h5(root / MMIN_FOLDERS[m], (files or [None] * 3)[k]) for k, m in enumerate(FEATURE_MODALITIES)]
    try:
        import h5py
    except ImportError:
        raise DataError(f"{h5_paths[0]}: reading the MMIN layout's .h5 files needs h5py, an optional "
                        "dependency: pip install h5py (or convert the features to features.npz)") from None
    target = root / "target" / str(fold)
    out, classes = {"modalities": list(FEATURE_MODALITIES), "layout": f"mmin fold {fold}"}, None
    h5s = []
    try:
        for p in h5_paths:
            try:
                h5s.append(h5py.File(p, "r"))
            except OSError as e:
                raise DataError(f"{p}: not a readable HDF5 file ({e}); expected MMIN's features, one entry per "
                                "utterance") from None
        for split, code in MMIN_SPLITS.items():
            paths = [target / f"{code}_label.npy", target / f"{code}_int2name.npy"]
            for p in paths:
                if not p.is_file():
                    raise DataError(f"{p}: file not found (fold {fold})\n{FEATURE_LAYOUT_HELP}")
            try:
                label = np.load(paths[0], allow_pickle=False)
                names = np.load(paths[1], allow_pickle=True)          # the user's own name list
            except (OSError, ValueError) as e:
                raise DataError(f"{paths[0].parent}: unreadable {code}_label.npy or {code}_int2name.npy: {e}") from None
            one_hot = label.ndim == 2 and label.shape[1] > 1         # else indices, (N,) or a column (N, 1)
            y = (label.argmax(1) if one_hot else label.reshape(-1)).astype(np.int64)
            width = label.shape[1] if one_hot else int(y.max()) + 1
            classes = [str(c) for c in range(max(width, len(classes or [])))]
            if len(names) != len(y):
                raise DataError(f"{paths[1]}: {len(names)} names but {paths[0].name} has {len(y)} labels; "
                                "expected one name per label")
            xs = [[] for _ in h5s]
            for i, entry in enumerate(names):
                name = np.asarray(entry).reshape(-1)[0]
                name = name.decode() if isinstance(name, bytes) else str(name)
                for k, (h5, p) in enumerate(zip(h5s, h5_paths)):
                    if name not in h5:
                        raise DataError(f"{p}: no entry '{name}' (row {i} of {paths[1]}); expected one dataset "
                                        "per utterance")
                    v = np.asarray(h5[name][()], dtype=np.float32)
                    if v.ndim == 2 and len(v) == 0:
                        raise DataError(f"{p}: entry '{name}' (row {i} of {paths[1]}) is an empty sequence "
                                        f"{v.shape}; expected at least one time step")
                    if v.ndim == 2:              # a sequence (T, d): its mean over time
                        v = v.mean(0)
                    if not np.isfinite(v).all():
                        raise DataError(f"{p}: entry '{name}' (row {i} of {paths[1]}) holds non-finite values; "
                                        "expected finite numbers")
                    if v.ndim != 1 or (xs[k] and len(v) != len(xs[k][0])):
                        raise DataError(f"{p}: entry '{name}' has shape {v.shape}; expected (d,) or (T, d) "
                                        "with the same d for every utterance")
                    xs[k].append(v)
            out[split] = ([np.stack(x) for x in xs], y)
    finally:
        for h5 in h5s:
            h5.close()
    out["classes"] = classes
    return out


def missing_mask(n, num_views, rate, seed, split=0):
    """(n, M) bool mask, True = view present (the paper's missing-view protocol). round(rate * n * M) of the n * M entries are
    removed, drawn from (seed, split) alone (so identical for every method), and every sample keeps at
    least one view: one view per sample is drawn first and kept, the removed entries are drawn among
    the others. At most n * (M - 1) entries can go, so a rate above (M - 1) / M removes that many."""
    rng = np.random.default_rng([seed, split])
    kept = rng.integers(num_views, size=n)
    others = np.flatnonzero(np.arange(num_views)[None, :] != kept[:, None])   # flat indices into (n, M)
    n_drop = min(int(round(rate * n * num_views)), len(others))
    mask = np.ones(n * num_views, dtype=bool)
    mask[rng.choice(others, n_drop, replace=False)] = False
    return mask.reshape(n, num_views)


class FeatureDataset(torch.utils.data.Dataset):
    """Returns (*views, mask, label, index); a missing view's features are zeros."""
    masked = True

    def __init__(self, xs, mask, y):
        self.mask = torch.as_tensor(mask, dtype=torch.bool)
        self.xs = [torch.as_tensor(x, dtype=torch.float32) * self.mask[:, m:m + 1] for m, x in enumerate(xs)]
        self.y = torch.as_tensor(y, dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (*[x[i] for x in self.xs], self.mask[i], self.y[i], i)


class FeatureNorm(nn.Module):
    """Standardise each view with the mean and std of the training rows where it is present (a constant
    feature keeps std 1), as --feature_norm train does. train_missing.py attaches it to the method
    (method.feature_norm), so best.pt carries the statistics: standardise new features with them."""

    def __init__(self, xs, mask):
        super().__init__()
        for m, x in enumerate(xs):
            rows = np.asarray(x, np.float64)[np.asarray(mask)[:, m]]
            mean, std = (rows.mean(0), rows.std(0)) if len(rows) else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
            self.register_buffer(f"mean{m}", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer(f"std{m}", torch.as_tensor(np.where(std > 1e-8, std, 1.0), dtype=torch.float32))

    def forward(self, xs):
        """Standardised copies of the views xs (numpy (n, d_m) arrays)."""
        return [((torch.as_tensor(x, dtype=torch.float32) - getattr(self, f"mean{m}").cpu())
                 / getattr(self, f"std{m}").cpu()).numpy() for m, x in enumerate(xs)]


@dataclass(frozen=True)
class ToyFeatures:
    """How the toy features are made (what train_missing.py does not set; see make_toy_features)."""
    num_classes: int = 4
    latent: int = 8                   # the dimensions of the latent the views share
    gains: tuple = (0.8, 0.3, 1.0)    # each view's share of it (audio, visual, text)
    separation: float = 0.8           # the spread of the class centres
    noise: float = 0.5                # each view's own noise


def make_toy_features(path, seed=0, n_train=1000, n_val=200, n_test=400, dims=(32, 48, 64), recipe=ToyFeatures()):
    """Write a small three-view features.npz from `seed` (the Table 6 toy set).

    A sample's latent u = class centre + N(0, I) in `latent` dimensions is shared by the views (so a
    missing view can be imagined from the others); each view sees part of u (audio the first 5/8 of
    the dimensions, visual the last 5/8, text all of them), scaled by its gain (audio 0.8, visual 0.3,
    text 1.0: text is the best view, visual the worst), through a random tanh layer, plus its own
    noise and a private nuisance factor. No view alone is as good as the fusion of all three."""
    rng, (num_classes, latent, noise) = np.random.RandomState(seed), (recipe.num_classes, recipe.latent, recipe.noise)
    n = n_train + n_val + n_test
    centres = rng.randn(num_classes, latent) * recipe.separation
    y = rng.permutation(np.arange(n) % num_classes)
    u = centres[y] + rng.randn(n, latent)
    k = max(1, round(latent * 5 / 8))
    parts = [slice(0, k), slice(latent - k, latent), slice(0, latent)]
    arrays = {}
    for name, d, gain, part in zip(FEATURE_MODALITIES, dims, recipe.gains, parts):
        seen = gain * u[:, part]
        nuisance = rng.randn(n, 2)
        proj = rng.randn(seen.shape[1] + 2, d) / np.sqrt(seen.shape[1] + 2)
        x = np.tanh(np.concatenate([seen, nuisance], 1) @ proj) + noise * rng.randn(n, d)
        arrays[name] = x.astype(np.float32)
    arrays["label"] = y.astype(np.int64)
    arrays["split"] = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# ======== 3f. Table 7 CLIP features: batched extraction, the feature cache and data set; the toy CLIP's pretraining ========

class CLIPInputs(torch.utils.data.Dataset):
    """Pairs as CLIP's inputs: (pixels (3, S, S) made by the image processor, text (2, max_len) = token ids
    (the tokenizer's, with its special tokens, cut and padded to max_len) and padding mask (1 on padding),
    label, index); modalities=['image'] or ['text'] gives (that input, label, index). The pairs must hold raw
    text (CLIP has its own tokenizer): pre-tokenised (MLA layout) text is an error."""

    def __init__(self, pairs, clip, modalities=("image", "text")):
        self.pairs, self.clip, self.modalities = list(pairs), clip, list(modalities)
        tokens = next((p for p in self.pairs if p.tokens), None)
        if tokens is not None:
            raise DataError(f"{tokens.tokens}: pre-tokenised text (pair at {tokens.src}); CLIP's text tower needs "
                            "the raw text: use the jsonl layout or raw text files text/<split>/<stem>.txt")

    def __len__(self):
        return len(self.pairs)

    def image(self, pair):
        return self.clip.processor(images=load_image(pair.image, pair.src), return_tensors="pt")["pixel_values"][0]

    def text(self, pair):
        enc = self.clip.tokenizer(pair.text, padding="max_length", truncation=True, max_length=self.clip.max_len)
        ids, keep = torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])
        return torch.stack([ids, 1 - keep])

    def __getitem__(self, i):
        pair = self.pairs[i]
        return (*[self.image(pair) if m == "image" else self.text(pair) for m in self.modalities], pair.label, i)


@torch.no_grad()
def extract_features(tower, dataset, batch_size=256, device="cpu", num_workers=0, desc="features"):
    """One tower over a data set of (input, label, index) items, in batches, showing its progress:
    (N, tower.dim) float32 on the CPU. Draws nothing from torch's global RNG (the loader's worker seed comes from
    its own generator), so a run that extracts the features trains as one that reads them from the cache."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator())
    tower.eval().to(device)
    out = [tower(x.to(device)).float().cpu() for x, _, _ in with_progress(loader, len(loader), desc)]
    return torch.cat(out)


def cached_features(path, n):
    """(features (n, w), None) from a feature cache file, or (None, why) when it fails its check: it loads,
    holds n rows, and their checksum is the one written beside them (torch.load reads a file with
    overwritten tensor bytes without complaint)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        feats, crc = saved["features"], json.loads(saved.get("meta", "{}")).get("crc32")
    except Exception as e:          # torch.load of a damaged file raises many kinds of errors
        return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if crc is None:
        return None, "holds no checksum (written by an earlier version)"
    if not torch.is_tensor(feats) or feats.ndim != 2 or len(feats) != n:
        return None, f"holds features of shape {tuple(getattr(feats, 'shape', ()))}; expected {n} rows"
    if tensor_checksum(feats) != crc:
        return None, "its features differ from those it was written with (overwritten or damaged)"
    return feats, None


def clip_features(clip, pairs, split, cache_dir, batch_size=256, device="cpu", num_workers=0):
    """[image features (N, w_i), text features (N, w_t)] of one split's pairs: read from
    <cache_dir>/clip/<split>-<modality>-<key>.pt when present and it passes its check (cached_features),
    else computed by the tower and written there (temporary file + rename, so a killed run leaves no
    partial file). The key (CLIPBundle.cache_key) changes with the model, the items and the
    preprocessing, so any change computes new features."""
    out = []
    for modality in ("image", "text"):
        path = Path(cache_dir) / "clip" / f"{split}-{modality}-{clip.cache_key(modality, pairs)}.pt"
        feats, why = cached_features(path, len(pairs)) if path.is_file() else (None, None)
        if why is not None:
            cache_damaged(path, why, path.parent, "give --cache_dir a writable folder")
        if feats is not None:
            print(f"CLIP {modality} features of {split} ({len(pairs)}): {path} (cached)")
        else:
            print(f"CLIP {modality} features of {split} ({len(pairs)}): extracting with {clip.name} -> {path}", flush=True)
            feats = extract_features(clip.tower(modality), CLIPInputs(pairs, clip, [modality]), batch_size, device,
                                     num_workers, desc=f"{split} {modality}")
            meta = {"model": clip.name, "fingerprint": clip.fingerprint(), "modality": modality, "feature": clip.feature,
                    "preprocessing": clip.preprocessing(modality), "ids": [p.id for p in pairs],
                    "crc32": tensor_checksum(feats)}
            atomic_torch_save({"features": feats, "meta": json.dumps(meta, default=str)}, path)
        out.append(feats)
    return out


class CLIPFeatureDataset(torch.utils.data.Dataset):
    """Cached features as a data set: (image features, text features, label, index)."""

    def __init__(self, image, text, labels):
        self.image, self.text, self.labels = image, text, torch.as_tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.image[i], self.text[i], self.labels[i], i


def pretrain_toy_clip(clip, pairs, epochs=15, batch_size=64, lr=2e-3, seed=0):
    """Stand-in for CLIP's pretraining, for the toy CLIP: CLIP's own contrastive loss (CLIPModel with
    return_loss=True: symmetric cross-entropy of the image-text similarities of a batch) on `pairs` (the
    toy's training pairs; labels are not used), AdamW, seeded. A random CLIP's features are unaligned and
    its image features barely above chance; after this they are aligned and informative."""
    g = torch.Generator()
    g.manual_seed(seed)
    loader = torch.utils.data.DataLoader(CLIPInputs(pairs, clip), batch_size=batch_size, shuffle=True, generator=g)
    optimizer = torch.optim.AdamW(clip.model.parameters(), lr=lr)
    clip.model.train()
    for epoch in range(epochs):
        for pixels, text, _, _ in loader:
            loss = clip.model(input_ids=text[:, 0], attention_mask=(text[:, 1] == 0).long(), pixel_values=pixels,
                              return_loss=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"toy CLIP: contrastive pretraining on {len(pairs)} pairs, epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}",
              flush=True)
    clip.model.eval()
    clip._fingerprint = None            # the weights changed
    return clip


# ======== 4. The loop: seeding, the loader, evaluation, one epoch, train/val/test, torch.compile ========

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n):
    """torch uses `n` CPU threads inside the block (0 or None: unchanged); the previous count is restored."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_worker(_worker_id):
    # DataLoader gives every worker its own torch seed; derive numpy's and random's from it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_size, train, seed=0, num_workers=0, device="cpu", gather=False):
    """A DataLoader (shuffled from a generator seeded with `seed` when training), or with `gather` (a data set that
    reads whole batches, e.g. the cache with crops on the GPU; one process) a GatherLoader with `num_workers` threads.
    Under torchrun: a DistributedSampler (seeded, set_epoch by train_one_epoch)
    gives each process batch_size / processes items of each batch (a split that does not divide by the number
    of processes is padded with repeated items, as DistributedSampler does); evaluation shards take every item
    once. The processes draw the same random numbers (augmentations, dropout): seeded alike, they stay in step."""
    g = torch.Generator()
    g.manual_seed(seed)
    if gather and not dataset.gatherable:
        raise ValueError("gather=True needs a data set that reads whole batches (the cache with augment_on='device')")
    if under_torchrun():                  # each process its share of every batch: together, one process's batch
        rank, n = world()
        if batch_size % n:
            raise ValueError(f"--batch_size {batch_size} does not split evenly over {n} processes")
        sampler = (torch.utils.data.DistributedSampler(dataset, n, rank, shuffle=True, seed=seed) if train
                   else range(rank, len(dataset), n))       # evaluation: every sample once, no padding
        batch_size //= n
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, generator=g, num_workers=num_workers,
            worker_init_fn=seed_worker, pin_memory=str(device).startswith("cuda"),
            drop_last=train and len(sampler) % batch_size == 1, persistent_workers=num_workers > 0 and not train)
    drop_last = train and len(dataset) % batch_size == 1      # BatchNorm cannot train on 1 sample
    if gather:
        return GatherLoader(dataset, batch_size, train, g, num_workers, drop_last, pin=str(device).startswith("cuda"))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, generator=g, num_workers=num_workers,
        worker_init_fn=seed_worker, pin_memory=str(device).startswith("cuda"), drop_last=drop_last,
        # training workers start afresh each epoch, seeded from the generator, so a resumed run draws
        # the same augmentations as an uninterrupted one
        persistent_workers=num_workers > 0 and not train)


@torch.no_grad()
def evaluate(method, loader, device, amp=False):
    """Accuracy in percent of every modality alone and of the fused prediction. With missing views
    (a masked data set) a modality's accuracy counts only the samples where its view is present, and
    is None when no sample of the split has that view."""
    method.eval()
    if under_torchrun():                # torchrun: rank 0's BatchNorm statistics (per process without SyncBatchNorm)
        for bn in method.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                for b in bn.buffers():
                    torch.distributed.broadcast(b, 0)
    masked = getattr(loader.dataset, "masked", False)
    n = len(method.modalities) + 1
    correct = torch.zeros(n, dtype=torch.long, device=device)     # counted on the device: no sync per batch
    count = torch.zeros(n, dtype=torch.long, device=device)
    for xs, y, _, mask in with_progress(device_batches(loader, device, False, masked), len(loader), "evaluating"):
        with autocast(device, amp):
            fused, unis = method.predict(xs, mask=mask)
        fused, unis = fused.float(), [u.float() for u in unis]
        mask = mask if masked else torch.ones(len(y), len(unis), dtype=torch.bool, device=y.device)
        for m, u in enumerate(unis):
            correct[m] += ((u.argmax(1) == y) & mask[:, m]).sum()
            count[m] += mask[:, m].sum()
        correct[-1] += (fused.argmax(1) == y).sum()
        count[-1] += len(y)
    correct, count = all_sum(correct).tolist(), all_sum(count).tolist()        # torchrun: every process's share
    return {name: round(100.0 * c / n, 4) if n else None          # None: no sample had this view
            for name, c, n in zip(method.modalities + ["multi"], correct, count)}


class GradNorms:
    """The loop's diagnostic of every method with an encoder per modality: per encoder, the mean over an epoch's
    optimizer steps of the L2 norm of the gradient reaching it, as the step applies it (after a method's
    modulation, clip or noise); a step where an encoder has none (MLA's step of another modality) does not count.
    An optimizer step pre-hook adds the norms on the device (torch._foreach_norm); read() gives {"grad_norm":
    {modality: mean}} once per epoch and starts over. Register it after distribute (start_run does): hooks run in
    their order, so under torchrun the norms are those of the job's averaged gradients. The encoders' parameters are
    the method's encoder_params(): cca, ae, cra and cpm_net have no encoder per modality (one network over every
    view, or none), train_clip's heads on cached features no encoder weights: read() gives {}."""

    def __init__(self, method, optimizer):
        self.params = [[p for p in ps if p.requires_grad] for ps in method.encoder_params()]
        self.means = EpochMeans(method.modalities, ["grad_norm"])
        self.hook = optimizer.register_step_pre_hook(self.add)

    @torch.no_grad()
    def add(self, optimizer, args, kwargs):
        for m, params in enumerate(self.params):
            if grads := [p.grad for p in params if p.grad is not None]:
                self.means.add("grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), m)

    def read(self):
        return self.means.read() if any(self.params) else {}


def train_one_epoch(method, loader, optimizer, epoch, device, amp=False, run=None, check_every=None):
    """One pass over the loader; returns the mean batch loss. Each step: the method's schedule(epoch, step, steps),
    then its train_step with the batch's mask (masked data sets; else None) and sample indices. With amp, forward
    passes run under bf16 autocast (bf16 needs no loss scaling). `run`: the script's run (start_run). A
    non-finite batch loss raises FloatingPointError naming its epoch and step and whether the run's last.pt
    (run.last, what a --resume continues from) is there. Losses are read back every `check_every` steps
    (default: every step on the CPU, every 25 on a GPU, where each read waits for the GPU); with --tensorboard
    the run's board gets them there (Board.step_loss)."""
    checkpoint, board = (None, None) if run is None else (run.last, run.board)
    method.train()
    masked = getattr(loader.dataset, "masked", False)
    steps = len(loader)
    set_epoch(loader, epoch)                            # torchrun's DistributedSampler: this epoch's order
    check_every = check_every or (25 if torch.device(device).type == "cuda" else 1)
    bar = Progress(steps, f"epoch {epoch + 1}")
    total, unread = 0.0, []

    def read_back():
        nonlocal total
        if under_torchrun() and unread:             # the job's loss: the mean over the processes
            losses = all_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for _, v in unread]))
            unread[:] = [(step, v / world()[1]) for (step, _), v in zip(unread, losses)]
        for step, loss in unread:
            if not math.isfinite(loss := float(loss)):
                kept = "" if checkpoint is None else "; no epoch had finished" if not Path(checkpoint).is_file() \
                    else (f"; the last good checkpoint, {checkpoint} (after epoch {epoch}), is kept: fix the cause "
                          "(e.g. a lower --lr) and rerun with --resume")
                raise FloatingPointError(f"non-finite loss ({loss}) at epoch {epoch + 1}, step {step + 1} of "
                                         f"{steps}{kept}")
            total += loss
            if board is not None:
                board.step_loss(epoch, step, steps, loss)
        if unread:
            bar.set_loss(loss)
        unread.clear()

    try:
        for step, (xs, y, idx, mask) in enumerate(device_batches(loader, device, True, masked)):
            method.schedule(epoch, step, steps)
            with autocast(device, amp):
                unread.append((step, method.train_step(xs, y, optimizer, mask=mask, idx=idx)))
            if len(unread) >= check_every:
                read_back()
            bar.update()
        read_back()
    finally:
        bar.close()
    return total / max(steps, 1)


def evaluate_epoch(method, loaders, select_on, device, amp=False):
    """(validation accuracies or None, test accuracies when the epoch is selected on the test set, else None)."""
    val = evaluate(method, loaders["val"], device, amp) if loaders.get("val") else None
    return val, evaluate(method, loaders["test"], device, amp) if select_on == "test" else None


def train_val_test(data, val_ratio, seed, name, what):
    """{"train", "val", "test"}: the items of a loaded data set (load_av_splits, load_it_splits, ...) to
    train, select and test on. val is the data's dev split when it has one (and val_ratio > 0), else a
    seeded stratified share val_ratio of train (None at 0). Prints what --skip_bad skipped and the sizes."""
    if data["skipped"]:
        print(f"skipped {data['skipped']} {what} with missing files (--skip_bad)")
    dev = bool(val_ratio > 0 and data.get("dev"))
    train, val = (data["train"], data["dev"]) if dev else (data["train"], None)
    if val_ratio > 0 and not dev:
        keep, held = stratified_split([x.label for x in train], val_ratio, seed)
        train, val = [train[i] for i in keep], [train[i] for i in held]
    print(f"{name} ({data['layout']}): {len(data['classes'])} classes, train {len(train)}, val {len(val or [])}"
          f"{' (dev split)' if dev else ''}, test {len(data['test'])}")
    return {"train": train, "val": val, "test": data["test"]}


def compile_encoders(method):
    """torch.compile each encoder of `method` in place, so state_dict keys stay those of the eager module.
    dynamic=False: one static graph per input shape (the full batch, a short last batch, eval mode)
    instead of one shape-generic graph for every batch after the first short one."""
    for encoder in method.encoders:
        encoder.compile(dynamic=False)


# ======== 5. Torchrun helpers the scripts call: the process group, the processes, the model, rank 0's values ========

def torchrun_processes():
    """The processes of the torchrun job this process belongs to (RANK and WORLD_SIZE in the environment), else None."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def init_distributed(device):
    """Under torchrun (RANK and WORLD_SIZE in the environment): join the job (NCCL and GPU LOCAL_RANK on CUDA,
    gloo on the CPU); the processes after the first print nothing. Returns the process's device."""
    if torchrun_processes() is None:
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not under_torchrun():                # a long timeout: the others wait while the first builds a cache
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    if world()[0] > 0:
        sys.stdout = open(os.devnull, "w")
    return device


def distribute(method, optimizer, sync_bn=True):
    """Under torchrun: rank 0's weights and buffers in every process, SyncBatchNorm on CUDA (sync_bn; on the CPU,
    where it does not exist, per-process statistics), and before every optimizer step mean_grads. Returns the
    method (its BatchNorms converted)."""
    if not under_torchrun():
        return method
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    if bn and sync_bn and next(method.parameters()).is_cuda:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif bn:
        print("note: BatchNorm statistics are each process's (SyncBatchNorm needs CUDA and --sync_bn); the first "
              "process's are evaluated")
    for t in [*method.parameters(), *method.buffers()]:
        torch.distributed.broadcast(t.data, 0)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: mean_grads(method.parameters()))
    return method


def from_rank0(value):
    """Under torchrun: the first process's value (any picklable object) in every process; else value itself."""
    if under_torchrun():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


# ======== 6. The run: checkpoints, other settings, Run, resume, the record, sweeps and their locks, the shared flags ========

def sha256(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checksummed(obj, path):
    """torch.save obj to path atomically, with its SHA-256 in path.sha256 (written atomically just before the
    rename): the new file's digest, then the one of the file it replaces (what a crash between the two renames
    leaves). load_checkpoint checks it."""
    sums = Path(f"{path}.sha256")
    old = sums.read_text().split()[:1] if sums.is_file() else []
    atomic_write(path, lambda f: torch.save(obj, f), ready=lambda tmp: atomic_write(
        sums, lambda f: f.write("".join(f"{d}\n" for d in [sha256(tmp), *old]).encode())))


def load_checkpoint(path, remedy):
    """torch.load (on the CPU) a checkpoint this code wrote, or a one-line DataError naming it and `remedy` (what
    to do) when it is damaged: its bytes match no digest in path.sha256 (when it has one), or torch cannot read it."""
    path, sums = Path(path), Path(f"{path}.sha256")
    intact = False
    try:
        if sums.is_file():
            if sha256(path) not in sums.read_text().split():
                raise ValueError(f"its SHA-256 is not the one written with it, in {sums.name}")
            intact = True
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:      # a truncated or overwritten file raises many kinds of errors in torch.load
        if intact:              # the bytes written with it, yet unreadable: another torch or code, not damage
            raise
        raise DataError(f"{path}: damaged, it cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                        f"{remedy}") from None


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


def fmt_acc(acc):
    return "  ".join(f"{k} {v:5.1f}" if v is not None else f"{k}   n/a" for k, v in acc.items())


def rng_states(train_loader):
    """Every random state a run draws from: Python, NumPy, torch (CPU and CUDA) and the training
    loader's generator (its shuffle order and its workers' seeds)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "loader": train_loader.generator.get_state() if train_loader.generator is not None else None}


def set_rng_states(state, train_loader):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available() and under_torchrun():   # the first process's GPU's
        torch.cuda.set_rng_state(state["cuda"][0].cpu())                                  # (every process's is alike)
    elif state["cuda"] is not None and torch.cuda.is_available():    # as many GPUs as both runs have
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    if state["loader"] is not None:
        train_loader.generator.set_state(state["loader"].cpu())


def resume_lr(optimizer, scheduler, old_lr, new_lr):
    """Scale the learning rate of a resumed optimizer and StepLR from old_lr to new_lr, keeping the
    schedule's position (a run that diverged continues with a lower --lr)."""
    scale = new_lr / old_lr
    for g in optimizer.param_groups:
        g["lr"] *= scale
        if "initial_lr" in g:
            g["initial_lr"] *= scale
    scheduler.base_lrs = [b * scale for b in scheduler.base_lrs]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# flags that change how a run executes, not what it computes (or which runs a sweep lists)
RUN_ONLY_ARGS = {"resume", "device", "num_workers", "cpu_threads", "amp", "compile", "cache_dir", "out_dir",
                 "seeds", "missing_rates", "tensorboard", "tb_every", "probe"}     # probe: read after training


EARLIER_BEHAVIOUR = {"feature_norm": "none", "hgm_alpha_scale": False, "hgm_forget": 1.0, "qmf_rank": "paper",
                     "crop_scale": 0.08, "no_augment": False, "modalities": None, "processes": None,
                     "agm_epochs": 21, "pmr_ends": None,      # AGM modulated epochs 0..20; PMR's terms every epoch
                     "gb_abs_gain": False, "pmr_val_prototypes": False, "partial_ckpt": False, "revision": 1}

# a method whose computation changed without a flag to restore the old one: the revision its runs record
# (list_runs), so a finished run or a last.pt of the earlier code is not taken for one of today's.
# if_mmin 2: its autoencoder as IF-MMIN's autoencoder_2 (2024); agm 2: the authors' window, held coefficients,
# cap 7 for 3+ modalities and the order of its passes
METHOD_REVISION = {"if_mmin": 2, "agm": 2}

# a method's own flags, by their prefix (the balancing methods'; a new method adds its own): another method's finished
# run or last.pt compares none of them
OWN_FLAGS = {"mmcosine": "mmcosine", "mmpareto": "mmpareto", "agm": "agm", "gb": "gblending", "pmr": "pmr",
             "reconboost": "reconboost"}


# recorded settings that are no flag of the scripts, as a message names them
NOT_FLAGS = {"processes": lambda n: "no torchrun" if n is None else f"torchrun --nproc_per_node {n}",
             "revision": lambda n: f"the method's revision {n}"}


def filled_settings(settings):
    """A run's settings (vars(args), or a record's args) as today's flags name them, with what a record from before
    a flag existed ran with."""
    settings = json.loads(json.dumps(settings, default=str))
    if "no_hgm" in settings:                # written before --hgm/--no_hgm became one setting
        settings.setdefault("hgm", not settings.pop("no_hgm"))
    if "agm_ends" in settings:              # before --agm_epochs: AGM modulated epochs 0..agm_ends
        settings.setdefault("agm_epochs", settings.pop("agm_ends") + 1)
    return {**EARLIER_BEHAVIOUR, **settings}


def other_settings(recorded, settings, free=()):
    """The flags (known to both; execution-only ones, `free` and another method's OWN_FLAGS aside) whose recorded
    value differs from the settings now, as '--k A there, B now', or '' when there are none."""
    recorded, now = filled_settings(recorded), filled_settings(settings)
    others = {k for k in now if OWN_FLAGS.get(k.split("_")[0], now.get("method")) != now.get("method")}
    differ = [k for k in sorted(set(recorded) & set(now) - RUN_ONLY_ARGS - set(free) - others)
              if recorded[k] != now[k]]
    return ", ".join(f"{NOT_FLAGS[k](recorded[k])} there, {NOT_FLAGS[k](now[k])} now" if k in NOT_FLAGS
                     else f"--{k} {recorded[k]} there, {now[k]} now" for k in differ[:4])


@dataclass
class Run:
    """A run writing into `folder`: its settings (vars(args)), the epoch log, the selected epoch so far (counted from
    0, as the log) and its score, the next epoch to train, the clock; last.pt saves it after every epoch. Its
    gradient norms and --tensorboard board are start_run's."""
    folder: Path
    script: str
    settings: dict
    log: list = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -1.0
    next_epoch: int = 0
    elapsed: float = 0.0                        # seconds of the earlier sessions of a resumed run
    start: float = field(default_factory=time.time)
    tick: float = field(default_factory=time.time)
    grad_norms: GradNorms | None = None         # the loop's diagnostic (start_run)
    board: Board | None = None                  # --tensorboard's event files (start_run)

    @property
    def last(self):
        return self.folder / "last.pt"


def resume_run(run, method, optimizer, scheduler, train_loader):
    """--resume: continue `run` from its last.pt (restores the model, optimizer, scheduler, RNG states and the
    log). Only --lr (applied from the next epoch) and --epochs may differ from the checkpoint's settings."""
    path, settings = run.last, run.settings
    if not path.is_file():
        print(f"--resume: no {path}, starting from the first epoch", flush=True)
        return
    # on the CPU: the RNG states must stay CPU tensors (load_state_dict moves the rest to the device)
    state = load_checkpoint(path, "it cannot continue the run: rerun without --resume to start it over")
    if (state["method"], state["seed"]) != (settings["method"], settings["seed"]):
        raise ValueError(f"{path}: a checkpoint of {state['method']} seed {state['seed']}; expected "
                         f"{settings['method']} seed {settings['seed']}")
    shown = other_settings(state["args"], settings, free={"lr", "epochs"})
    if shown:
        raise DataError(f"{path}: a checkpoint of a run with other settings ({shown}); --resume continues "
                        "a run with its own settings (only --lr and --epochs may change): rerun with them, "
                        "or without --resume to start over")
    method.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run.log, run.best_epoch, run.best_score = state["log"], state["best_epoch"], state["best_score"]
    run.next_epoch, run.elapsed = state["epoch"] + 1, state["elapsed"]
    set_rng_states(state["rng"], train_loader)
    print(f"resuming from {path}: {run.next_epoch} of {settings['epochs']} epochs done", flush=True)
    if state["args"].get("lr") not in (None, settings["lr"]):
        resume_lr(optimizer, scheduler, state["args"]["lr"], settings["lr"])
        print(f"--lr {settings['lr']} replaces {state['args']['lr']} from epoch {run.next_epoch + 1} on (each "
              "epoch's lr is in the record's epoch log)", flush=True)


def start_run(folder, script, settings, method, optimizer, scheduler, loaders):
    """The state of a run writing into `folder` (made here): its settings (vars(args)), the epoch log, the
    selection so far, the clock; saved in last.pt after every epoch. With settings["resume"] the run
    continues from folder/last.pt when there is one (resume_run). Call it after distribute: it registers the
    gradient norms' hook (GradNorms) and, with --tensorboard, opens the run's Board."""
    if settings["select_on"] == "val" and not loaders.get("val"):
        raise ValueError("--select_on val needs a validation split (--val_ratio > 0)")
    if settings["select_on"] == "test":
        print("NOTE: selecting the epoch on the TEST set (--select_on test, the official protocol); "
              "the reported test accuracy is optimistic.")
    Path(folder).mkdir(parents=True, exist_ok=True)
    run = Run(Path(folder), script, settings)
    if settings.get("resume"):
        resume_run(run, method, optimizer, scheduler, loaders["train"])
    elif run.last.is_file():
        print(f"note: {run.last} holds an unfinished run; it is started over (rerun with --resume to continue "
              "it instead)", flush=True)
    run.grad_norms = GradNorms(method, optimizer)    # after distribute's hook: under torchrun the job's gradients
    if settings.get("tensorboard") and world()[0] == 0:     # torchrun: the first process writes
        run.board = Board(run.folder / "tb", run.next_epoch, len(loaders["train"]), settings["tb_every"])
    return run


def log_epoch(run, epoch, loss, optimizer, val, test, method):
    """Log the epoch (loss, lr, accuracies, what the method's epoch_log adds, e.g. MLA's hgm_p_trace = trace(P) /
    dim, None without HGM, and the encoders' gradient norms) and print it; True when it is the selected epoch so
    far (call it before the scheduler steps)."""
    select_on = run.settings["select_on"]
    entry = {"epoch": epoch, "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"), "train_loss": round(loss, 6)}
    entry["val"] = val
    entry.update(method.epoch_log())
    entry.update(run.grad_norms.read() if run.grad_norms is not None else {})
    trace = f"  P trace {entry['hgm_p_trace']:.3f}" if entry.get("hgm_p_trace") is not None else ""
    if select_on == "test":
        entry["test"] = test
    run.log.append(entry)
    shown = test if select_on == "test" else val
    print(f"epoch {epoch + 1:3d}/{run.settings['epochs']}  loss {loss:.4f}  {'test' if select_on == 'test' else 'val'}: "
          f"{fmt_acc(shown) if shown else '-'}{trace}  ({time.time() - run.tick:.1f}s)", flush=True)
    score = {"val": (val or {}).get("multi"), "test": (test or {}).get("multi"), "last": epoch}[select_on]
    score = -1 if score is None else score
    if score > run.best_score:
        run.best_score, run.best_epoch = score, epoch
        return True
    return False


def summary_writer():
    """torch's SummaryWriter: tensorboard is an optional dependency, imported only for --tensorboard; without it,
    a one-line DataError says how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def numbers(entry, prefix=""):
    """(tag, value) of every number of an epoch entry, nested keys joined by '/' (val/audio, grad_norm/video,
    gb_weights/2); None (no value) and the epoch itself (the step) left out."""
    for k, v in entry.items():
        if isinstance(v, (dict, list)):
            yield from numbers(v if isinstance(v, dict) else dict(enumerate(v)), f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and f"{prefix}{k}" != "epoch":
            yield f"{prefix}{k}", v


class Board:
    """--tensorboard: a run's event files under <run folder>/tb/ (torchrun: the first process's). epochs/: every
    number of each epoch entry (numbers(): lr, train_loss, val/<modality>, test/<modality> when selected on test,
    each diagnostic per modality) at step = the epoch as the console counts it; steps/: every `every`-th step's
    loss at step epoch x steps + step (from 0). A run resumed at epoch k purges what a killed run wrote from k on
    (purge_step), so each series goes on with no step twice."""

    def __init__(self, folder, first_epoch, steps, every):
        writer = summary_writer()
        self.epochs = writer(Path(folder) / "epochs", purge_step=first_epoch + 1)
        self.steps = writer(Path(folder) / "steps", purge_step=first_epoch * steps)
        self.every = every

    def step_loss(self, epoch, step, steps, loss):
        if (epoch * steps + step) % self.every == 0:
            self.steps.add_scalar("step_loss", loss, epoch * steps + step)

    def epoch(self, entry):
        for tag, value in numbers(entry):
            self.epochs.add_scalar(tag, value, entry["epoch"] + 1)
        self.epochs.flush()
        self.steps.flush()                      # on disk with the epoch: a killed run keeps what it wrote

    def close(self):
        self.epochs.close()
        self.steps.close()


def board_epoch(run):
    """--tensorboard: the run's last epoch entry into its event files; nothing without the flag."""
    if run.board is not None:
        run.board.epoch(run.log[-1])


def save_best(run, method, epoch):
    """best.pt: the selected epoch's weights (with the run's settings and modalities); torchrun: the first process."""
    if world()[0] > 0:
        return
    atomic_torch_save({"method": run.settings["method"], "epoch": epoch, "args": run.settings,
                       "modalities": method.modalities, "state_dict": method.state_dict()}, run.folder / "best.pt")


def save_checkpoint(run, method, optimizer, scheduler, train_loader):
    """last.pt, written atomically after every epoch: all a --resume needs to continue exactly as an
    uninterrupted run (model incl. MLA's P and QMF's histories, optimizer, scheduler, every RNG state and
    the training loader's generator, the epoch log and the selection so far)."""
    settings = run.settings
    if world()[0] > 0:                          # torchrun: the first process writes
        run.tick = time.time()
        return
    save_checksummed({"method": settings["method"], "seed": settings["seed"], "epoch": run.log[-1]["epoch"],
                      "args": settings, "state_dict": method.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "rng": rng_states(train_loader), "log": run.log,
                      "best_epoch": run.best_epoch, "best_score": run.best_score,
                      "elapsed": run.elapsed + time.time() - run.start}, run.last)
    run.tick = time.time()


def load_best(run, method):
    """Load the run's best.pt (the selected epoch) into the method (load_selected)."""
    load_selected(run.folder, method)


def load_selected(folder, method):
    """Load a run's selected epoch, folder/best.pt, into the method (under torchrun once the first process wrote it)."""
    if under_torchrun():
        torch.distributed.barrier()
    state = load_checkpoint(Path(folder) / "best.pt", "the selected epoch's weights are lost: rerun without "
                            "--resume to train the run again")
    method.load_state_dict(state["state_dict"])                # copied onto the method's device


# ---- the linear probe (--probe, python common.py probe): every method's unimodal features on one footing
PROBE_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)         # the L2 penalties tried, one chosen on the validation split
PROBE_DECAY = 1e-3                               # the penalty without a validation split


@torch.no_grad()
def probe_features(method, loader, device, amp=False):
    """Every modality's unimodal features (method.unimodal_features, in eval mode, as float32) over the loader's whole
    split in its order, with their labels: [(features (n_m, d_m), labels (n_m,))], n_m the samples where view m is
    present. Under torchrun every process's shard of the split, gathered into its order (the same in every process)."""
    method.eval()
    masked = getattr(loader.dataset, "masked", False)
    feats, masks, ys = [], [], []
    for xs, y, _, mask in device_batches(loader, device, False, masked):
        with autocast(device, amp):
            zs = method.unimodal_features(xs, mask)
        mask = full_mask(xs) if mask is None else mask
        rows = [torch.zeros(len(y), z.shape[1], device=z.device) for z in zs]        # a missing view's rows: 0
        for m, (r, z) in enumerate(zip(rows, zs)):
            r[mask[:, m]] = z.float()
        feats.append(rows), masks.append(mask), ys.append(y)
    feats, mask, y = [torch.cat(f) for f in zip(*feats)], torch.cat(masks), torch.cat(ys)
    if under_torchrun():
        n = len(loader.dataset)
        feats, mask, y = [split_rows(f, n) for f in feats], split_rows(mask, n), split_rows(y, n)
    return [(f[mask[:, m]], y[mask[:, m]]) for m, f in enumerate(feats)]


def fit_probe(train, val, test, num_classes, decays=PROBE_DECAYS):
    """A linear probe's test accuracy in percent (None when train or test has no sample): multinomial logistic
    regression on the features standardised with train's mean and std, fitted on train ((features, labels)) by
    full-batch L-BFGS from zero weights (no random draw: the same features give the same classifier), with each L2
    penalty of `decays` and kept the most accurate on val (ties: the larger penalty), or PROBE_DECAY without val."""
    (z, y), (zt, yt) = train, test
    if not len(y) or not len(yt):
        return None
    mean, std = z.mean(0), z.std(0, correction=0).clamp_min(1e-6)
    norm = lambda f: (f - mean) / std
    acc = lambda lin, f, t: 100.0 * (lin(norm(f)).argmax(1) == t).sum().item() / len(t)
    best, best_acc = None, -1.0
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):      # the fit turns gradients on for itself
        for decay in sorted(decays, reverse=True) if val is not None and len(val[1]) else [PROBE_DECAY]:
            linear = nn.utils.skip_init(nn.Linear, z.shape[1], num_classes, device=z.device)     # no random init
            nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)
            fit_softmax_classifier(linear, norm(z), y, decay, reset=False)
            score = acc(linear, *val) if val is not None and len(val[1]) else 0.0
            if score > best_acc:
                best, best_acc = linear, score
        return round(acc(best, zt, yt), 4)


def linear_probe(method, loaders, device, amp=False):
    """The linear probe of the method's encoders as loaded (frozen; the selected epoch's, load_selected): the
    unimodal features of the train, val and test loaders (read as evaluation reads them: in order, no augmentation),
    a linear classifier per modality fitted on train (fit_probe), its test accuracy: {modality: percent}; printed."""
    feats = {s: probe_features(method, loaders[s], device, amp) for s in ("train", "val", "test") if loaders.get(s)}
    out = {name: fit_probe(feats["train"][m], feats["val"][m] if "val" in feats else None, feats["test"][m],
                           method.num_classes, PROBE_DECAYS) for m, name in enumerate(method.modalities)}
    print(f"linear probe (test): {fmt_acc(out)}", flush=True)
    return out


# first_epoch: 1, epochs counted from 1 as on the console (the run's log and last.pt count from 0); a record
# without it is older and counts from 0 (record_epoch reads both). probe: the linear probe's test accuracies
# ({modality: percent}; None when not probed, absent from older records)
RECORD_KEYS = ("script", "dataset", "method", "seed", "args", "modalities", "epochs", "select_on",
               "best_epoch", "test", "wall_time_s", "version", "first_epoch", "probe")


def record_epoch(record, epoch):
    """Epoch `epoch` of a record as the console numbers it, from 1, whether the record counts from 1 or 0."""
    return epoch + 1 - record.get("first_epoch", 0)


def write_record(run, method, test):
    """record.json: the settings, the epoch log, the selected epoch and its test accuracies `test` (probe: None, the
    linear probe's accuracies once write_probe adds them); the run is then finished (last.pt is removed). Returns
    the record."""
    s, path = run.settings, run.folder / "record.json"
    record = {"script": run.script, "dataset": s["dataset"], "method": s["method"], "seed": s["seed"],
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in s.items()},
              "modalities": method.modalities, "epochs": [e | {"epoch": e["epoch"] + 1} for e in run.log],
              "select_on": s["select_on"], "best_epoch": run.best_epoch + 1, "test": test,
              "wall_time_s": round(run.elapsed + time.time() - run.start, 2), "version": code_version(),
              "first_epoch": 1, "probe": None}
    assert tuple(record) == RECORD_KEYS
    if run.board is not None:
        run.board.close()
    if world()[0] == 0:                         # torchrun: the first process writes
        atomic_json_dump(record, path)
        run.last.unlink(missing_ok=True)
        Path(f"{run.last}.sha256").unlink(missing_ok=True)
    chosen = "selected on TEST" if s["select_on"] == "test" else f"epoch {record['best_epoch']} by {s['select_on']}"
    print(f"test ({chosen}): {fmt_acc(test)}\nrecord: {path}", flush=True)
    return record


def write_probe(folder, probe):
    """The linear probe's accuracies `probe` into the record.json of the finished run in `folder` (rewritten
    atomically; torchrun: by the first process). Returns them."""
    if world()[0] == 0:
        path = Path(folder) / "record.json"
        atomic_json_dump({**json.loads(path.read_text()), "probe": probe}, path)
    return probe


def run_dir(out_dir, dataset, script, method, seed, *extra):
    """<out_dir>/<dataset>/<method>/seed<k>[/extra...]: where a run writes record.json and best.pt.
    A toy set's folder is named after its script (toy_av, toy_it, toy_missing, ...), so the toy runs
    of different scripts never share a folder."""
    if dataset == "toy":
        dataset = "toy_" + Path(script).stem.removeprefix("train_")
    return Path(out_dir, dataset, method, f"seed{seed}", *extra)


def parse_methods(spec, known):
    """'mla', 'concat,mla' or 'all' -> a list of method names (ValueError naming an unknown one)."""
    names = list(known) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise ValueError(f"unknown method {bad[0] if bad else spec!r}; expected one of {', '.join(known)}, "
                         "a comma list of them, or 'all'")
    return names


def list_runs(args, known_methods, grid=None):
    """The runs a command asks for, as (label, args copy): one per (seed, method) of args.method (name, comma
    list or 'all') x args.seeds (comma list; default args.seed), seed by seed; `grid` ({arg name:
    [values]}, e.g. {"missing_rate": [0.1, 0.3]}) adds outer loops. label: '[k/n] mla seed 0 ...' in
    a sweep (n > 1), None for a single run. Its warnings are shown once (warn_once)."""
    WARNED.clear()
    methods = parse_methods(args.method, known_methods)
    seeds = [int(s) for s in str(args.seeds).split(",")] if args.seeds else [args.seed]
    grid = grid or {}
    runs = []
    for vals in itertools.product(*grid.values()):
        for seed, method in itertools.product(seeds, methods):
            a = copy.copy(args)
            a.method, a.seed, a.revision = method, seed, METHOD_REVISION.get(method, 1)
            for name, v in zip(grid, vals):
                setattr(a, name, v)
            runs.append((f"{method} seed {seed}" + "".join(f" {n} {v}" for n, v in zip(grid, vals)), a))
    return [(f"[{k}/{len(runs)}] {label}" if len(runs) > 1 else None, a) for k, (label, a) in enumerate(runs, 1)]


def finished_record(folder, args, label):
    """In a sweep (label not None): the record of the run in `folder` when it finished before with these
    settings (the sweep skips it); else None. A run never goes into the folder of a finished run of other
    settings."""
    path = Path(folder) / "record.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    shown = other_settings(old.get("args", {}), vars(args))
    if shown:
        raise DataError(f"{path}: a finished run with other settings ({shown}); expected the same settings "
                        "in one run folder: pass another --out_dir, or delete that run to redo it")
    if label is None:
        return None
    print(f"{label}: skipped, {path} exists", flush=True)
    return old


def announce(record, label):
    """Print a sweep's line for a finished run (nothing for a single run, label None); returns the record."""
    if label is not None:
        print(f"{label}: test {fmt_acc(record['test'])} (epoch {record_epoch(record, record['best_epoch'])} by "
              f"{record['select_on']}, {record['wall_time_s']:.0f}s)", flush=True)
    return record


LOCK_POLL_S = 10          # how often a sweep looks again at the runs other processes hold


def pid_is_gone(holder, host):
    """True when a lock's '<host> pid <pid>' names a process of this host that no longer runs."""
    name, _, pid = holder.rpartition(" pid ")
    if name != host or not pid.isdigit() or os.name == "nt":
        return False                            # another machine's process (or Windows, where os.kill ends it)
    try:
        os.kill(int(pid), 0)                    # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:                             # alive, another user's (or no such check here)
        return False
    return False


def take_lock(folder):
    """(the open lock file, None) when this process now holds <folder>/run.lock, else (None, its holder): the
    '<host> pid <pid>' of another live process. fcntl.flock where the file system has it (the kernel drops a killed
    process's lock); elsewhere (Windows, some NFS) the file's line, stale when it names a dead pid of this host.
    A line left by a run that was killed is taken over with a note; release_lock empties the file."""
    import socket
    path = Path(folder) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock = "ours"
    except BlockingIOError:
        flock = "theirs"                        # a live process holds it
    except (ImportError, OSError):
        flock = None                            # no flock here: go by the line
    f.seek(0)
    holder = f.read().strip()
    if flock == "theirs" or (flock is None and holder and not pid_is_gone(holder, socket.gethostname())):
        f.close()
        return None, holder or "another process"
    if holder:
        print(f"note: {path} names {holder}, which is no longer running; this run takes the folder over", flush=True)
    try:
        f.truncate(0)
        f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        f.flush()
    except OSError as e:                        # a full disk: the lock is let go with the file
        f.close()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"could not write {path}: its disk is full; free space or pass another --out_dir") from e
        raise
    return f, None


def release_lock(f):
    """Let go of take_lock's file: emptied (a killed run leaves its line, for take_lock's note), then closed,
    which drops the flock."""
    if f is not None:
        f.truncate(0)
        f.close()


def train_runs(runs, folder_of, train):
    """The records of `runs` (list_runs' (label, args)) in their order, each run once: train(args) while this
    process holds the lock of its folder folder_of(args) (take_lock), or the record a sweep finds there
    (finished_record). A single run whose folder another live process holds stops with an error; a sweep goes
    on with its other runs and comes back to it, waiting at the end for those still held, so that two sweeps
    started together share the runs. Torchrun: the first process takes the locks, the others follow it."""
    records, waiting, told = {}, list(enumerate(runs)), set()
    while waiting:
        later = []
        for k, (label, args) in waiting:
            folder = folder_of(args)
            lock, holder = take_lock(folder) if world()[0] == 0 else (None, None)
            holder = from_rank0(holder)
            if holder is not None and label is None:
                raise DataError(f"{folder}: another run writes into this folder ({holder} holds its run.lock); "
                                "wait until it ends, or pass another --out_dir")
            if holder is not None:
                if k not in told:
                    print(f"{label}: {folder} is held by {holder}; this sweep comes back to it", flush=True)
                told.add(k)
                later.append((k, (label, args)))
                continue
            try:
                records[k] = finished_record(folder, args, label) or announce(train(args), label)
            finally:
                release_lock(lock)
        if len(later) == len(waiting):                  # every run left is held by another process
            time.sleep(LOCK_POLL_S)
        waiting = later
    return [records[k] for k in sorted(records)]


def _default_help(defaults, key, text=""):
    paper, toy = defaults["paper"].get(key), defaults["toy"].get(key)
    return (text + "; " if text else "") + f"paper {paper}; toy {toy}"


def add_method_args(p, methods):
    """The registered flags of `methods` (REGISTRY), a group per method; a flag several of them share is declared
    once, in the first one's group, and one the script declared itself (e.g. --layers, --condition) is left to it.
    A flag's default and type are its constructor keyword's default's unless its argparse keywords say otherwise;
    a bool keyword is a switch: --name when its default is False, --name and --no_name when it is True."""
    users = collections.defaultdict(list)
    for name in methods:
        for f in REGISTRY[name].flags.values():
            users[f[0]].append(name)
    for name in methods:
        r, g = REGISTRY[name], None
        for kw, (flag, text, *more) in r.flags.items():
            if f"--{flag}" in p._option_string_actions or users[flag][0] != name:
                continue
            g = g or p.add_argument_group(f"{name} ({r.paper})")
            extra = dict(more[0]) if more else {}
            extra.setdefault("default", keyword_default(r.cls, kw))
            off = extra.pop("off", f"--{flag} off")          # a True switch's --no_ flag's help
            text = f"{'/'.join(users[flag])}: {text}"
            if isinstance(extra["default"], bool):
                g.add_argument(f"--{flag}", action="store_true", help=text + (" (default)" if extra["default"] else ""),
                               **extra)
                if extra["default"]:
                    g.add_argument(f"--no_{flag}", dest=flag, action="store_false",
                                   help=f"{'/'.join(users[flag])}: {off}")
                continue
            if extra["default"] is not None and "type" not in extra:
                extra["type"] = type(extra["default"])
            g.add_argument(f"--{flag}", help=text, **extra)


def add_common_args(p, methods, defaults, modalities=None, condition=None):
    """The flags every train_*.py shares, declared once: the run (--method, --seed, --seeds), SGD and StepLR
    (defaults None: the script's DEFAULTS['paper'] or ['toy'], filled by finish_args), the conditioning modality
    of FiLM/BiGated (when `condition` names its default), the flags of `methods` (add_method_args) and the
    protocol (--select_on, --val_ratio, --out_dir, --device)."""
    g = p.add_argument_group("run")
    g.add_argument("--method", default="mla", help=f"one of {', '.join(methods)}; a comma list; or 'all' (a sweep)")
    g.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy, torch and the data order")
    g.add_argument("--seeds", default=None, help="comma list of seeds to sweep, e.g. 0,1,2 (overrides --seed)")
    g = p.add_argument_group("optimisation (SGD, StepLR)")
    g.add_argument("--epochs", type=int, default=None, help=_default_help(defaults, "epochs"))
    g.add_argument("--batch_size", type=int, default=None, help=_default_help(defaults, "batch_size"))
    g.add_argument("--lr", type=float, default=None, help=_default_help(defaults, "lr", "learning rate"))
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_decay_step", type=int, default=None, help=_default_help(defaults, "lr_decay_step", "epochs"))
    g.add_argument("--lr_decay_ratio", type=float, default=None, help=_default_help(defaults, "lr_decay_ratio"))
    if condition:
        p.add_argument_group("FiLM / BiGated").add_argument(
            "--condition", default=condition, choices=modalities, help="FiLM/BiGated conditioning modality")
    add_method_args(p, methods)
    g = p.add_argument_group("protocol and output")
    g.add_argument("--select_on", default="val", choices=["val", "test", "last"],
                   help="epoch selection: validation split (default), test set (the official protocol) or last epoch")
    g.add_argument("--val_ratio", type=float, default=0.1,
                   help="seeded stratified share of train used for validation when the data has no dev split; "
                        "0: no validation split (then --select_on test or last)")
    g.add_argument("--out_dir", default="runs")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <run folder>/last.pt (saved after every epoch)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files into <run "
                   "folder>/tb/ (each epoch's numbers, every --tb_every-th step's loss; pip install tensorboard)")
    g.add_argument("--tb_every", type=int, default=50, help="--tensorboard: the training loss of every N-th step")
    g.add_argument("--probe", action="store_true",
                   help="after the test: the linear probe of the selected epoch's encoders (a linear classifier per "
                        "modality on their frozen features of train, chosen on val; its test accuracy in the "
                        "record's probe); a finished run: python common.py probe RUN_DIR")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--sync_bn", dest="sync_bn", action="store_true", default=True,
                   help="under torchrun on CUDA: BatchNorm statistics over the whole batch (SyncBatchNorm; default); "
                        "on the CPU, where SyncBatchNorm does not run, each process keeps its own")
    g.add_argument("--no_sync_bn", dest="sync_bn", action="store_false", help="under torchrun: each process's statistics")


def add_it_encoder_args(p, defaults):
    """The image and text encoder flags (M3AE-shaped or transformers models) and their input sizes, shared
    by train_it.py and train_ait.py; the unset sizes come from the script's DEFAULTS (finish_args)."""
    a = p.add_argument_group("image and text encoders").add_argument
    a("--encoder", default="m3ae", choices=["m3ae", "hf"],
      help="m3ae: M3AE-shaped transformer per modality; hf: transformers models (--image_model, --text_model)")
    a("--m3ae_ckpt", default=None, help="converted M3AE PyTorch state dict for both encoders (default: random "
                                        "init, with a warning)")
    a("--partial_ckpt", action="store_true", help="load a --m3ae_ckpt (or --cavmae_ckpt) that lacks some of the "
      "encoder's tensors, leaving those at their random init (default: an error naming them)")
    a("--m3ae_dim", type=int, default=None, help=_default_help(defaults, "m3ae_dim", "M3AE width"))
    a("--m3ae_depth", type=int, default=None, help=_default_help(defaults, "m3ae_depth", "M3AE transformer blocks"))
    a("--m3ae_heads", type=int, default=None, help=_default_help(defaults, "m3ae_heads", "M3AE attention heads"))
    a("--m3ae_mlp_ratio", type=int, default=4, help="M3AE MLP hidden width / width")
    a("--patch_size", type=int, default=None,
      help=_default_help(defaults, "patch_size", "M3AE image patch side in pixels"))
    a("--vocab_size", type=int, default=None, help=_default_help(
        defaults, "vocab_size", "M3AE word embeddings (30522: BERT uncased; None: the tokenizer's)"))
    a("--image_model", default=None, help="--encoder hf: transformers image model, local folder or hub name")
    a("--text_model", default=None, help="--encoder hf: transformers text model, local folder or hub name")
    a("--proj_dim", type=int, default=None, help="--encoder hf: common width (default: the wider model's); "
                                                 "a narrower model gets a linear projection")
    a("--hf_pool", default="mean", choices=["mean", "pooler"],
      help="--encoder hf: mean of the last hidden states (padding left out) or the model's pooler output")
    a = p.add_argument_group("image and text inputs").add_argument
    a("--tokenizer", default=None, help="BERT uncased tokenizer for raw text: local folder (a vocab.txt is "
                                        "enough) or hub name; default bert-base-uncased (m3ae), the text "
                                        "model's (hf), the generated one (toy)")
    a("--max_len", type=int, default=None, help=_default_help(defaults, "max_len", "text tokens (cut or padded)"))
    a("--image_size", type=int, default=None, help=_default_help(defaults, "image_size", "image side after the transforms"))


def add_toy_args(p, what, train, test, dev=None, dev_flag="dev", seed_help="the generated data (fixed across --seed)",
                 title="toy data set"):
    """The toy set's flags every script has: --toy_train, --toy_<dev_flag> (when `dev` is given), --toy_test
    and --toy_seed; returns their group's add_argument for the script's own toy flags."""
    a = p.add_argument_group(title).add_argument
    a("--toy_train", type=int, default=train,
      help=f"toy: training {what}" + ("" if dev is not None else " (the validation split is taken from them)"))
    if dev is not None:
        a(f"--toy_{dev_flag}", type=int, default=dev, help=f"toy: validation ({dev_flag}) {what}")
    a("--toy_test", type=int, default=test, help=f"toy: test {what}")
    a("--toy_seed", type=int, default=0, help=f"toy: seed of {seed_help}")
    return a


def it_encoder_options(args):
    """The keywords of m3ae_encoders or hf_encoders (--encoder) from the image and text encoder flags
    (add_it_encoder_args)."""
    if args.encoder == "m3ae":
        return dict(m3ae=(args.m3ae_dim, args.m3ae_depth, args.m3ae_heads, args.m3ae_mlp_ratio, args.patch_size),
                    ckpt=args.m3ae_ckpt, partial=args.partial_ckpt)
    return dict(models={"image": args.image_model, "text": args.text_model}, pool=args.hf_pool, proj_dim=args.proj_dim)


def finish_args(p, args, methods, defaults):
    """Check the shared flags and fill the unset ones from DEFAULTS['toy' or 'paper']."""
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.lr is not None and not args.lr >= 0:
        p.error("--lr must not be negative")
    if not 0 < args.hgm_forget <= 1:
        p.error("--hgm_forget must be in (0, 1]")
    if not 0 <= args.val_ratio < 1:
        p.error("--val_ratio must be in [0, 1)")
    if args.tb_every < 1:
        p.error("--tb_every must be at least 1")
    if args.tensorboard:
        summary_writer()                        # without tensorboard: its one-line error before any training
    if hasattr(args, "gb_super_epoch"):               # the balancing methods' flags (train_av, train_it, train_ait)
        if min(args.gb_super_epoch, args.reconboost_stage_epochs or 1, 1 + (args.reconboost_correct_epochs or 0)) < 1:
            p.error("--gb_super_epoch and --reconboost_stage_epochs must be at least 1, --reconboost_correct_epochs 0")
        if args.val_ratio == 0 and ("gblending" in args.method.split(",") or args.method == "all"):
            p.error("gblending measures overfitting on a validation split, which --val_ratio 0 leaves out: leave it "
                    "out of --method (all includes it)")
        pmr = "pmr" in args.method.split(",") or args.method == "all"
        if args.val_ratio == 0 and args.pmr_val_prototypes and pmr:
            p.error("--pmr_val_prototypes takes the prototypes from a validation split, which --val_ratio 0 leaves out")
    if args.val_ratio == 0 and args.select_on == "val":
        p.error("--val_ratio 0 leaves no validation split to select the epoch on: add --select_on test or last")
    try:
        parse_methods(args.method, methods)
        [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError as e:
        p.error(f"--seeds {args.seeds}: expected a comma list of whole numbers, e.g. 0,1,2" if "int()" in str(e)
                else str(e))
    args.processes = torchrun_processes()       # recorded: a torchrun run draws another order
    for k, v in defaults["toy" if args.dataset == "toy" else "paper"].items():
        if getattr(args, k, None) is None:       # the paper's 8 loader workers, but never more than the cores
            setattr(args, k, min(v, os.cpu_count() or 1) if k == "num_workers" else v)
    if hasattr(args, "amp"):                    # scripts with --amp: on by default on CUDA, never on the CPU
        cuda = str(args.device).startswith("cuda")
        if args.amp is None:                    # bf16 in hardware (Ampere and later); emulated, it is slower
            gpu = contextlib.nullcontext()       # torchrun: asked of this process's GPU, LOCAL_RANK (joined later)
            if cuda and torch.cuda.is_available() and torchrun_processes():
                gpu = torch.cuda.device(int(os.environ.get("LOCAL_RANK", 0)))
            with gpu:
                args.amp = cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        if args.amp and not cuda:
            p.error("--amp needs a CUDA device (CPU runs stay in float32)")
    return args


def script_main(main, again="rerun the same command with --resume to continue from the last finished epoch"):
    """Run a script's main() and turn the failures a user can act on into one clear line and a non-zero exit:
    bad data, a non-finite loss, a full disk, a folder it may not write, Ctrl-C (exit 130, then `again` says
    how to go on); under torchrun any failure, as one line naming the process's rank."""
    rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""

    def stop(text, code=1):                    # torchrun: at once, not through a teardown the others never join
        if rank:
            if text:
                print(text, file=sys.stderr, flush=True)
            os._exit(code)
        sys.exit(text if text else code)
    try:
        main()
        if under_torchrun():
            torch.distributed.destroy_process_group()
    except DataError as e:
        text = str(e)
        if "Original Traceback" in text:        # re-raised from a DataLoader worker: drop the traceback
            text = text.rsplit("DataError: ", 1)[-1].strip()
        stop(f"error: {rank}{text}")
    except FloatingPointError as e:
        stop(f"error: {rank}{e}")
    except DiskFull as e:
        stop(f"error: {rank}{e.strerror}")
    except PermissionError as e:               # a folder this user cannot write: --out_dir, --cache_dir, ...
        stop(f"error: {rank}{e.filename}: {e.strerror}: pass a folder you can write to (--out_dir, --cache_dir) "
             "or change its permissions")
    except KeyboardInterrupt:                  # exit status 130, as a shell reports Ctrl-C
        print(f"interrupted: {again}", file=sys.stderr)
        stop("", 130)
    except Exception as e:                     # torchrun: one line naming the process (torchrun ends the others)
        if not rank:
            raise
        stop(f"error: {rank}{type(e).__name__}: {e}")


# ======== 7. Report, plot, command line: python common.py report RUNS_DIR | plot RUNS_DIR | probe RUN_DIR | prepare | convert_m3ae ========

# The paper's Tables 5, 6 and 7 (mean±std of test accuracy over three seeds; std missing where the
# source is garbled). A line per table and data set: then per method, after " | ", its name and
# column=mean±std (Table 6: missing rate %).
PAPER_RESULTS = """
5 cremad | concat audio=55.65±0.82 video=18.68±0.76 multi=61.56±0.91 | late_fusion audio=52.17±1.12 video=55.48±0.71 multi=66.32±1.08 | film audio=53.89±0.75 video=18.67±1.21 multi=60.07±1.25 | bigated audio=51.49±1.28 video=17.34±1.11 multi=59.21±1.14 | ogm_ge audio=53.76±0.98 video=28.09±1.17 multi=68.14±0.79 | qmf audio=59.41±0.71 video=39.11±1.03 multi=63.71±1.12 | mla audio=59.27±1.23 video=64.91±1.1 multi=79.7±0.87
5 ks | sum audio=48.77±0.95 video=24.53±1.12 multi=64.72±0.97 | concat audio=49.18±0.76 video=24.67±1.07 multi=64.84±1.05 | late_fusion audio=47.87±1.1 video=46.76±0.85 multi=65.53±0.89 | film audio=48.67±0.83 video=23.15±0.98 multi=63.33±0.76 | bigated audio=49.96±1.21 video=23.77±1.14 multi=63.72±1.13 | ogm_ge audio=48.87±1.05 video=29.73±1.06 multi=65.74±1.08 | qmf audio=51.57±1.03 video=32.19±0.92 multi=65.78±0.97 | mla audio=54.67±0.92 video=51.03±1.09 multi=71.35±1.22
5 food101 | sum image=4.57±0.88 text=85.63±1.14 multi=86.19±0.86 | concat image=3.51±1.22 text=86.02±1.05 multi=86.32±1.18 | late_fusion image=58.46±1.03 text=85.19±1.21 multi=90.21±1.02 | film image=4.68±0.97 text=85.84±0.92 multi=87.21±1.05 | bigated image=14.2±1.18 text=85.79±1.1 multi=88.87±0.88 | ogm_ge image=22.35±1.27 text=85.17±1.09 multi=87.54±1.03 | qmf image=45.74±1.09 text=84.13±1.27 multi=92.87±1.01 | mla image=69.6±0.89 text=86.47±0.86 multi=93.33±0.92
5 mvsa | sum text=73.33±1.03 image=28.46±1.12 multi=76.19±1.01 | concat text=75.22±0.92 image=27.32±1.09 multi=76.25±0.95 | late_fusion text=72.15±1.07 image=45.24±0.97 multi=76.88±0.82 | film text=74.85±0.98 image=27.12±1.18 multi=75.34±1.07 | bigated text=73.13±1.08 image=28.15±0.88 multi=75.94±0.88 | ogm_ge text=74.76±0.87 image=31.98±1.03 multi=76.37±0.98 | qmf text=74.87±1.15 image=32.99±1.09 multi=77.96±1.06 | mla text=75.72±0.79 image=54.99±1.12 multi=79.94±0.97
5 iemocap | sum audio=39.79±1.08 image=29.44±0.97 text=65.16±0.88 multi=74.18±1.03 | concat audio=41.93±0.89 image=30.0±0.88 text=67.84±0.97 multi=75.91±0.92 | late_fusion audio=43.12 image=32.38±0.97 text=68.79±1.07 multi=74.96±0.97 | film audio=41.64±1.06 image=29.85±1.06 text=66.37±0.95 multi=74.32±1.12 | bigated audio=42.23±0.88 image=27.45±1.08 text=65.16±1.08 multi=73.34±1.05 | ogm_ge audio=41.38±1.13 image=30.24±1.02 text=70.79±1.03 multi=76.17±1.01 | qmf audio=42.98±0.95 image=31.22±1.07 text=75.03±0.79 multi=76.17±0.95 | mla audio=46.29±1.02 image=37.63±0.78 text=73.22±1.09 multi=78.92±1.07
6 iemocap | late_fusion 10=72.95±1.12 20=69.06±0.88 30=64.89±1.25 40=61.09±0.99 50=56.48±1.18 60=52.41±1.01 70=45.07±1.21 | qmf 10=73.49±1.1 20=71.33±1.27 30=65.89±0.78 40=62.27±0.95 50=57.94±1.07 60=55.6±0.84 70=50.25±1.09 | cca 10=65.19±0.95 20=62.6±1.19 30=59.35±0.88 40=55.25±1.23 50=51.38±1.05 60=45.73±1.27 70=30.61±1.1 | dcca 10=57.25±1.28 20=51.74±1.01 30=42.53±1.29 40=36.54±1.18 50=34.82±0.79 60=33.65±1.07 70=41.09±1.24 | dccae 10=61.66±1.13 20=57.67±1.22 30=54.95±1.06 40=51.08±1.01 50=45.71±0.87 60=39.07±0.98 70=41.42±1.28 | ae 10=71.36±0.94 20=67.4±0.79 30=62.02±1.18 40=57.24±0.94 50=50.56±0.77 60=43.04±0.96 70=39.86±0.82 | cra 10=71.28±1.19 20=67.34±1.04 30=62.24±1.03 40=57.04±0.92 50=49.86±1.15 60=43.22±0.99 70=38.56±1.22 | mmin 10=71.84±0.97 20=69.36±1.05 30=66.34±1.11 40=63.3±1.1 50=60.54±1.17 60=57.52±1.13 70=55.44±1.06 | if_mmin 10=71.32±0.78 20=68.29±0.98 30=64.17±1.01 40=60.13±1.19 50=57.45±1.12 60=53.26±1.22 70=52.04±0.91 | cpm_net 10=55.29±0.83 20=53.65±0.96 30=52.52±1.29 40=51.01±0.94 50=49.09±1.04 60=47.38±1.25 70=44.76±0.88 | tate 10=67.84±1.02 20=63.22±1.08 30=62.19±0.98 40=60.36±1.06 50=58.74±1.21 60=57.99±1.03 70=54.35±1.07 | mla 10=75.07±1.04 20=72.33±1.16 30=68.47±1.22 40=67.0±0.98 50=63.48±0.87 60=59.17±0.92 70=55.89±1.03
7 food101 | clip image=63.07±0.12 text=83.98±0.08 multi=93.07±0.08 | clip_mla image=72.22±0.1 text=85.34±0.06 multi=93.47±0.04
"""
# Rows in the paper's order; the data set the toy sets stand in for; Table 7's name for CLIP + MLA.
TABLE_SCRIPT = {5: "av", 6: "missing", 7: "clip"}          # the report's columns: methods_of(that script)
SCRIPT_TABLE = {"train_av.py": 5, "train_it.py": 5, "train_ait.py": 5, "train_missing.py": 6, "train_clip.py": 7}
TOY_STANDS_FOR = {"train_av.py": "cremad", "train_it.py": "food101", "train_ait.py": "iemocap",
                  "train_missing.py": "iemocap", "train_clip.py": "food101"}
PAPER_DATASET = {"features": "iemocap", "mmin": "iemocap"}
PAPER_METHOD = {7: {"mla": "clip_mla"}}


def paper_results():
    """{(table, dataset, method): {column: (mean, std or None)}} from PAPER_RESULTS."""
    out = {}
    for line in PAPER_RESULTS.strip().splitlines():
        head, *rows = line.split(" | ")
        table, dataset = head.split()
        for row in rows:
            method, *cells = row.split()
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
        if not all(k in rec for k in RECORD_KEYS if k not in ("first_epoch", "probe")):    # older records lack them
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


def probe_cells(records, table):
    """The linear probe's rows of one method's records (those with a probe): {row: col_of}, col_of(record) ->
    [(column, value)]; Table 5 and 7: a row 'probe' of the modalities' columns; Table 6: a row per modality, its
    columns the missing rates. {} when none of them was probed."""
    if not any(r.get("probe") for r in records):
        return {}
    if table != 6:
        return {"probe": lambda r: list((r.get("probe") or {}).items())}
    rate = lambda r: f"{round(100 * r['args']['missing_rate'])}"
    return {f"probe {m}": (lambda r, m=m: [(rate(r), r["probe"][m])] if r.get("probe") else [])
            for m in dict.fromkeys(m for r in records for m in r["modalities"])}


def report_rows(records):
    """One row per (script, dataset, method, row, column): mean, std, seeds, paper value and difference; row "test"
    (the test accuracies), or the linear probe's (probe_cells) in the records that have one."""
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
        order = methods_of(TABLE_SCRIPT[table])
        methods = sorted({r["method"] for r in recs}, key=lambda m: (order.index(m) if m in order else 99, m))
        for method in methods:
            mine = [r for r in recs if r["method"] == method]
            for kind, cols_of in {"test": col_of, **probe_cells(mine, table)}.items():
                cells, source = {}, {}
                for r in mine:
                    for col, v in cols_of(r):
                        first = source.setdefault((col, r["seed"]), r.get("_path", "?"))
                        if first != r.get("_path", "?"):
                            raise DataError(f"{r.get('_path')}: a second record of {dataset} {method} seed {r['seed']} "
                                            f"({col}), besides {first}; expected one per seed: point the report at "
                                            "a folder that holds one set of runs")
                        cells.setdefault(col, []).append((r["seed"], v, r["select_on"]))
                paper = papers.get((table, paper_ds, PAPER_METHOD.get(table, {}).get(method, method)), {})
                for col in columns if kind == "test" or table == 6 else columns[:-1]:     # a probe has no multi
                    got = cells.get(col, [])
                    known = [v for _, v, _ in got if v is not None]   # None: no test sample had this view
                    row = {"script": script, "dataset": dataset, "table": table, "method": method, "row": kind,
                           "column": col, "mean": None, "std": None, "n": len(known), "n_expected": len(all_seeds),
                           "n_na": len(got) - len(known),
                           "on_test": any(sel == "test" for _, _, sel in got), "paper_dataset": paper_ds,
                           "paper_is_other_data": toy, "paper_mean": None, "paper_std": None, "diff": None}
                    if known:
                        mean, std = _mean_std(known)
                        row["mean"], row["std"] = round(mean, 4), None if std is None else round(std, 4)
                    if col in paper and kind == "test":
                        row["paper_mean"], row["paper_std"] = paper[col]
                        if row["mean"] is not None:
                            row["diff"] = round(row["mean"] - row["paper_mean"], 4)
                    rows.append(row)
    return rows


def _cell(mean, std, n=None, n_expected=None, on_test=False, recorded=False):
    if mean is None:
        return "—" if n is None else "n/a (no sample had this view)" if recorded else "missing"
    s = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    if n is not None:
        s += f" (n={n}" + (f" of {n_expected}" if n < n_expected else "") + ")"
    return s + (" †" if on_test else "")


def mixed_settings(records):
    """{(script, dataset, method): the flags in which two of its records differ (seed, missing rate aside)}."""
    first, mixed = {}, {}
    for r in records:
        key = (r["script"], r["dataset"], r["method"])
        shown = other_settings(first.setdefault(key, r)["args"], r["args"], free={"seed", "missing_rate"})
        if shown:
            mixed.setdefault(key, shown)
    return mixed


def report(runs_dir, paper=False, fmt="md"):
    """The tables of every record under runs_dir, in the paper's shape (see the section banner)."""
    if not Path(runs_dir).is_dir():
        raise DataError(f"{runs_dir}: folder not found; expected the --out_dir of some runs")
    records = load_records(runs_dir)
    rows = report_rows(records)
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
        for method, kind in dict.fromkeys((r["method"], r["row"]) for r in rr):    # a probe's row below its test's
            cells = [f"`{method}`" + ("" if kind == "test" else f" {kind}")]
            got = {r["column"]: r for r in rr if (r["method"], r["row"]) == (method, kind)}
            for r in (got.get(col) for col in cols):
                cells.append("—" if r is None else _cell(r["mean"], r["std"], r["n"], r["n_expected"], r["on_test"],
                                                         r["n_na"] > 0))
                if paper:
                    cells += ["—", "—"] if r is None else [_cell(r["paper_mean"], r["paper_std"]),
                                                           "—" if r["diff"] is None else f"{r['diff']:+.2f}"]
            out.append("| " + " | ".join(cells) + " |")
        if any(r["on_test"] for r in rr):
            out.append("† epoch selected on the test set (--select_on test, the official protocol): optimistic")
        out += [f"note: `{m}` averages runs of other settings ({shown}): give each setting its own --out_dir"
                for (s, d, m), shown in mixed_settings(records).items() if (s, d) == (script, dataset)]
        out.append("")
    return "\n".join(out)


PLAIN_KEYS = ("epoch", "lr", "train_loss", "val", "test")        # an epoch entry's keys that are no diagnostic


def diagnostic_lines(recs, key):
    """{line label: per epoch the mean over the records (seeds), NaN where none has a value} of one diagnostic of
    the epoch entries: a line per modality of {modality: value}, per item of a list (G-Blending's weights: the
    modalities, then fused), or one line of a number."""
    names = list(recs[0]["modalities"])
    lines = {}
    for r in recs:
        for i, e in enumerate(r["epochs"]):
            v = e.get(key)
            if isinstance(v, list):
                v = dict(zip(names + ["fused"] if len(v) == len(names) + 1 else map(str, range(len(v))), v))
            for label, x in (v if isinstance(v, dict) else {key: v}).items():
                if isinstance(x, (int, float)):
                    lines.setdefault(label, {}).setdefault(i, []).append(x)
    n = min(len(r["epochs"]) for r in recs)
    return {label: [sum(by[i]) / len(by[i]) if by.get(i) else math.nan for i in range(n)]
            for label, by in lines.items()}


def plot_curves(runs_dir, out):
    """Per method, validation accuracy of each modality and of the fused prediction over epochs
    (mean over seeds; the test curve for runs without a validation split) and, beside it on the method's row, a
    panel per diagnostic of its epochs (diagnostic_lines: a line per modality). Needs matplotlib."""
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
        part = "".join(f" {k} {r['args'][k]}" for k in ("missing_rate", "fold") if k in r["args"]
                       and (k != "fold" or r["dataset"] == "mmin"))
        panels.setdefault((r["script"], r["dataset"] + part, r["method"]), []).append(r)
    def paper_order(item):
        (script, dataset, method), _ = item
        order = methods_of(TABLE_SCRIPT[SCRIPT_TABLE.get(script, 5)])
        return script, dataset, order.index(method) if method in order else 99, method

    groups = sorted(panels.items(), key=paper_order)
    keys = [[None] + list(dict.fromkeys(k for r in recs for e in r["epochs"] for k in e if k not in PLAIN_KEYS))
            for _, recs in groups]                  # None: the accuracy panel, then the diagnostics
    wide = max(map(len, keys))
    if wide == 1:                                   # accuracies alone: three methods a row
        ncols, size = min(3, len(groups)), (4.2, 3.2)
        slots = [(i, g, None) for i, g in enumerate(groups)]
    else:                                           # a row per method: its accuracies, then its diagnostics
        ncols, size = wide, (3.6, 2.7)
        slots = [(i * wide + j, g, k) for i, (g, ks) in enumerate(zip(groups, keys)) for j, k in enumerate(ks)]
    nrows = math.ceil(len(groups) / ncols) if wide == 1 else len(groups)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for pos, ((script, dataset, method), recs), key in slots:
        ax = axes.flat[pos]
        if key is not None:
            for label, mean in diagnostic_lines(recs, key).items():
                ax.plot(range(1, len(mean) + 1), mean, label=label, lw=1.4, marker="o", ms=3)   # a lone value shows
            ax.set_title(f"{key} · {method}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.lines:                            # none: no epoch had a value (e.g. outside the active epochs)
                ax.legend(fontsize=7)
            continue
        split = "val" if recs[0]["epochs"][0].get("val") else "test"
        for name in list(recs[0]["modalities"]) + ["multi"]:
            curves = [[math.nan if e[split][name] is None else e[split][name]     # None: view absent, a gap
                       for e in r["epochs"] if e.get(split)] for r in recs]
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=name, lw=2.2 if name == "multi" else 1.4,
                    marker="o" if n == 1 else None)           # one epoch: a point, not a line
        ax.set_title(f"{method} · {dataset} · {Path(script).stem} ({len(recs)} seed{'s' * (len(recs) > 1)})",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for pos, ax in enumerate(axes.flat):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))       # whole epochs
        if pos not in {slot[0] for slot in slots}:
            ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def probe_runs(runs_dir, device):
    """The linear probe (linear_probe) of every finished run under runs_dir (a run folder or a folder of runs: each
    record.json beside its best.pt), on `device`: its script rebuilds the run's data and model from the recorded
    settings (the script's run(args, probe_of=folder)), the accuracies go into the record's "probe" (rewritten
    atomically). Returns [(record path, accuracies)]."""
    paths = sorted(Path(runs_dir).rglob("record.json")) if Path(runs_dir).is_dir() else []
    if not paths:
        raise DataError(f"{runs_dir}: no record.json under it; expected the folder of a finished run (or of runs)")
    out = []
    for path in paths:
        record = json.loads(path.read_text())
        if not (path.parent / "best.pt").is_file():
            print(f"warning: {path.parent}: no best.pt (the selected epoch's weights); not probed", file=sys.stderr)
            continue
        script = importlib.import_module(Path(record["script"]).stem)     # train_av, ... (beside this file)
        args = argparse.Namespace(**{**vars(script.get_args([])), **filled_settings(record["args"])})
        args.device = device
        if hasattr(args, "amp"):                # bf16 only on CUDA (a run of the GPU probed on the CPU: float32)
            args.amp = bool(args.amp) and str(device).startswith("cuda")
        print(f"probing {path.parent} ({record['script']}, {record['method']} seed {record['seed']})", flush=True)
        if record["version"] != (now := code_version()):
            print(f"note: {path.parent} was trained by code {record['version']}, probed by {now}", file=sys.stderr)
        out.append((path, write_probe(path.parent, script.run(args, probe_of=path.parent))))
    if not out:
        raise DataError(f"{runs_dir}: no run with its best.pt; nothing probed")
    return out


def convert_m3ae(src, out):
    """Write the M3AEEncoder state dict of both modalities (what --m3ae_ckpt loads) converted from the M3AE
    pickle `src` to `out`; return a line naming the sizes and the flags that build encoders of them."""
    params, variant = read_m3ae_pickle(src)
    sd = {}
    for name, value in params.items():
        new = m3ae_torch_name(name)
        if new is not None:
            t = torch.from_numpy(np.array(value, dtype=np.float32))
            sd[new] = t.T.contiguous() if name.endswith("/kernel") else t
    if "cls_token" not in sd or "image_embedding.weight" not in sd or "text_embedding.weight" not in sd:
        raise DataError(f"{src}: no M3AE encoder parameters (cls_token, image_embedding, text_embedding) in "
                        f"state.params['params']; it holds {_short(params, 6)}")
    dim, vocab = sd["cls_token"].shape[-1], sd["text_embedding.weight"].shape[0]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    patch = round((sd["image_embedding.weight"].shape[1] / 3) ** 0.5)
    ratio = sd["encoder.blocks.0.transformer_mlp.fc1.weight"].shape[0] // dim if depth else 4
    kind = variant.get("m3ae.model_type") if isinstance(variant.get("m3ae.model_type"), str) else None
    heads = M3AE_HEADS.get(kind) or variant.get("m3ae.num_heads")
    if not isinstance(heads, int) or dim % heads:
        heads = None
    own = ["cls_token", "encoder_image_type_embedding", "encoder_text_type_embedding", "image_embedding.weight",
           "image_embedding.bias", "text_embedding.weight"] + [
        f"encoder.blocks.{i}.{part}.{leaf}" for i in range(depth) for part in M3AE_BLOCK.values()
        for leaf in ("weight", "bias")] + ["encoder.layer_norm.weight", "encoder.layer_norm.bias"]
    missing = [k for k in own if k not in sd]
    if missing:
        raise DataError(f"{src}: the M3AE encoder of width {dim}, depth {depth} lacks {_short(missing, 6)}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: sd[k] for k in own}, out)               # every tensor both encoders load, in module order
    flags = f"--m3ae_dim {dim} --m3ae_depth {depth} --m3ae_heads {heads or '<heads>'} --patch_size {patch} " \
            f"--vocab_size {vocab}" + (f" --m3ae_mlp_ratio {ratio}" if ratio != 4 else "")
    return (f"convert_m3ae: {src} -> {out}: {len(sd)} encoder tensors of {len(params)} (the decoder left out), "
            f"width {dim}, depth {depth}, heads {heads or 'not recorded'}" + (f" ({kind})" if kind else "") +
            f", MLP ratio {ratio}, patch {patch}, vocabulary {vocab}; train with --m3ae_ckpt {out} {flags}")


def _cli(argv=None):
    p = argparse.ArgumentParser(prog="python common.py", description="Tables and curves from run records; "
                                "videos prepared for train_av.py; M3AE's JAX weights converted.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="the tables of all records under RUNS_DIR, in the paper's shape")
    r.add_argument("runs_dir")
    r.add_argument("--paper", action="store_true", help="add the paper's value and our difference per cell")
    r.add_argument("--format", default="md", choices=["md", "csv"])
    q = sub.add_parser("plot", help="per-modality and fused accuracy over epochs, one panel per method, and a "
                                    "panel per diagnostic (one line per modality) beside it")
    q.add_argument("runs_dir")
    q.add_argument("--out", default="curves.png")
    v = sub.add_parser("prepare", help="videos -> <out>/AudioWAV/<clip>.wav and <out>/Image-01-FPS/<clip>/ "
                                       "(clip = file name stem), the folders train_av.py reads; needs pip install av",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--videos", required=True, help=f"folder searched recursively for {' '.join(VIDEO_EXTS)} files")
    v.add_argument("--out", required=True, help="data root written (finished clips are skipped on a rerun)")
    v.add_argument("--fps", type=float, default=1, help="frames kept per second of video")
    v.add_argument("--sample_rate", type=int, default=16000, help="WAV sample rate (mono, 16-bit)")
    v.add_argument("--frame_size", type=int, default=256, help="short side of the saved frames in pixels")
    v.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    b = sub.add_parser("probe", help="the linear probe of finished runs' selected epochs, into their records")
    b.add_argument("runs_dir", help="a run's folder (record.json, best.pt) or a folder of runs; run it from the folder "
                   "the runs were trained from (the recorded --data_root, --cache_dir, checkpoints may be relative)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m = sub.add_parser("convert_m3ae", help="young-geng/m3ae_public's released JAX pickle -> the encoder state dict "
                                            "--m3ae_ckpt loads (no JAX needed; the pickled code is not run)")
    m.add_argument("pickle", help="the released M3AE pickle (m3ae_main.py's model.pkl)")
    m.add_argument("out", help="PyTorch state dict written")
    args = p.parse_args(argv)
    if args.cmd == "report":
        print(report(args.runs_dir, args.paper, args.format))
    elif args.cmd == "plot":
        print(f"wrote {plot_curves(args.runs_dir, args.out)}")
    elif args.cmd == "probe":
        for path, acc in probe_runs(args.runs_dir, args.device):
            print(f"{path}: probe {fmt_acc(acc)}")
    elif args.cmd == "convert_m3ae":
        print(convert_m3ae(args.pickle, args.out))
    else:
        if args.fps <= 0 or args.sample_rate < 1 or args.frame_size < 1:
            p.error("--fps, --sample_rate and --frame_size must be positive")
        n = prepare_videos(list_videos(args.videos), args.out, args.fps, args.sample_rate, args.frame_size,
                           args.workers)
        failed = f" (reasons in {Path(args.out) / 'prepare_errors.txt'})" if n["failed"] else ""
        print(f"prepare: {n['done']} done, {n['skipped']} skipped, {n['failed']} failed{failed}")


if __name__ == "__main__":
    sys.modules.setdefault("common", sys.modules[__name__])    # the scripts `probe` imports share this module
    try:
        script_main(_cli, again="rerun the same command (prepare skips the clips it finished)")
    except BrokenPipeError:             # `report ... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
