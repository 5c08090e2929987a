"""A run's setup, before its first step: processes and device, the run folder, the data, the model, the optimiser's
schedule and precision, the loader of training patches, and the state a resumed run restores."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import (
    LOSSY_SUFFIXES,
    Augment,
    ClassTable,
    PatchDataset,
    Sample,
    balancing_weights,
    class_frequencies,
    default_patches_per_image,
    image_channels,
    infer_class_table,
    load_samples,
    pair_files,
    unet_weight_map,
)
from ..errors import InputError
from ..losses import num_output_channels
from .config import RUN_FILES, TrainConfig


@dataclass
class RunData:
    train: list[Sample]
    val: list[Sample]
    table: ClassTable
    channels: int
    class_weights: list[float] | None = None


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int) -> torch.device:
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
        raise InputError(
            f"{out} already holds a run (last.pt); continue it with `unetx train --resume {out}` or "
            "choose another --out (nothing was overwritten)"
        )
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
            table = infer_class_table(
                [p.mask for p in both],
                cfg.mask_mode,
                cfg.foreground,
                cfg.classes,
                names=[p.mask_path.name for p in both],
                lossy=[p.mask_path.suffix.lower() in LOSSY_SUFFIXES for p in both],
            )
    if cfg.classes is not None and table.num_classes != cfg.classes:
        raise InputError(
            f"--classes {cfg.classes} but the masks / class table have {table.num_classes} classes ({table.values})"
        )
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
        for s in samples + val:
            s.weight = unet_weight_map(s.target, class_weights, cfg.w0, cfg.sigma)
    return RunData(samples, val, table, channels, class_weights)


def build_model(cfg: TrainConfig, data: RunData, resume_ckpt: dict | None = None) -> nn.Module:
    """The UNet the options describe; with resume_ckpt, holding that checkpoint's weights."""
    from ...nn import UNet

    try:
        out_ch = num_output_channels(cfg.loss, data.table.num_classes)
        model = UNet(
            in_channels=data.channels,
            out_channels=out_ch,
            base_channels=cfg.base_channels,
            depth=cfg.depth,
            pool=cfg.pool,
            upsample=cfg.upsample,
            dropout=cfg.dropout,
            sync_bn=cfg.sync_bn,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    if resume_ckpt is not None:
        if resume_ckpt["config"] != model.config:
            raise InputError(f"the checkpoint's model {resume_ckpt['config']} differs from the options' {model.config}")
        model.load_state_dict(resume_ckpt["state_dict"])
    return model


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Adam:
    """Adam (the study note's optimiser), fused where torch has a fused kernel for the parameters' device (CPU, CUDA):
    one kernel per step over every parameter instead of about ten ATen ops per parameter tensor. On the CPU that is
    most of an optimiser step (BENCHMARKS.md, "Fused Adam", fifth round). Same algorithm, the same state_dict."""
    params = list(params)  # a generator would be spent by a first attempt that fails
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused Adam kernel
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16), where bf16 convolutions run faster than
    float32; elsewhere oneDNN emulates them (AVX-512 without BF16) or falls back to slow reference code (AVX2)."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp: `on` always mixes precision, `auto` where it is native and faster (a CUDA GPU, or
    a CPU with native bfloat16), `off` never."""
    if cfg.amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if cfg.amp == "auto":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        warn_if_bf16_emulated(device)
        return torch.bfloat16
    return None


def warn_if_bf16_emulated(device: torch.device) -> None:
    """bfloat16 autocast on a CPU without native bfloat16 (AVX512-BF16 / AMX) runs emulated convolutions, slower than
    float32 for unetx and stock PyTorch alike (BENCHMARKS.md, ninth round, AVX2: unetx 1.18x, stock 12x), and the
    first step on the machine measures ATen's emulated convolutions once per layer shape (then kept in the choice
    cache, unetx/ops/algo_choice.py)."""
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "--amp on the CPU: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bfloat16 "
            "convolutions are emulated and slower than float32 (and the first step on this machine, which times "
            "them, is slow); "
            "use float32 here (train --amp off or auto; predict without --amp)",
            stacklevel=3,
        )


def restore_state(
    ckpt: dict, cfg: TrainConfig, opt: torch.optim.Optimizer, sched, scaler, best: dict
) -> tuple[dict[str, list], dict, int]:
    """A resumed run's optimizer, scheduler and scaler state (loaded in place); returns its history, best epoch and
    the number of epochs done."""
    # the implementation (fused or not) is this process's choice, not the checkpoint's: load_state_dict takes every
    # group setting from the saved groups, and a fused optimiser stepped as an unfused one rejects a GradScaler's
    # arguments
    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict(ckpt["optimizer"])
    for g, flags in zip(opt.param_groups, impl):
        g.update(flags)
    if sched is not None and ckpt.get("scheduler"):
        sched.load_state_dict(ckpt["scheduler"])
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            sched.T_max = cfg.epochs  # a resumed run may have been given more epochs
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    history = {k: list(v) for k, v in ckpt.get("history", {}).items()}
    return history, dict(ckpt.get("best", best)), int(ckpt["epoch"])


def make_loader(cfg: TrainConfig, data: RunData, world: int, rank: int, device: torch.device):
    """(dataset, sampler, loader) of the training patches; each process gets its share of every epoch."""
    ppi = cfg.patches_per_image or default_patches_per_image(data.train, cfg.crop)
    aug = (
        Augment(elastic=cfg.elastic, elastic_sigma=cfg.elastic_sigma, brightness=cfg.brightness, contrast=cfg.contrast)
        if cfg.augment
        else None
    )
    dataset = PatchDataset(data.train, cfg.crop, aug, ppi, cfg.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda"
    )
    return dataset, sampler, loader


def prepare_run_dir(out: Path, plan) -> None:
    """Make the run folder, drop temporary files of a run killed while writing them, record the plan."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if plan is not None:
        plan.write(out / "plan.json")
