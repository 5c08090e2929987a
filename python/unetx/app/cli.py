"""The `unetx` command: train, predict, evaluate, demo (and bench). Every command wraps the Python API.

Bad input (missing or unreadable files, unpaired masks, impossible options, foreign checkpoints) is reported as one
message on stderr with exit status 2 before any work starts; a run stopped mid-way (e.g. by a NaN loss) exits 1
with its last good checkpoint kept.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import InputError

EXIT_BAD_INPUT = 2
OVERLAY_SIDE = 4096


# ---------------------------------------------------------------------------------------------- train
TRAIN_HELP = {
    "images": "folder of training images (PNG, JPEG, TIFF; multi-page TIFFs are stacks of slices)",
    "masks": "folder of masks, paired with the images by file stem",
    "out": "run folder for checkpoints, history, curves and overlays",
    "val_images": "folder of validation images",
    "val_masks": "folder of validation masks",
    "val_fraction": "hold out the last round(F*N) training images (name order) for validation",
    "mask_suffix": "mask stem = image stem + this (e.g. _mask)",
    "mask_mode": "auto | binary | labels | colour",
    "foreground": "binary masks: bright | dark value is foreground",
    "classes": "number of classes of label-map masks (default: largest value + 1)",
    "class_table": "JSON class table: list of grey values or [r,g,b] colours, or {kind, values, names}",
    "normalize": "image scaling: dtype (by bit depth) | percentile | standardize",
    "base_channels": "channels of the first level",
    "depth": "number of poolings",
    "pool": "avg | max",
    "upsample": "transpose | nearest | bilinear",
    "dropout": "dropout before the expanding path",
    "sync_bn": "batch statistics across processes (DDP)",
    "epochs": "total epochs",
    "batch_size": "patches per step",
    "crop": "training patch size (pixels)",
    "patches_per_image": "random patches per image per epoch",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "schedule": "learning-rate schedule: cosine | step | plateau | none",
    "loss": "ce+dice | ce | dice | bce | bce+dice | mse",
    "weight_map": "use the U-Net paper's border weight map",
    "w0": "weight map: border weight w0",
    "sigma": "weight map: border width sigma (pixels)",
    "augment": "augmentation (flips, rotations, elastic, intensity)",
    "elastic": "probability of elastic deformation",
    "elastic_sigma": "elastic displacement std (pixels)",
    "brightness": "brightness jitter",
    "contrast": "contrast jitter",
    "amp": "mixed precision: auto (CUDA, or a CPU with native bfloat16) | on | off",
    "channels_last": "channels-last memory format",
    "seed": "random seed (weights, patches, augmentation)",
    "workers": "DataLoader worker processes",
    "device": "auto | cpu | cuda | cuda:N",
    "val_every": "validate every N epochs",
    "val_tile": "validation images larger than this run by overlap-tile",
    "overlays": "validation overlay PNGs to write",
    "progress": "progress bars",
    "time": "time budget, e.g. 10m, 90s, 1h: the run (validation and checkpoints included) ends within it, the "
    "plan picks every option not given for it; with neither --time nor --epochs: 10m on a CPU, 30m on a GPU",
}
RESUME_OVERRIDES = ("epochs", "time", "device", "workers", "progress")


def _train_choices() -> dict:
    """Each option's allowed values, from the modules that define them."""
    from .data import MASK_MODES, NORMALIZATIONS, POLARITIES
    from .losses import LOSSES
    from .training import AMP_MODES, SCHEDULES

    return {
        "mask_mode": MASK_MODES,
        "foreground": POLARITIES,
        "normalize": NORMALIZATIONS,
        "pool": ("avg", "max"),
        "upsample": ("transpose", "nearest", "bilinear"),
        "schedule": SCHEDULES,
        "loss": LOSSES,
        "amp": AMP_MODES,
    }


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    choices = _train_choices()

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = TRAIN_HELP.get(f.name, "") + f" (default: {default})"
        # default None everywhere: only the options actually given are passed on (and checked against --resume)
        if isinstance(default, bool):
            if default:
                p.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=None, help=helptext
                )
            else:
                p.add_argument(flag, dest=f.name, action="store_true", default=None, help=helptext)
            continue
        kind = {"int": int, "float": float}.get(type(default).__name__, str)
        if f.name in ("classes", "patches_per_image"):
            kind = int
        p.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices.get(f.name), help=helptext)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (with --epochs to extend it)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .plan import process_age
    from .training import TrainConfig, Trainer

    # the --time budget counts from the command's start: Python's start-up, reading the data and planning included
    started = time.perf_counter() - process_age()

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "resume") and v is not None}
    if args.resume:
        extra = sorted(set(given) - set(RESUME_OVERRIDES))
        if extra:
            raise InputError(
                f"with --resume the run's own options are used; only "
                f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may be given "
                f"(got {', '.join('--' + k.replace('_', '-') for k in extra)})"
            )
        Trainer.from_run_dir(args.resume, started=started, **given).run()
        return 0
    Trainer(TrainConfig(**given), plan_given=set(given), started=started).run()
    return 0


