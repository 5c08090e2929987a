"""What a run writes after each epoch and at its end: the checkpoints (best before last), history.csv and
history.npy, curves.png, and the validation overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from .config import TrainingError


def save_epoch(out: Path, ckpt: dict, best: bool, history: dict, kept: str) -> None:
    """Write last.pt (and best.pt when this epoch is the best), the history and the curves."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        # best before last: whenever last.pt exists, the best.pt it records exists too (a kill between the two
        # writes leaves a newer best.pt, which the resumed run recomputes identically)
        if best:
            checkpoint.write(out / "best.pt", ckpt)
        checkpoint.write(out / "last.pt", ckpt)
    except ValueError as e:
        raise TrainingError(f"{e}; {kept}. Lower --lr, or try --amp off") from None
    write_history(history, out)
    from ..plots import save_curves

    save_curves(history, out / "curves.png")


def write_overlays(out: Path, samples, device: torch.device, tile: int) -> list[Path]:
    """The samples beside their predicted (best weights) and true masks, in out/overlays/."""
    from ..plots import comparison, save_png
    from ..predict import predict_tiled

    best_path = out / ("best.pt" if (out / "best.pt").exists() else "last.pt")
    model, _ = checkpoint.load_model(best_path, device)
    folder = out / "overlays"
    folder.mkdir(exist_ok=True)
    paths = []
    for s in samples:
        probs = predict_tiled(model, torch.from_numpy(s.image), tile=tile)
        path = folder / f"{s.name}.png"
        save_png(comparison(s.image, probs.argmax(0), s.target), path)
        paths.append(path)
    return paths


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
