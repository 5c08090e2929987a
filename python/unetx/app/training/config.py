"""Every training option (TrainConfig, checked before any work starts) and the error a stopped run raises."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..losses import LOSSES
from ..plan import parse_duration

SCHEDULES = ("cosine", "step", "plateau", "none")
AMP_MODES = ("auto", "on", "off")
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
    amp: str = "auto"  # auto (CUDA, or a CPU with native bfloat16) | on | off  (CPU: bfloat16)
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
        if self.amp not in AMP_MODES:
            raise InputError(f"--amp must be auto, on or off, got {self.amp!r}")
        for name in ("epochs", "batch_size", "crop", "base_channels", "depth", "val_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.crop < 2**self.depth:
            raise InputError(
                f"--crop {self.crop} is smaller than the network's downsampling factor 2**depth = "
                f"{2**self.depth}; use --crop {4 * 2**self.depth} or more, or a smaller --depth"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if (self.val_images is None) != (self.val_masks is None):
            raise InputError("give both --val-images and --val-masks, or neither")
        if self.val_images is not None and self.val_fraction > 0:
            raise InputError("give either validation folders or --val-fraction, not both")
        for name, ok, need in (
            ("lr", lambda v: v > 0, "a finite number > 0 (e.g. 1e-3)"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("elastic", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
            ("elastic_sigma", lambda v: v >= 0, ">= 0"),
            ("brightness", lambda v: v >= 0, ">= 0"),
            ("contrast", lambda v: v >= 0, ">= 0"),
            ("w0", lambda v: v >= 0, ">= 0"),
            ("sigma", lambda v: v > 0, "a positive number of pixels"),
        ):
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
            raise InputError(
                f"--val-tile {self.val_tile} is smaller than the network's downsampling factor "
                f"2**depth = {2**self.depth}"
            )
        if not self.images or not self.masks:
            raise InputError("--images and --masks are required (folders of training images and masks)")
        if self.time is not None:
            parse_duration(self.time)
