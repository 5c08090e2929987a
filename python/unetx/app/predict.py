"""Overlap-tile prediction (Ronneberger et al. 2015, fig. 2) for images of any size.

    probs = unetx.predict_tiled(model, image, tile=512, overlap=None)      # (K, H, W) class probabilities
    for y0, strip in unetx.predict.predict_strips(model, image): ...      # row strips, for huge images

The image is cut into tiles of `tile` x `tile` pixels. Each tile's outer `overlap` pixels on every side are context
only: the network sees them, their outputs are discarded. Where a tile reaches past the image edge, the context is
the mirrored image. The kept centres ("cores") either abut ("crop") or overlap and are averaged with a Gaussian
window ("gaussian"). With `overlap` at least the network's receptive margin (`unetx.nn.common.receptive_margin`,
the default) every kept output pixel saw all of its context, so the tiled result equals a whole-image prediction
away from the image border, and no seam can show; smaller overlaps trade that for speed, and Gaussian blending
hides the seams they make.

Tiles start on multiples of 2**depth, so the network's pooling grid lines up across tiles. The image is processed
one row of tiles at a time and only the rows still being blended are held as probabilities: memory is
O(tile x width), not O(height x width x classes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .data import to_float
from .errors import InputError
from .losses import probabilities


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go: core starts `ys` x `xs` (image coordinates); each tile's input is its core grown by
    `overlap` on every side (`tile` pixels in all); `core` x `core` outputs of each are kept."""

    height: int
    width: int
    tile: int
    overlap: int
    core: int
    stride: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    blend: str

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)


def model_multiple(model: nn.Module) -> int:
    cfg = getattr(model, "config", None) or {}
    return 2 ** int(cfg.get("depth", 0))


