"""Planning a training run for the user's data, device and minutes (`unetx train --time 10m`).

Before training, from
- a dataset fingerprint: image sizes and channels, class balance, and the size of the objects in the masks
  (the median equivalent diameter of the connected regions of every class), and
- a throughput probe: a few real training steps of each candidate network on this device,
the plan picks what the user did not give: crop size, depth, width, batch size, patches per epoch and how often to
validate, so that the run, its validations and its final checkpoint fit the budget.

The rules, in order (nnU-Net plans from a fingerprint too, for a GPU's memory; here the budget is time):
1. crop: about 6 object diameters (the larger objects: the upper quartile) of context, 128..256 px on a CPU
   (..512 on a GPU), never more than the smallest image;
2. depth: the deepest (at most 4 on a CPU, 5 on a GPU) whose bottleneck keeps >= 8 px;
3. batch: ~128k pixels per step on a CPU (8 x 128^2); on a GPU as many as half its free memory holds, at most 32;
4. width: the widest candidate (CPU 16/32, GPU 32/64) that still gets MIN_STEPS optimiser steps in the budget;
   on a CPU, a budget too short for MIN_STEPS takes smaller batches (down to 4) for more steps;
5. epochs of ~EPOCH_SECONDS each (4..30 of them, for a curve and a best checkpoint), validation at most ~10% of
   the time. The learning rate follows a cosine over the budget's time, not over a guessed number of epochs.
Every planned value yields to its flag; the plan is written to RUN_DIR/plan.json and `--resume` keeps it.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Sample
from .errors import InputError

# knobs the planner chooses when their flag is not given
PLANNED = ("crop", "depth", "batch_size", "base_channels", "patches_per_image", "epochs", "val_every")
MIN_STEPS = 1000  # optimiser steps a width needs in the budget to be chosen over a narrower one
EPOCH_SECONDS = 40.0
CPU_PIXELS_PER_STEP = 8 * 128 * 128
DEFAULT_BUDGET = {"cpu": 600.0, "cuda": 1800.0}  # `unetx train` with neither --time nor --epochs


def parse_duration(text: str | float | int, option: str = "--time") -> float:
    """'10m', '90s', '1h', '1h30m', '2.5m' or a number of seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or m is None or not any(m.groups()):
            raise InputError(f"{option} {text!r} is not a duration; write it like 10m, 90s, 1h or 1h30m")
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        seconds = 3600 * h + 60 * mi + se
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{option} {text!r} must be a positive duration, e.g. 10m")
    return seconds


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): a --time budget includes Python's own start-up."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        import os

        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------------- fingerprint
@dataclass
class Fingerprint:
    images: int
    channels: int
    median_size: tuple[int, int]
    min_side: int
    class_fractions: list[float]
    # px: the upper quartile of the equivalent diameters of the masks' connected regions, every class (the larger
    # objects set the context a patch must hold; the median would follow the many small fragments)
    object_diameter: float

    def summary(self) -> str:
        fr = ", ".join(f"{100 * f:.0f}%" for f in self.class_fractions)
        return (
            f"{self.images} images, {self.channels} channel{'s' * (self.channels > 1)}, median "
            f"{self.median_size[1]}x{self.median_size[0]} px (smallest side {self.min_side}), classes {fr}, "
            f"objects ~{self.object_diameter:.0f} px across"
        )


