"""Training curves (matplotlib, no display needed) and segmentation overlays (numpy + pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .checkpoint import atomic_write

# class 0 (background) is left uncoloured; the rest cycle through distinguishable colours
PALETTE = np.array(
    [
        (0, 0, 0),
        (255, 48, 48),
        (48, 200, 255),
        (255, 210, 0),
        (120, 255, 80),
        (200, 80, 255),
        (255, 140, 0),
        (0, 255, 180),
        (255, 100, 200),
        (150, 150, 255),
    ],
    dtype=np.float32,
)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8/uint16 (H, W) or (H, W, 3) array as a PNG, atomically."""
    path = Path(path)
    img = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def display_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float image -> (H, W, 3) uint8 for display, contrast-stretched to its 0.5..99.5 percentiles."""
    img = np.asarray(image, dtype=np.float32)
    img = img[:3] if img.shape[0] >= 3 else np.repeat(img[:1], 3, axis=0)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1)
    return (np.moveaxis(img, 0, -1) * 255).astype(np.uint8)


def _boundaries(classes: np.ndarray) -> np.ndarray:
    c = classes
    edge = np.zeros(c.shape, dtype=bool)
    edge[:-1] |= c[:-1] != c[1:]
    edge[1:] |= c[:-1] != c[1:]
    edge[:, :-1] |= c[:, :-1] != c[:, 1:]
    edge[:, 1:] |= c[:, :-1] != c[:, 1:]
    return edge


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image with each non-background class tinted in its colour and class boundaries drawn: (H, W, 3) uint8."""
    rgb = display_rgb(image).astype(np.float32)
    colours = PALETTE[1 + (np.arange(int(classes.max(initial=0)) + 1) - 1) % (len(PALETTE) - 1)]
    colours[0] = 0
    tint = colours[classes]
    fg = (classes > 0)[..., None]
    out = np.where(fg, (1 - alpha) * rgb + alpha * tint, rgb)
    out[_boundaries(classes)] = tint[_boundaries(classes)] if classes.max(initial=0) > 0 else out[_boundaries(classes)]
    return np.clip(out, 0, 255).astype(np.uint8)


def comparison(image: np.ndarray, predicted: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Side by side: image | prediction overlay [| ground-truth overlay], separated by a 4-pixel white bar."""
    panels = [display_rgb(image), overlay(image, predicted)]
    if target is not None:
        panels.append(overlay(image, target))
    bar = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [bar, p]
    return np.concatenate(out, axis=1)


def save_curves(history: dict, path: str | Path, class_names: list[str] | None = None) -> None:
    """Loss (train, validation) and per-class validation Dice/IoU against epoch, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = history.get("epoch", [])
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        vals = np.asarray(history.get(key, []), dtype=np.float64)
        if len(vals) and np.isfinite(vals).any():
            ax1.plot(epochs, vals, marker="o", ms=3, label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    for key in sorted(history):
        if key.startswith(("val_dice_", "val_iou_")):
            vals = np.asarray(history[key], dtype=np.float64)
            if np.isfinite(vals).any():
                ax2.plot(
                    epochs, vals, marker="o", ms=3, ls="-" if "dice" in key else "--", label=key.removeprefix("val_")
                )
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation Dice / IoU per class")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
