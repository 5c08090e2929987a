"""Training a UNet on folders of images and masks, single process or DistributedDataParallel under torchrun.

    from unetx.train import TrainConfig, train, resume
    summary = train(TrainConfig(images="train/images", masks="train/masks", out="runs/a", epochs=20))
    summary = resume("runs/a", epochs=30)          # continue a killed (or finished) run from its last checkpoint

RUN_DIR gets last.pt and best.pt (atomic checkpoints), history.csv and history.npy (one row per epoch), curves.png,
and overlays/ (validation images with predicted and true masks). Everything about the data and the options is
checked before the first step; a problem is one `InputError` listing every bad file.

Determinism: the weights are initialised from `seed`; the patches, augmentation and shuffling of epoch e come from
generators seeded by (seed, e), and dropout from torch's generator seeded at each epoch's start. A resumed run
therefore continues exactly as the killed one would have (on the same device and number of processes).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .data import (LOSSY_SUFFIXES, Augment, ClassTable, InputError, PatchDataset, Sample, balancing_weights,
                   class_frequencies, default_patches_per_image, image_channels, infer_class_table, load_samples,
                   pair_files)
from .losses import LOSSES, make_loss, num_output_channels, probabilities
from .metrics import confusion_counts, dice_from_counts, foreground_mean, iou_from_counts
from .plan import DEFAULT_BUDGET, PLANNED, format_duration, make_plan, parse_duration

SCHEDULES = ("cosine", "step", "plateau", "none")
RUN_FILES = ("last.pt", "best.pt", "history.csv", "history.npy", "curves.png")


class TrainingError(RuntimeError):
    """Training had to stop mid-run (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every training option (the CLI flags of `unetx train` have the same names, with - for _)."""

    images: str = ""
    masks: str = ""
    out: str = "runs/unetx"
    val_images: str | None = None
    val_masks: str | None = None
    val_fraction: float = 0.0  # with no validation folders: hold out the last round(F * N) samples (name order)
    mask_suffix: str = ""
    mask_mode: str = "auto"  # auto | binary | labels | colour
    foreground: str = "bright"  # binary masks: which of the two values is the foreground (ISBI membranes: dark)
    classes: int | None = None  # label maps: number of classes (default: largest value + 1)
    class_table: str | None = None  # JSON class table (colour masks, or grey values with names)
    normalize: str = "dtype"
    # model
    base_channels: int = 32
    depth: int = 4
    pool: str = "avg"
    upsample: str = "transpose"
    dropout: float = 0.0
    sync_bn: bool = False
    # optimisation
    epochs: int = 50
    batch_size: int = 4
    crop: int = 256
    patches_per_image: int | None = None  # random crops per image per epoch (default: image area / crop area)
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    loss: str = "ce+dice"
    weight_map: bool = False  # the U-Net paper's border-emphasising weight map
    w0: float = 10.0
    sigma: float = 5.0
    # augmentation
    augment: bool = True
    elastic: float = 0.5
    elastic_sigma: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    # the time budget ("10m", "90s", "1h"): the run, its validations and its last checkpoint end within it, and the
    # learning rate follows a cosine over it (see unetx.plan); None: cfg.epochs epochs
    time: str | None = None
    # execution
    amp: str = "auto"  # auto (on for CUDA) | on | off  (CPU: bfloat16)
    channels_last: bool = False
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    val_every: int = 1
    val_tile: int = 1024  # validation images up to this size run whole, larger ones by overlap-tile
    overlays: int = 4
    progress: bool = True

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.amp not in ("auto", "on", "off"):
            raise InputError(f"--amp must be auto, on or off, got {self.amp!r}")
        for name in ("epochs", "batch_size", "crop", "base_channels", "depth", "val_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.crop < 2**self.depth:
            raise InputError(f"--crop {self.crop} is smaller than the network's downsampling factor 2**depth = "
                             f"{2**self.depth}; use --crop {4 * 2**self.depth} or more, or a smaller --depth")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if (self.val_images is None) != (self.val_masks is None):
            raise InputError("give both --val-images and --val-masks, or neither")
        if self.val_images is not None and self.val_fraction > 0:
            raise InputError("give either validation folders or --val-fraction, not both")
        for name, ok, need in (("lr", lambda v: v > 0, "a finite number > 0 (e.g. 1e-3)"),
                               ("weight_decay", lambda v: v >= 0, ">= 0"),
                               ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("elastic", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
                               ("elastic_sigma", lambda v: v >= 0, ">= 0"), ("brightness", lambda v: v >= 0, ">= 0"),
                               ("contrast", lambda v: v >= 0, ">= 0"), ("w0", lambda v: v >= 0, ">= 0"),
                               ("sigma", lambda v: v > 0, "a positive number of pixels")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise InputError(f"--{name.replace('_', '-')} must be {need}, got {v!r}")
        for name, lo in (("workers", 0), ("overlays", 0), ("seed", 0), ("classes", 2), ("patches_per_image", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.seed >= 2**32:
            raise InputError(f"--seed must be below 2**32, got {self.seed}")
        if self.val_tile < 2**self.depth:
            raise InputError(f"--val-tile {self.val_tile} is smaller than the network's downsampling factor "
                             f"2**depth = {2**self.depth}")
        if not self.images or not self.masks:
            raise InputError("--images and --masks are required (folders of training images and masks)")
        if self.time is not None:
            parse_duration(self.time)


@dataclass
class RunData:
    train: list[Sample]
    val: list[Sample]
    table: ClassTable
    channels: int
    class_weights: list[float] | None = None


# ---------------------------------------------------------------------------------------------- setup
def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available in this PyTorch build / machine; use --device cpu")
    return dev


def check_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"the output folder {out} is a file; choose another --out")
    if not resume and (out / "last.pt").exists():
        raise InputError(f"{out} already holds a run (last.pt); continue it with `unetx train --resume {out}` or "
                         "choose another --out (nothing was overwritten)")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise InputError(f"the output folder {out} cannot be made: {probe} is a file; choose another --out")
    if not os.access(probe, os.W_OK):
        raise InputError(f"cannot write to {probe} (for the output folder {out})")


def prepare_data(cfg: TrainConfig, table: ClassTable | None = None, channels: int | None = None) -> RunData:
    """Read, pair and check all training and validation data; infer the class table unless one is given."""
    pairs = pair_files(cfg.images, cfg.masks, cfg.mask_suffix)
    val_pairs = pair_files(cfg.val_images, cfg.val_masks, cfg.mask_suffix) if cfg.val_images else []
    if table is None:
        if cfg.class_table:
            table = ClassTable.from_json(cfg.class_table)
            if table.kind == "binary" and cfg.foreground == "dark":
                table = ClassTable("binary", table.values[::-1], table.names)
        else:
            both = pairs + val_pairs
            table = infer_class_table([p.mask for p in both], cfg.mask_mode, cfg.foreground, cfg.classes,
                                      names=[p.mask_path.name for p in both],
                                      lossy=[p.mask_path.suffix.lower() in LOSSY_SUFFIXES for p in both])
    if cfg.classes is not None and table.num_classes != cfg.classes:
        raise InputError(f"--classes {cfg.classes} but the masks / class table have {table.num_classes} classes "
                         f"({table.values})")
    channels = channels or image_channels(pairs + val_pairs)
    samples = load_samples(pairs, table, channels, cfg.normalize)
    val = load_samples(val_pairs, table, channels, cfg.normalize) if val_pairs else []
    if cfg.val_fraction > 0 and not val:
        n_val = max(1, int(round(cfg.val_fraction * len(samples))))
        if n_val >= len(samples):
            raise InputError(f"--val-fraction {cfg.val_fraction} leaves no training images out of {len(samples)}")
        samples, val = samples[:-n_val], samples[-n_val:]
    class_weights = None
    if cfg.weight_map:
        class_weights = balancing_weights(class_frequencies(samples, table.num_classes))
        from .data import unet_weight_map

        for s in samples + val:
            s.weight = unet_weight_map(s.target, class_weights, cfg.w0, cfg.sigma)
    return RunData(samples, val, table, channels, class_weights)


def build_model(cfg: TrainConfig, data: RunData) -> nn.Module:
    from .nn import UNet

    try:
        out_ch = num_output_channels(cfg.loss, data.table.num_classes)
        return UNet(in_channels=data.channels, out_channels=out_ch, base_channels=cfg.base_channels, depth=cfg.depth,
                    pool=cfg.pool, upsample=cfg.upsample, dropout=cfg.dropout, sync_bn=cfg.sync_bn)
    except ValueError as e:
        raise InputError(str(e)) from None


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    return None


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    on = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
    if not on:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        warn_if_bf16_emulated(device)
        return torch.bfloat16
    return None


def warn_if_bf16_emulated(device: torch.device) -> None:
    """bfloat16 autocast on a CPU without native bfloat16 (AVX512-BF16 / AMX) runs emulated convolutions: CPU-S
    measured ~17x slower per pixel than float32 on a 2-core AVX2 EPYC, for unetx and stock PyTorch alike."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if device.type == "cpu" and supported is not None and not supported():
        warnings.warn("--amp on the CPU: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bfloat16 "
                      "convolutions are emulated and much slower than float32 (about 17x measured on an AVX2 EPYC); "
                      "use float32 here (train --amp off; predict without --amp)", stacklevel=3)


# ---------------------------------------------------------------------------------------------- the loop
class Trainer:
    """One training run. `Trainer(cfg).run()`; `Trainer.from_run_dir(dir)` to resume."""

    def __init__(self, cfg: TrainConfig, resume_ckpt: dict | None = None, plan_given: set[str] | None = None,
                 started: float | None = None):
        """plan_given: plan the run (unetx.plan) for the fields not named in it; None plans only with cfg.time
        (then every planned field left at its default is planned). started: when the time budget began
        (time.perf_counter(); default now)."""
        self.started = time.perf_counter() if started is None else started
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.rank, self.world, self.local_rank = _distributed()
        check_run_dir(self.out, resume=resume_ckpt is not None)
        self.device = _device(cfg.device, self.local_rank)
        table = checkpoint.class_table(resume_ckpt) if resume_ckpt else None
        channels = resume_ckpt["config"]["in_channels"] if resume_ckpt else None
        self.data = prepare_data(cfg, table, channels)
        self.plan = None
        if resume_ckpt is None and (plan_given is not None or cfg.time is not None):
            self._make_plan(plan_given)
        self.budget = parse_duration(cfg.time) if cfg.time is not None else None
        # seconds of the budget spent by earlier sessions of this run (a resumed run continues the same budget)
        self.spent_before = float((resume_ckpt or {}).get("time_spent", 0.0))
        self.out_of_time = False
        # what the budget's reserve is made of (see _reserve): the plan's estimates until measured here
        self.est = {"val": None, "save": 5.0, "step": (self.plan.step_s if self.plan and self.plan.step_s else 0.0)}
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data)
        if resume_ckpt is not None:
            if resume_ckpt["config"] != self.model.config:
                raise InputError(f"the checkpoint's model {resume_ckpt['config']} differs from the options' "
                                 f"{self.model.config}")
            self.model.load_state_dict(resume_ckpt["state_dict"])
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss_fn = make_loss(cfg.loss)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = _scheduler(cfg, self.opt)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.history: dict[str, list] = {}
        self.best = {"epoch": -1, "score": -math.inf}
        self.start_epoch = 0
        if resume_ckpt is not None:
            self.opt.load_state_dict(resume_ckpt["optimizer"])
            if self.sched is not None and resume_ckpt.get("scheduler"):
                self.sched.load_state_dict(resume_ckpt["scheduler"])
                if isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                    self.sched.T_max = cfg.epochs  # a resumed run may have been given more epochs
            if self.scaler is not None and resume_ckpt.get("scaler"):
                self.scaler.load_state_dict(resume_ckpt["scaler"])
            self.history = {k: list(v) for k, v in resume_ckpt.get("history", {}).items()}
            self.best = dict(resume_ckpt.get("best", self.best))
            self.start_epoch = int(resume_ckpt["epoch"])
        if self.budget is not None and cfg.schedule == "cosine":
            self.sched = None  # the learning rate follows the budget's time instead (_time_lr)
        ppi = cfg.patches_per_image or default_patches_per_image(self.data.train, cfg.crop)
        aug = (Augment(elastic=cfg.elastic, elastic_sigma=cfg.elastic_sigma, brightness=cfg.brightness,
                       contrast=cfg.contrast) if cfg.augment else None)
        self.dataset = PatchDataset(self.data.train, cfg.crop, aug, ppi, cfg.seed)
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                                           shuffle=True, seed=cfg.seed)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                                  num_workers=cfg.workers, pin_memory=self.device.type == "cuda")
        self.ddp = None
        if self.budget is not None and self.time_left() <= self._reserve():
            raise InputError(
                f"--time {cfg.time}: no time is left to train ({format_duration(max(self.time_left(), 0))} left of "
                f"the budget, {format_duration(self._reserve())} needed for the final validation and checkpoint); "
                + ("continue with --resume and a longer --time" if resume_ckpt else "give a longer --time"))
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:  # temporary files of a run killed while writing them
                for stale in self.out.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            if self.plan is not None:
                self.plan.write(self.out / "plan.json")

    def _make_plan(self, given: set[str] | None) -> None:
        cfg = self.cfg
        if given is None:  # the Python API with time=...: plan what was left at its default
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            given = {k for k in PLANNED if getattr(cfg, k) != defaults[k]}
        if cfg.time is None and "epochs" not in given:
            cfg.time = f"{DEFAULT_BUDGET.get(self.device.type, DEFAULT_BUDGET['cuda']) / 60:g}m"
        budget = parse_duration(cfg.time) if cfg.time is not None else None
        # under torchrun every process must reach the same plan: no probe there, the fingerprint's rules alone
        self.plan = make_plan(cfg, given, self.data, self.device, budget,
                              amp_dtype=_amp_dtype(cfg, self.device), log=self.log,
                              measure=self.world == 1)
        cfg.check()
        self.log("unetx train: the plan (" + (f"budget {cfg.time}" if budget else f"{cfg.epochs} epochs")
                 + "; any value can be set by its flag):")
        for line in self.plan.lines():
            self.log("  " + line)

    # -------------------------------------------------------------------------------- the time budget
    def time_left(self) -> float:
        return self.budget - self.spent_before - (time.perf_counter() - self.started)

    def _reserve(self) -> float:
        """Seconds the run needs after its last step: a validation, the overlays, the checkpoints, one more step."""
        n_val = len(self.data.val)
        val = self.est["val"]
        if val is None:  # not measured yet: the plan's estimate, slowed as much as the steps run slower than probed
            plan = self.plan
            val = (plan.val_s * max(1.0, self.est["step"] / plan.step_s)
                   if plan is not None and plan.val_s and plan.step_s else 0.0)
        overlays = val * min(self.cfg.overlays, n_val) / n_val if n_val else 0.0
        return 1.2 * (val + overlays + self.est["save"]) + self.est["step"] + 2.0

    def _time_lr(self) -> None:
        """Cosine from cfg.lr to cfg.lr / 100 over the part of the budget left for training."""
        window = max(self.budget - self._reserve(), 1e-9)
        progress = min(1.0, (self.budget - self.time_left()) / window)
        lr = self.cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in self.opt.param_groups:
            g["lr"] = lr

    def _should_stop(self) -> bool:
        if self.budget is None:
            return False
        stop = self.time_left() <= self._reserve()
        if self.world > 1:  # every process stops at the same step
            stop = bool(self._all_reduce(np.array([float(stop)]))[0] > 0)
        return stop

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, started: float | None = None, **overrides) -> "Trainer":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise InputError(f"--resume {run_dir}: no such run folder")
        if not (run_dir / "last.pt").exists():
            raise InputError(f"--resume {run_dir}: the folder has no last.pt (no epoch finished yet?); "
                             "start the run again without --resume")
        ckpt = checkpoint.load(run_dir / "last.pt")
        args = dict(ckpt.get("train_args") or {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in args.items() if k in known})
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.out = str(run_dir)
        return cls(cfg, resume_ckpt=ckpt, started=started)

    # -------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.cpu().numpy()

    # -------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        model = self.ddp or self.model
        model.train()
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.cfg.seed * 100003 + epoch)
        total_loss, seen, steps = 0.0, 0, 0
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}" + (f"/{self.cfg.epochs}" if self.budget is None else "")
        bar = tqdm(self.loader, desc=desc, unit="batch", leave=False,
                   disable=not (self.cfg.progress and self.is_main), dynamic_ncols=True, file=sys.stderr)
        t_prev = time.perf_counter()
        for image, target, weight in bar:
            if self._should_stop():
                self.out_of_time = True
                break
            if self.budget is not None and self.sched is None:
                self._time_lr()
            image = image.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            target = target.to(self.device, non_blocking=True)
            weight = weight.to(self.device, non_blocking=True) if self.cfg.weight_map else None
            with self._autocast():
                logits = model(image)
            loss = self.loss_fn(logits.float(), target, weight)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {steps + 1}; training "
                                    f"stopped, {self._kept()}. Lower --lr, or try --amp off")
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            n = image.shape[0]
            total_loss += loss.item() * n
            seen += n
            steps += 1
            elapsed = time.perf_counter() - t0
            now = time.perf_counter()  # a step as the budget sees it: loading and augmenting its patches included
            self.est["step"] = max(self.est["step"] * 0.8, now - t_prev)
            t_prev = now
            left = {} if self.budget is None else {"left": format_duration(self.time_left())}
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", img_s=f"{seen * self.world / max(elapsed, 1e-9):.1f}",
                            **left)
        else:
            if self.budget is not None and self._should_stop():
                self.out_of_time = True
        bar.close()
        sums = self._all_reduce(np.array([total_loss, seen], dtype=np.float64))
        elapsed = time.perf_counter() - t0
        return {"train_loss": sums[0] / max(sums[1], 1), "images_per_s": sums[1] / max(elapsed, 1e-9),
                "steps": steps, "seconds": elapsed}

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and per-class Dice/IoU over the validation images (whole images, or overlap-tile when large);
        each process takes every world-th image and the counts are summed."""
        from .predict import predict_tiled

        k = self.data.table.num_classes
        model = self.model
        model.eval()
        counts = np.zeros((k, 3), dtype=np.float64)
        loss_sum, n = 0.0, 0
        for s in self.data.val[self.rank:: self.world]:
            image = torch.from_numpy(s.image)
            target = torch.from_numpy(s.target.astype(np.int64))
            h, w = s.target.shape
            if h * w <= self.cfg.val_tile**2:
                with self._autocast():
                    logits = model(image[None].to(self.device)).float()
            else:
                logits = torch.from_numpy(predict_tiled(model, image, tile=self.cfg.val_tile, output="logits"))[None]
                logits = logits.to(self.device)
            weight = torch.from_numpy(s.weight)[None].to(self.device) if (self.cfg.weight_map and s.weight is not None) else None
            loss_sum += self.loss_fn(logits, target[None].to(self.device), weight).item()
            n += 1
            pred = probabilities(logits).argmax(1)[0]
            counts += confusion_counts(pred, target, k)
        model.train()
        totals = self._all_reduce(np.concatenate([counts.ravel(), [loss_sum, n]]))
        counts = totals[:-2].reshape(k, 3)
        dice, iou = dice_from_counts(counts), iou_from_counts(counts)
        out = {"val_loss": totals[-2] / max(totals[-1], 1), "val_dice": foreground_mean(dice)}
        for c, name in enumerate(self.data.table.names):
            out[f"val_dice_{name}"] = float(dice[c])
            out[f"val_iou_{name}"] = float(iou[c])
        return out

    def _kept(self) -> str:
        """What a stopped run leaves: the last good checkpoint, named only if one was written."""
        last = self.out / "last.pt"
        if last.exists():
            done = self.history["epoch"][-1] if self.history.get("epoch") else self.start_epoch
            return f"{last} still holds the last good epoch ({done})"
        return "no checkpoint was written (no epoch finished)"

    def save(self, epoch: int, best: bool) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kw = dict(classes=self.data.table, normalize=self.cfg.normalize, loss=self.cfg.loss, epoch=epoch,
                  optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict() if self.sched else None,
                  scaler=self.scaler.state_dict() if self.scaler else None, history=self.history, best=self.best,
                  train_args=dataclasses.asdict(self.cfg), world_size=self.world,
                  time_spent=self.spent_before + time.perf_counter() - self.started)
        ckpt = checkpoint.to_dict(self.model, **kw)
        try:
            # best before last: whenever last.pt exists, the best.pt it records exists too (a kill between the two
            # writes leaves a newer best.pt, which the resumed run recomputes identically)
            if best:
                checkpoint.write(self.out / "best.pt", ckpt)
            checkpoint.write(self.out / "last.pt", ckpt)
        except ValueError as e:
            raise TrainingError(f"{e}; {self._kept()}. Lower --lr, or try --amp off") from None
        write_history(self.history, self.out)
        from .plots import save_curves

        save_curves(self.history, self.out / "curves.png")

    def write_overlays(self) -> list[Path]:
        """Validation images beside their predicted and true masks (best weights), in RUN_DIR/overlays/."""
        if not self.is_main or self.cfg.overlays <= 0 or not self.data.val:
            return []
        from .plots import comparison, save_png
        from .predict import predict_tiled

        best_path = self.out / ("best.pt" if (self.out / "best.pt").exists() else "last.pt")
        model, _ = checkpoint.load_model(best_path, self.device)
        folder = self.out / "overlays"
        folder.mkdir(exist_ok=True)
        paths = []
        for s in self.data.val[: self.cfg.overlays]:
            probs = predict_tiled(model, torch.from_numpy(s.image), tile=min(self.cfg.val_tile, 1024))
            path = folder / f"{s.name}.png"
            save_png(comparison(s.image, probs.argmax(0), s.target), path)
            paths.append(path)
        return paths

    def run(self) -> dict:
        cfg = self.cfg
        initialised_here = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            initialised_here = True
        try:
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return self._loop()
        finally:
            if initialised_here:
                dist.destroy_process_group()

    def _loop(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.start_epoch >= cfg.epochs:
            self.log(f"unetx train: {self.out} already has {self.start_epoch} of {cfg.epochs} epochs; "
                     "nothing to do (raise --epochs to train longer)")
        else:
            n_val = len(self.data.val)
            self.log(f"unetx train: {len(self.data.train)} training / {n_val} validation images, "
                     f"{self.data.table.num_classes} classes ({self.data.table.kind}: {self.data.table.values}), "
                     f"UNet {self.model.config}, {len(self.dataset)} patches of {cfg.crop}px per epoch, "
                     f"device {self.device}{f' x {self.world} processes' if self.world > 1 else ''}"
                     f"{', resuming after epoch ' + str(self.start_epoch) if self.start_epoch else ''}")
        for epoch in range(self.start_epoch, cfg.epochs):
            stats = self.train_epoch(epoch)
            if stats["steps"] == 0:  # the time ran out before this epoch's first step
                break
            final = self.out_of_time or epoch + 1 == cfg.epochs
            if self.data.val and ((epoch + 1) % cfg.val_every == 0 or final):
                t_val = time.perf_counter()
                stats.update(self.validate())
                self.est["val"] = time.perf_counter() - t_val
            score = stats.get("val_dice", -stats["train_loss"])
            if self.sched is not None:
                if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.sched.step(stats.get("val_loss", stats["train_loss"]))
                else:
                    self.sched.step()
            row = {"epoch": epoch + 1, "lr": self.opt.param_groups[0]["lr"], **stats}
            done = len(self.history.get("epoch", []))
            for key in row:
                self.history.setdefault(key, [math.nan] * done)  # a column first seen now (e.g. validation)
            for key, col in self.history.items():
                col.append(float(row.get(key, math.nan)))
            # with no validation images, a time-budget run's best weights are its last: its learning rate has
            # decayed to its end there, and the training loss of random augmented patches is too noisy to pick by
            improved = score > self.best["score"] or (self.budget is not None and not self.data.val)
            if improved:
                self.best = {"epoch": epoch + 1, "score": float(score)}
            t_save = time.perf_counter()
            self.save(epoch + 1, improved)
            self.est["save"] = time.perf_counter() - t_save
            val_txt = (f", val loss {stats['val_loss']:.4f}, val Dice {stats['val_dice']:.4f}" if "val_dice" in stats
                       else "")
            left = "" if self.budget is None else f", {format_duration(self.time_left())} left"
            self.log(f"epoch {epoch + 1}{'' if self.budget is not None else f'/{cfg.epochs}'}: train loss "
                     f"{stats['train_loss']:.4f}{val_txt}, {stats['images_per_s']:.1f} img/s, "
                     f"{stats['seconds']:.1f}s{left}{' *' if improved else ''}")
            if self.world > 1:
                dist.barrier()
            if self.out_of_time:
                break
        overlays = self.write_overlays()
        elapsed = time.perf_counter() - t_start
        best_txt = (f"best val Dice {self.best['score']:.4f} at epoch {self.best['epoch']}" if self.data.val
                    else f"best.pt = epoch {self.best['epoch']} (train loss {-self.best['score']:.4f}; no validation "
                    "images" + (", so the last epoch" if self.budget is not None else ", lowest train loss") + ")")
        epochs_done = int(self.history["epoch"][-1]) if self.history.get("epoch") else 0
        self.log(f"unetx train: done, {epochs_done} epochs ({elapsed:.0f}s this session"
                 + (f", budget {cfg.time}, {format_duration(self.spent_before + time.perf_counter() - self.started)}"
                    " used" if self.budget is not None else "") + f"), {best_txt}; "
                 f"checkpoints {self.out / 'best.pt'}, {self.out / 'last.pt'}; history {self.out / 'history.csv'}, "
                 f"curves {self.out / 'curves.png'}" + (f", overlays {self.out / 'overlays'}" if overlays else ""))
        return {"out": str(self.out), "epochs": epochs_done, "best_epoch": self.best["epoch"],
                "best_score": self.best["score"], "history": self.history, "seconds": elapsed,
                "best_checkpoint": str(self.out / "best.pt"), "last_checkpoint": str(self.out / "last.pt")}


def write_history(history: dict, out: Path) -> None:
    """history.csv (one row per epoch) and history.npy (a structured array with the same columns)."""
    keys = ["epoch"] + sorted(k for k in history if k != "epoch")
    rows = list(zip(*(history[k] for k in keys)))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in rows:
                w.writerow([int(v) if k == "epoch" else f"{v:.6g}" for k, v in zip(keys, r)])

    checkpoint.atomic_write(out / "history.csv", write_csv)
    arr = np.array(rows, dtype=[(k, np.int64 if k == "epoch" else np.float64) for k in keys])

    def write_npy(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, arr)

    checkpoint.atomic_write(out / "history.npy", write_npy)


def train(cfg: TrainConfig | None = None, **options) -> dict:
    """Train a UNet (see TrainConfig for the options) and return a summary dict (paths, best score, history)."""
    cfg = dataclasses.replace(cfg, **options) if cfg is not None else TrainConfig(**options)
    return Trainer(cfg).run()


def resume(run_dir: str | Path, **overrides) -> dict:
    """Continue the run in run_dir from its last checkpoint (overrides e.g. epochs=, device=, workers=)."""
    return Trainer.from_run_dir(run_dir, **overrides).run()