# ---------------------------------------------------------------------------------------------- predict
def _check_output_dir(path: Path, option: str = "--output") -> Path:
    """An output folder that exists or can be made, checked before anything is read or written."""
    if path.exists() and not path.is_dir():
        raise InputError(f"the output folder {path} is a file; choose another {option}")
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not probe.is_dir():
        raise InputError(f"the output folder {path} cannot be made: {probe} is a file; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {probe} (for the output folder {path}); choose another {option}")
    return path


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt written by `unetx train`")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (default 512)")
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="context pixels on each side of a tile (default: the network's receptive margin, exact)",
    )
    p.add_argument(
        "--blend",
        choices=("crop", "gaussian"),
        default="crop",
        help="keep tile centres (crop) or blend overlapping centres with a Gaussian window",
    )
    p.add_argument("--tta", action="store_true", help="average over the 4 flips (test-time augmentation)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _check_model_options(args) -> None:
    """predict / evaluate options that need no file: checked before anything is read or written."""
    if args.tile < 1:
        raise InputError(f"--tile must be a positive number of pixels, got {args.tile}")
    if args.overlap is not None and args.overlap < 0:
        raise InputError(
            f"--overlap must be >= 0 pixels of context per side, got {args.overlap}; leave it out for "
            "the network's receptive margin"
        )
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive number of tiles, got {args.batch_size}")


def _load(args) -> tuple:
    from . import checkpoint
    from .predict import default_overlap, model_multiple
    from .training import resolve_device

    _check_model_options(args)
    device = resolve_device(args.device, 0)
    model, ckpt = checkpoint.load_model(args.checkpoint, device)
    overlap = default_overlap(model) if args.overlap is None else args.overlap
    m = model_multiple(model)
    need = 2 * (-(-overlap // m) * m) + m
    if args.tile < need:
        raise InputError(
            f"--tile {args.tile} is too small for this network (depth {model.config['depth']}) with "
            f"--overlap {overlap}: a tile needs at least {need} pixels; use --tile {max(need, 256)} "
            "or lower --overlap"
        )
    return model, ckpt, overlap


def _slices(pair):
    from .evaluate import slice_names

    for k, name in enumerate(slice_names(pair.name, pair.image.shape[0])):
        yield name, k


def cmd_predict(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .data import read_images
    from .plots import comparison, save_png
    from .predict import predict_classes

    out = _check_output_dir(Path(args.output))
    model, ckpt, overlap = _load(args)
    if args.amp:
        from .training import warn_if_bf16_emulated

        warn_if_bf16_emulated(next(model.parameters()).device)
    table = checkpoint.class_table(ckpt)
    pairs = read_images(args.input)
    in_ch = model.config["in_channels"]
    bad = [
        f"{p.image_path.name} has {p.image.shape[-1]} channels"
        for p in pairs
        if p.image.shape[-1] != in_ch and not (p.image.shape[-1] == 1 and in_ch == 3)
    ]
    if bad:
        raise InputError(f"the model takes {in_ch}-channel images: " + "; ".join(bad))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = 0
    for pair in pairs:
        for name, k in _slices(pair):
            classes, probs = predict_classes(
                model,
                pair.image[k],
                tile=args.tile,
                overlap=overlap,
                blend=args.blend,
                tta=args.tta,
                batch_size=args.batch_size,
                normalize=ckpt["normalize"],
                amp=args.amp,
                progress=args.progress,
                keep_probabilities=args.probabilities,
            )
            save_png(encode_mask(classes, table, args.mask_values), out / f"{name}_mask.png")
            if probs is not None:
                for c, plane in enumerate(probs):
                    if table.num_classes == 2 and c == 0:
                        continue  # the background probability is 255 minus the foreground's
                    save_png(plane, out / f"{name}_prob_{table.names[c]}.png")
            if args.overlays:
                from .data import image_to_chw

                # overlays are for looking at: large images are shown subsampled to at most OVERLAY_SIDE pixels
                step = max(1, -(-max(classes.shape) // OVERLAY_SIDE))
                img = image_to_chw(pair.image[k][::step, ::step], pair.image.shape[-1], ckpt["normalize"], name)
                save_png(comparison(img, classes[::step, ::step]), out / f"{name}_overlay.png")
            written += 1
    print(
        f"unetx predict: {written} image{'s' * (written != 1)} segmented in {time.perf_counter() - t0:.1f}s "
        f"(tile {args.tile}, overlap {overlap}, {args.blend}{', TTA' if args.tta else ''}); masks in {out}"
    )
    return 0


def encode_mask(classes: np.ndarray, table, mode: str) -> np.ndarray:
    """Class indices as written to a mask PNG: "auto" (binary: 0/255, else class indices), "index", or "original"
    (the training masks' own values or colours)."""
    if mode == "original":
        return table.decode(classes)
    if mode == "auto" and table.num_classes == 2:
        return (classes > 0).astype(np.uint8) * 255
    return classes.astype(np.uint8 if table.num_classes <= 256 else np.uint16)


# ---------------------------------------------------------------------------------------------- evaluate
def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    width = max(12, max(len(str(r["name"])) for r in rows))
    print(f"{'image':<{width}}  " + "  ".join(f"{k:>{max(len(k), 8)}}" for k in keys[1:]))
    for r in rows:
        print(f"{r['name']!s:<{width}}  " + "  ".join(f"{r[k]:>{max(len(k), 8)}.4f}" for k in keys[1:]))


def write_csv(rows: list[dict], path: Path) -> None:
    from .checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .evaluate import evaluate

    csv_path = Path(args.csv)
    if csv_path.is_dir():
        raise InputError(f"--csv {csv_path} is a folder; give a file name")
    if not csv_path.parent.exists():
        raise InputError(f"--csv {csv_path}: the folder {csv_path.parent} does not exist")
    model, ckpt, overlap = _load(args)
    table = checkpoint.class_table(ckpt)
    result = evaluate(
        model,
        args.images,
        args.masks,
        classes=table,
        normalize=ckpt["normalize"],
        mask_suffix=args.mask_suffix,
        tile=args.tile,
        overlap=overlap,
        blend=args.blend,
        tta=args.tta,
        batch_size=args.batch_size,
        amp=args.amp,
        progress=args.progress,
    )
    rows = result.rows
    mean, pooled = result.summary()
    print_table(rows + [mean, pooled])
    write_csv(rows + [mean, pooled], csv_path)
    print(f"unetx evaluate: {len(rows)} images; per-image table written to {csv_path}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
DEMO_MARKER = ".unetx-demo"


def cmd_demo(args: argparse.Namespace) -> int:
    from . import checkpoint, synthetic
    from .evaluate import evaluate
    from .plots import comparison, save_png
    from .predict import predict_classes
    from .training import TrainConfig, Trainer, resolve_device

    out = Path(args.out)
    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be a positive integer, got {args.epochs}")
    if not 0.0 < args.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be in 0..2**32-1, got {args.seed}")
    resolve_device(args.device, 0)
    if out.exists() and not out.is_dir():
        raise InputError(f"the demo output folder {out} is a file; choose another --out")
    _check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise InputError(f"{out} exists and was not made by `unetx demo`; choose another --out")
    quick = args.quick
    t0 = started = time.perf_counter()
    from .plan import parse_duration

    parse_duration(args.time, "--time")  # checked before anything is written
    if args.data is None:
        if out.exists():
            shutil.rmtree(out)  # a previous demo's own output (marked), replaced by this run
        out.mkdir(parents=True)
        (out / DEMO_MARKER).write_text("made by unetx demo; deleted by the next demo run into this folder\n")
        size = 64 if quick else 128
        paths = synthetic.write_dataset(
            out / "data",
            n_train=8 if quick else 24,
            n_val=2 if quick else 6,
            size=size,
            large=160 if quick else 640,
            seed=args.seed,
        )
        print(
            f"unetx demo: synthetic cell images written to {out / 'data'} "
            f"({'8' if quick else '24'} training, {'2' if quick else '6'} held-out, 1 large)"
        )
        cfg = TrainConfig(
            images=str(paths["train_images"]),
            masks=str(paths["train_masks"]),
            val_images=str(paths["val_images"]),
            val_masks=str(paths["val_masks"]),
            out=str(out / "run"),
            lr=3e-3,
            seed=args.seed,
            device=args.device,
            amp=args.amp,
            progress=not args.no_progress,
            elastic=0.3,
        )
        if quick:  # a wiring check: every size fixed and tiny, nothing to plan
            fixed = dict(base_channels=8, depth=3, epochs=args.epochs or 2, batch_size=8, crop=64, patches_per_image=2)
        else:  # the same planner as `unetx train`, for the demo's time budget (or its --epochs)
            fixed = {"epochs": args.epochs} if args.epochs else {}
            cfg.time = None if args.epochs else args.time
        cfg = dataclasses.replace(cfg, **fixed)
        large = [(paths["large_images"], paths["large_masks"])]
    else:
        data = Path(args.data)
        images, masks = _find_dataset(data)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / DEMO_MARKER).write_text("made by unetx demo; deleted by the next demo run into this folder\n")
        cfg = TrainConfig(
            images=str(images),
            masks=str(masks),
            val_fraction=args.val_fraction,
            out=str(out / "run"),
            foreground=args.foreground,
            lr=1e-3,
            seed=args.seed,
            device=args.device,
            amp=args.amp,
            progress=not args.no_progress,
        )
        if quick:
            fixed = dict(base_channels=8, depth=3, epochs=args.epochs or 1, batch_size=4, crop=128, patches_per_image=1)
        else:
            fixed = {"epochs": args.epochs} if args.epochs else {}
            cfg.time = None if args.epochs else args.time
        cfg = dataclasses.replace(cfg, **fixed)
        test_dir = data / "test" / "images"
        large = [(test_dir, None)] if test_dir.is_dir() else []
    trainer = Trainer(cfg, plan_given=set(fixed), started=started)
    summary = trainer.run()
    model, ckpt = checkpoint.load_model(summary["best_checkpoint"], trainer.device)
    table = checkpoint.class_table(ckpt)

    # Dice on the held-out images, by the same overlap-tile path `unetx predict` uses; one tile covers a held-out
    # image whole (the tile shrinks to the image plus its context)
    import torch

    from .metrics import foreground_mean

    val = trainer.data.val
    held_out = evaluate(
        model,
        [torch.from_numpy(s.image) for s in val],
        [s.target for s in val],
        classes=table,
        names=[s.name for s in val],
        tile=4096,
    )
    per_image = held_out.per_image_foreground_dice()

    pred_dir = out / "predictions"
    pred_dir.mkdir(exist_ok=True)
    large_lines = []
    from .data import image_to_chw, list_images, read_image

    for images_dir, masks_dir in large:
        for f in list_images(images_dir)[: 1 if quick else 2]:
            arr = read_image(f)[0]
            t1 = time.perf_counter()
            classes, _ = predict_classes(
                model, arr, tile=384 if model.config["depth"] <= 3 else 512, normalize=ckpt["normalize"]
            )
            dt = time.perf_counter() - t1
            save_png(
                comparison(image_to_chw(arr, arr.shape[-1], ckpt["normalize"], f.name), classes),
                pred_dir / f"{f.stem}_overlay.png",
            )
            save_png(encode_mask(classes, table, "auto"), pred_dir / f"{f.stem}_mask.png")
            line = f"{f.name} ({arr.shape[1]}x{arr.shape[0]}, overlap-tile {dt:.1f}s)"
            if masks_dir is not None:
                target = table.encode(read_image(masks_dir / f.name, mask=True)[0], f.name)
                from .metrics import dice

                line += f": Dice {foreground_mean(dice(classes, target, table.num_classes)):.4f}"
            large_lines.append(line)
    fg = held_out.foreground_dice()
    print()
    print(
        f"unetx demo: held-out Dice ({', '.join(table.names[1:]) or table.names[0]}) {fg:.4f} over all pixels of "
        f"{len(per_image)} images (per image {min(per_image):.4f}..{max(per_image):.4f})"
        + (" [>= 0.9: good]" if fg >= 0.9 else " [below 0.9]")
    )
    for c, name in enumerate(table.names):
        print(f"  class {c} {name}: Dice {held_out.dice()[c]:.4f}, IoU {held_out.iou()[c]:.4f}")
    for line in large_lines:
        print(f"  larger image {line}")
    print(f"  curves:      {out / 'run' / 'curves.png'}")
    print(f"  overlays:    {out / 'run' / 'overlays'} (validation), {pred_dir} (larger images)")
    print(f"  checkpoint:  {summary['best_checkpoint']}")
    print(f"  total time:  {time.perf_counter() - t0:.0f}s")
    return 0


def _find_dataset(data: Path) -> tuple[Path, Path]:
    if not data.is_dir():
        raise InputError(f"--data {data} is not a folder")
    for images, masks in ((data / "train" / "images", data / "train" / "masks"), (data / "images", data / "masks")):
        if images.is_dir() and masks.is_dir():
            return images, masks
    raise InputError(f"--data {data}: expected train/images + train/masks or images/ + masks/ inside")


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="unetx", description="U-Net segmentation on fused kernels.")
    parser.add_argument("--version", action="version", version=f"unetx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train on folders of images and masks (torchrun for multiple processes)", argument_default=None
    )
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment images of any size by overlap-tile")
    _model_options(p)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for the masks, probabilities and overlays")
    p.add_argument("--probabilities", action="store_true", help="also write per-class probability PNGs (0..255)")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="do not write overlay PNGs")
    p.add_argument(
        "--mask-values",
        choices=("auto", "index", "original"),
        default="auto",
        help="mask PNG values: auto (binary 0/255, else class index), index, original (training values)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="per-image and mean Dice/IoU per class against masks")
    _model_options(p)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--mask-suffix", default="")
    p.add_argument("--csv", default="evaluation.csv", help="per-image CSV (default: evaluation.csv)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train on synthetic cells (or --data DIR) and show the result")
    p.add_argument(
        "--data", default=None, help="a dataset folder (train/images + train/masks) instead of synthetic data"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--time", default="90s", help="training time budget, planned as by `unetx train --time` (default 90s)"
    )
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of a time budget")
    p.add_argument("--val-fraction", type=float, default=1 / 6, help="with --data: held-out fraction (default 1/6)")
    p.add_argument(
        "--foreground",
        choices=("bright", "dark"),
        default="bright",
        help="with --data: binary mask polarity (ISBI membranes: dark)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        choices=_train_choices()["amp"],
        default="auto",
        help="mixed precision, as `unetx train --amp` (default auto: CUDA, or a CPU with native bfloat16)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny version (seconds), for tests")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="benchmarks (forwarded to unetx.bench)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..allocator import keep_freed_memory

    try:
        keep_freed_memory()  # every command allocates activation-sized tensors step after step (see allocator.py)
    except ValueError as e:
        print(f"unetx: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if argv and argv[0] == "bench":
        try:
            from .. import bench
        except ModuleNotFoundError as e:
            if e.name != "unetx.bench":
                raise
            print("unetx bench: this installation has no unetx.bench module", file=sys.stderr)
            return EXIT_BAD_INPUT
        return int(bench.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .training import TrainingError

    try:
        return args.func(args)
    except InputError as e:
        print(f"unetx {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as e:
        print(f"unetx {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unetx {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the system refused a read or write (permissions, disk full, ...): not unetx's bug
        print(
            f"unetx {args.command}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
            file=sys.stderr,
        )
        return 1
    except Exception as e:
        if os.environ.get("UNETX_TRACEBACK"):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = (str(e).strip().splitlines() or [""])[0][:300]
        print(
            f"unetx {args.command}: internal error: {type(e).__name__}{': ' + text if text else ''} (at "
            f"{Path(where.filename).name}:{where.lineno}); this is a bug in unetx, please report it with the "
            "command line (UNETX_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