def default_overlap(model: nn.Module) -> int:
    """The network's receptive margin (context pixels that can change an output pixel), from its config."""
    from ..nn.common import receptive_margin

    cfg = getattr(model, "config", None) or {}
    if "depth" not in cfg:
        raise ValueError("predict_tiled: the model has no .config['depth']; pass overlap= (context pixels per side)")
    return receptive_margin(int(cfg["depth"]))


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1, blend: str = "crop") -> TilePlan:
    """Tile positions for an image; `overlap` is rounded up and `tile` down to multiples of `multiple`, and a tile
    larger than the image needs shrinks to what covers it (less wasted work on small images)."""
    if blend not in ("crop", "gaussian"):
        raise InputError(f"blend must be 'crop' or 'gaussian', got {blend!r}")
    if overlap < 0:
        raise InputError(f"overlap must be >= 0 pixels, got {overlap}")
    m = max(1, int(multiple))
    overlap = -(-int(overlap) // m) * m
    need = 2 * overlap + m
    if tile < need:
        raise InputError(
            f"tile {tile} is too small: with {overlap} pixels of context on each side (overlap) and "
            f"a network that pools to 1/{m}, a tile needs at least {need} pixels; "
            f"use --tile {max(need, 2 * need)} or a smaller --overlap"
        )
    longest = max(height, width)
    tile = min(tile // m * m, -(-(longest + 2 * overlap) // m) * m)
    core = tile - 2 * overlap
    # gaussian: neighbouring cores overlap by half, so every pixel is blended from at least two tiles inside the image
    stride = core if blend == "crop" else max(m, core // 2 // m * m)

    def starts(n: int) -> tuple[int, ...]:
        count = max(1, math.ceil((n - core) / stride) + 1) if n > core else 1
        return tuple(i * stride for i in range(count))

    return TilePlan(height, width, tile, overlap, core, stride, starts(height), starts(width), blend)


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror (reflect, edge not repeated) indices outside [0, n) back inside, repeatedly for far-out ones."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _window(plan: TilePlan) -> np.ndarray:
    """Per-pixel blending weight of a tile: 0 on the context border, 1 (crop) or a Gaussian (gaussian) on the core."""
    w1 = np.zeros(plan.tile, dtype=np.float64)
    if plan.blend == "crop":
        w1[plan.overlap : plan.overlap + plan.core] = 1.0
    else:
        c = np.arange(plan.core) - (plan.core - 1) / 2
        sigma = plan.core / 4
        # floored so pixels covered by one tile only (near the image edge) keep a usable weight
        w1[plan.overlap : plan.overlap + plan.core] = np.maximum(np.exp(-(c**2) / (2 * sigma**2)), 1e-3)
    return np.outer(w1, w1).astype(np.float32)


def _as_image(image) -> tuple[np.ndarray | Tensor, bool]:
    """(array with channels last (H, W, C), is_float_tensor). Tensors are (C, H, W) floats; arrays (H, W[, C])."""
    if isinstance(image, Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"predict_tiled: a tensor image must be float (C, H, W), got {tuple(t.shape)} {t.dtype}")
        return t.permute(1, 2, 0), True
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"predict_tiled: an array image must be (H, W) or (H, W, C), got shape {arr.shape}")
    return arr, False


@torch.inference_mode()
def predict_strips(
    model: nn.Module,
    image,
    tile: int = 512,
    overlap: int | None = None,
    blend: str = "crop",
    tta: bool = False,
    batch_size: int = 4,
    normalize: str = "dtype",
    output: str = "probabilities",
    amp: bool = False,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, (K, rows, W) float32 strip) from top to bottom, covering the image once.

    image: a float tensor (C, H, W) used as is, or a numpy array (H, W) / (H, W, C) as read from a file, converted
    tile by tile with `normalize` (see unetx.data.to_float) so a huge uint8 image is never copied whole to float.
    tta: average over the 4 flips of each tile. output: "probabilities" or "logits" (blended as such).
    """
    if output not in ("probabilities", "logits"):
        raise ValueError(f"output must be 'probabilities' or 'logits', got {output!r}")
    img, is_tensor = _as_image(image)
    h, w, c = img.shape
    in_ch = (getattr(model, "config", None) or {}).get("in_channels", c)
    if c != in_ch and not (c == 1 and in_ch > 1):
        raise InputError(f"the image has {c} channels but the model takes {in_ch}")
    overlap = default_overlap(model) if overlap is None else int(overlap)
    plan = plan_tiles(h, w, int(tile), overlap, model_multiple(model), blend)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    window = _window(plan)
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.num_tiles, unit="tile", disable=not progress, leave=False)
        carry: np.ndarray | None = None  # blended sums (K+1 planes: classes, weight) of rows not yet final
        for row, y in enumerate(plan.ys):
            y_end = min(y + plan.core, h)
            band = None
            rows = _reflect_index(np.arange(y - plan.overlap, y - plan.overlap + plan.tile), h)
            tiles = []
            for x in plan.xs:
                cols = _reflect_index(np.arange(x - plan.overlap, x - plan.overlap + plan.tile), w)
                tiles.append((x, rows, cols))
            for i in range(0, len(tiles), batch_size):
                chunk = tiles[i : i + batch_size]
                batch = torch.stack([_tile_tensor(img, r, cc, is_tensor, normalize, in_ch) for _, r, cc in chunk])
                out = _run(model, batch.to(device), tta, amp, output).cpu().numpy()
                if band is None:
                    band = np.zeros((out.shape[1] + 1, y_end - y, w), dtype=np.float32)
                for (x, _, _), o in zip(chunk, out):
                    x_end = min(x + plan.core, w)
                    sl = (slice(plan.overlap, plan.overlap + y_end - y), slice(plan.overlap, plan.overlap + x_end - x))
                    wt = window[sl]
                    band[:-1, :, x:x_end] += o[:, sl[0], sl[1]] * wt
                    band[-1, :, x:x_end] += wt
                bar.update(len(chunk))
            if carry is not None:
                band[:, : carry.shape[1]] += carry
            next_y = plan.ys[row + 1] if row + 1 < len(plan.ys) else h
            done = min(next_y, y_end) - y
            yield y, band[:-1, :done] / band[-1:, :done]
            carry = band[:, done:] if done < band.shape[1] else None
        bar.close()
    finally:
        model.train(was_training)


def _tile_tensor(img, rows: np.ndarray, cols: np.ndarray, is_tensor: bool, normalize: str, in_ch: int) -> Tensor:
    if is_tensor:
        t = img[torch.as_tensor(rows)][:, torch.as_tensor(cols)].permute(2, 0, 1).float()
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(to_float(img[np.ix_(rows, cols)], normalize), -1, 0)))
    if t.shape[0] != in_ch:
        t = t.expand(in_ch, -1, -1)
    return t.contiguous()


def _run(model: nn.Module, x: Tensor, tta: bool, amp: bool, output: str) -> Tensor:
    def once(inp: Tensor) -> Tensor:
        if amp:
            dt = torch.bfloat16 if inp.device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast(inp.device.type, dtype=dt):
                out = model(inp)
        else:
            out = model(inp)
        return probabilities(out) if output == "probabilities" else out.float()

    if not tta:
        return once(x)
    acc = None
    for dims in ((), (3,), (2,), (2, 3)):
        y = once(x.flip(dims) if dims else x)
        y = y.flip(dims) if dims else y
        acc = y if acc is None else acc + y
    return acc / 4


def predict_tiled(
    model: nn.Module,
    image,
    tile: int = 512,
    overlap: int | None = None,
    blend: str = "crop",
    tta: bool = False,
    batch_size: int = 4,
    normalize: str = "dtype",
    output: str = "probabilities",
    amp: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """The whole image's (K, H, W) float32 probabilities (or logits) by overlap-tile; see `predict_strips`.

    For a binary sigmoid model K is 2 (background, foreground). The model is run in eval mode and left in the
    mode it was in.
    """
    img, _ = _as_image(image)
    result = None
    for y, strip in predict_strips(
        model,
        image,
        tile=tile,
        overlap=overlap,
        blend=blend,
        tta=tta,
        batch_size=batch_size,
        normalize=normalize,
        output=output,
        amp=amp,
        progress=progress,
    ):
        if result is None:
            result = np.empty((strip.shape[0], img.shape[0], img.shape[1]), dtype=np.float32)
        result[:, y : y + strip.shape[1]] = strip
    return result


def predict_classes(model: nn.Module, image, **kw) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """(H, W) class-index map (uint8 for up to 256 classes) by overlap-tile, computed strip by strip.

    With keep_probabilities=True also the per-class probabilities as uint8 (0..255) planes."""
    keep = kw.pop("keep_probabilities", False)
    img, _ = _as_image(image)
    h, w = img.shape[:2]
    classes = None
    probs = None
    for y, strip in predict_strips(model, image, **kw):
        if classes is None:
            classes = np.empty((h, w), dtype=np.uint8 if strip.shape[0] <= 256 else np.int16)
            probs = [np.empty((h, w), dtype=np.uint8) for _ in range(strip.shape[0])] if keep else None
        classes[y : y + strip.shape[1]] = strip.argmax(0)
        if keep:
            for k, plane in enumerate(probs):
                plane[y : y + strip.shape[1]] = np.clip(np.rint(strip[k] * 255), 0, 255).astype(np.uint8)
    return classes, probs