def fingerprint(samples: Sequence[Sample], num_classes: int, max_masks: int = 32) -> Fingerprint:
    from scipy import ndimage

    sizes = np.array([s.target.shape for s in samples])
    counts = np.zeros(num_classes)
    diameters: list[np.ndarray] = []
    step = max(1, len(samples) // max_masks)
    for s in samples[::step]:
        t = s.target
        counts += np.bincount(t.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        for c in np.unique(t):
            labels, n = ndimage.label(t == c)
            if n:
                areas = np.bincount(labels.ravel())[1:]
                diameters.append(np.sqrt(4 * areas[areas >= 4] / math.pi))
    d = np.concatenate(diameters) if diameters else np.array([])
    h, w = np.median(sizes, axis=0)
    return Fingerprint(
        images=len(samples),
        channels=int(samples[0].image.shape[0]),
        median_size=(int(h), int(w)),
        min_side=int(sizes.min()),
        class_fractions=(counts / max(counts.sum(), 1)).round(4).tolist(),
        object_diameter=float(np.percentile(d, 75)) if d.size else float(sizes.min()) / 4,
    )


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    budget_s: float | None
    values: dict  # the TrainConfig fields the plan sets (planned or given)
    planned: list[str]  # which of `values` the plan chose (the rest came from flags)
    fingerprint: dict
    probe: list[dict] = field(default_factory=list)
    step_s: float | None = None  # measured seconds per optimiser step of the chosen network
    val_s: float | None = None  # estimated seconds per validation
    steps: int | None = None  # optimiser steps the budget is expected to give

    def lines(self) -> list[str]:
        fp = Fingerprint(**{**self.fingerprint, "median_size": tuple(self.fingerprint["median_size"])})
        v = self.values
        src = lambda k: "" if k in self.planned else " (given)"
        out = [f"data: {fp.summary()}"]
        if self.probe:
            out.append(
                "probe: "
                + "; ".join(
                    f"base {p['base_channels']}: {p['step_s']:.2f} s/step"
                    + (f" ({p['data_s']:.2f} s of it patches)" if "data_s" in p else "")
                    for p in self.probe
                )
            )
        net = (
            f"network: base {v['base_channels']}{src('base_channels')}, depth {v['depth']}{src('depth')}; "
            f"patches {v['crop']} px{src('crop')} x {v['batch_size']}{src('batch_size')} per step, "
            + (
                f"{v['patches_per_image']} per image per epoch{src('patches_per_image')}"
                if v["patches_per_image"] is not None
                else "as many per image per epoch as cover its area"
            )
        )
        out.append(net)
        if self.budget_s is not None and self.step_s is not None:
            out.append(
                f"budget {format_duration(self.budget_s)}: ~{self.steps} steps of ~{self.step_s:.2f} s, "
                f"epochs of ~{EPOCH_SECONDS:.0f} s until the time is up, validation every {v['val_every']} "
                f"epoch{'s' * (v['val_every'] > 1)}{src('val_every')} (~{self.val_s:.1f} s each); "
                "learning rate: cosine over the budget"
            )
        elif self.budget_s is not None:
            out.append(f"budget {format_duration(self.budget_s)}: epochs until the time is up (not probed)")
        else:
            out.append(f"{v['epochs']} epochs{src('epochs')}, validation every {v['val_every']}{src('val_every')}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path) -> None:
        from .checkpoint import atomic_write

        text = json.dumps({**self.to_dict(), "explanation": self.lines()}, indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _round_to(x: float, multiple: int) -> int:
    return int(max(multiple, multiple * round(x / multiple)))


def choose_crop_depth(fp: Fingerprint, device: torch.device, crop: int | None, depth: int | None) -> tuple[int, int]:
    limit = 512 if device.type == "cuda" else 256
    if crop is None:
        want = min(max(6 * fp.object_diameter, 128), limit)
        side = (fp.min_side // 32) * 32 or fp.min_side
        crop = min(_round_to(want, 32), side)
    if depth is None:  # the deepest whose bottleneck keeps >= 8 px (4 levels on a CPU, 5 on a GPU)
        depth = 1
        while depth < (5 if device.type == "cuda" else 4) and crop // 2 ** (depth + 1) >= 8:
            depth += 1
    return crop, depth


def _probe_step(
    cfg, data, device, base: int, crop: int, depth: int, batch: int, amp_dtype, budget_s: float | None
) -> dict:
    """Seconds per training step (forward, loss, backward, Adam) and per eval pixel, on random data of the
    planned shape: the network's cost does not depend on the pixel values. On a CPU the probe runs 2 patches a
    step and scales to `batch` (a CPU step's time grows with its pixels), so that it costs little of a short
    budget; on a GPU it runs the whole batch (its peak memory sizes the batch)."""
    planned_batch = batch
    if device.type == "cpu":
        batch = min(batch, 2)
    from ..nn import UNet
    from .losses import make_loss, num_output_channels
    from .training.setup import make_optimizer

    torch.manual_seed(0)
    model = UNet(
        in_channels=data.channels,
        out_channels=num_output_channels(cfg.loss, data.table.num_classes),
        base_channels=base,
        depth=depth,
        pool=cfg.pool,
        upsample=cfg.upsample,
        dropout=cfg.dropout,
    ).to(device)
    opt = make_optimizer(cfg, model.parameters())  # the trainer's (fused) Adam, whose step is timed here too
    loss_fn = make_loss(cfg.loss)
    x = torch.randn(batch, data.channels, crop, crop, device=device)
    y = torch.randint(0, data.table.num_classes, (batch, crop, crop), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )

    def step():
        with autocast:
            logits = model(x)
        loss = loss_fn(logits.float(), y, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()  # warm-up: allocations, oneDNN primitive creation
    sync()
    warm = time.perf_counter() - t0
    steps = 1 if budget_s is not None and warm > 0.01 * budget_s else (2 if device.type == "cpu" else 5)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / steps * planned_batch / batch
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    with torch.no_grad(), autocast:
        model(x)  # BatchNorm folded into the convolutions: a new primitive
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
    eval_px_s = (time.perf_counter() - t0) / (batch * crop * crop)
    return {
        "base_channels": base,
        "crop": crop,
        "depth": depth,
        "batch_size": planned_batch,
        "step_s": step_s,
        "eval_s_per_px": eval_px_s,
        "peak_bytes": peak,
    }


def _patch_seconds(cfg, data, crop: int, n: int = 4) -> float:
    """Seconds to cut and augment one training patch, as the run's PatchDataset does."""
    from .data import Augment, PatchDataset

    aug = (
        Augment(elastic=cfg.elastic, elastic_sigma=cfg.elastic_sigma, brightness=cfg.brightness, contrast=cfg.contrast)
        if cfg.augment
        else None
    )
    ds = PatchDataset(data.train, crop, aug, 1, cfg.seed)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return (time.perf_counter() - t0) / n


def make_plan(
    cfg,
    given: set[str],
    data,
    device: torch.device,
    budget_s: float | None,
    amp_dtype=None,
    log=print,
    measure: bool = True,
) -> Plan:
    """Fill the planned fields of `cfg` not named in `given` (in place) and return the plan.

    budget_s None: an epoch-count run (cfg.epochs); the plan still sizes the network and patches for the device.
    measure False (torchrun: every process must reach the same plan): the fingerprint's rules alone, the narrowest
    width, and epochs of one pass over the images' area until the time is up."""
    fp = fingerprint(data.train, data.table.num_classes)
    crop, depth = choose_crop_depth(
        fp, device, cfg.crop if "crop" in given else None, cfg.depth if "depth" in given else None
    )
    if "batch_size" in given:
        batch = cfg.batch_size
    elif device.type == "cuda":
        batch = 8  # a first guess; sized by memory below
    else:
        batch = int(min(16, max(2, round(CPU_PIXELS_PER_STEP / crop**2))))
    widths = [cfg.base_channels] if "base_channels" in given else ([32, 64] if device.type == "cuda" else [16, 32])
    need_probe = measure and (
        budget_s is not None or len(widths) > 1 or (device.type == "cuda" and "batch_size" not in given)
    )
    probe: list[dict] = []
    if need_probe:
        log(
            f"unetx train: planning: probing {'up to ' * (len(widths) > 1)}{len(widths)} "
            f"network{'s' * (len(widths) > 1)} on {device} ..."
        )
        for base in widths:
            if probe and budget_s is not None and budget_s * 0.85 / (probe[-1]["step_s"] * 3) < MIN_STEPS:
                break  # a wider network (~3x the step time) could not get its MIN_STEPS: not worth probing
            probe.append(_probe_step(cfg, data, device, base, crop, depth, batch, amp_dtype, budget_s))
        if device.type == "cuda" and "batch_size" not in given:
            free, _ = torch.cuda.mem_get_info(device)
            per_sample = max(p["peak_bytes"] for p in probe) / batch
            batch = int(min(32, max(2, 0.5 * free // per_sample)))
            for p in probe:  # the step time scales with the batch
                p["step_s"] *= batch / p["batch_size"]
                p["batch_size"] = batch
    if probe:  # loading and augmenting the patches is part of each step (DataLoader workers overlap it)
        per_patch = _patch_seconds(cfg, data, crop) / max(1, cfg.workers)
        for p in probe:
            p["data_s"] = per_patch * p["batch_size"]
            p["step_s"] += p["data_s"]
    n_val_px = sum(s.target.size for s in data.val)
    chosen = probe[0] if probe else None
    if budget_s is not None:
        usable = budget_s * 0.85
        for p in probe:  # the widest that still gets MIN_STEPS steps
            if usable / p["step_s"] >= MIN_STEPS:
                chosen = p
    base = chosen["base_channels"] if chosen else widths[0]
    step_s = chosen["step_s"] if chosen else None
    if budget_s is not None and step_s is not None and "batch_size" not in given and device.type != "cuda":
        # a short budget: Adam progresses by steps more than by pixels, so trade batch for steps (down to 4)
        short = budget_s * 0.85 / step_s / MIN_STEPS
        if short < 1 and batch > 4:
            smaller = max(4, int(batch * short))
            step_s *= smaller / batch
            batch = smaller
    values = {"crop": crop, "depth": depth, "batch_size": batch, "base_channels": base}
    val_s = chosen["eval_s_per_px"] * n_val_px * 1.3 if chosen else None
    steps = None
    if budget_s is not None and step_s is None:
        values.update(epochs=1000)
    elif budget_s is not None:
        val_share = min(0.25, (val_s or 0) / max(budget_s, 1))
        steps = max(1, int(budget_s * (0.85 - val_share) / step_s))
        epochs = int(min(30, max(4, round(steps * step_s / EPOCH_SECONDS))))
        per_epoch = max(1, steps // epochs)
        ppi = max(1, math.ceil(per_epoch * batch / len(data.train)))
        epoch_s = math.ceil(ppi * len(data.train) / batch) * step_s
        val_every = max(1, math.ceil((val_s or 0) / max(0.1 * epoch_s, 1e-9))) if data.val else 1
        # an upper bound: the run ends when the time is up (after ~`epochs` epochs)
        values.update(patches_per_image=ppi, epochs=max(1000, 4 * epochs), val_every=val_every)
    for k, v in values.items():
        if k in given:
            values[k] = getattr(cfg, k)
        else:
            setattr(cfg, k, v)
    values.update({k: getattr(cfg, k) for k in PLANNED if k not in values})
    planned = [
        k
        for k in PLANNED
        if k not in given and (k in ("crop", "depth", "batch_size", "base_channels") or budget_s is not None)
    ]
    return Plan(
        budget_s=budget_s,
        values=values,
        planned=planned,
        fingerprint=asdict(fp),
        probe=probe,
        step_s=step_s,
        val_s=val_s,
        steps=steps,
    )
