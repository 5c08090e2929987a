"""Reading image and mask files (PNG, JPEG, BMP through Pillow; TIFF stacks through tifffile) into arrays,
and image values into float32. Pillow and tifffile load here, only when the application reads a file."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
NORMALIZATIONS = ("dtype", "percentile", "standardize")


@contextlib.contextmanager
def _large_images_allowed():
    # Pillow refuses images over ~89 Mpx as a decompression-bomb guard; unetx exists to segment huge images the
    # user chose to give it, so the guard is lifted for our own reads only.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_image(path: str | Path, mask: bool = False) -> np.ndarray:
    """The file's pixels as a (slices, H, W, C) array in the file's own dtype.

    C is 1 (grey) or 3 (RGB; alpha is dropped). Multi-page TIFFs give one slice per page (every non-spatial,
    non-channel axis is flattened into slices). For `mask=True` a palette PNG gives its palette indices (as in
    Pascal VOC) instead of colours.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(path)
        else:
            arr = _read_pillow(path, mask)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"cannot read {path}: {type(e).__name__}: {e} (the file is corrupt, truncated or not an image)"
        ) from None
    if arr.size == 0:
        raise InputError(f"{path} holds an empty image (shape {arr.shape})")
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():  # NaN/Inf would make the whole batch's statistics NaN (training) or the prediction garbage
            s, y, x, _ = (int(i) for i in np.argwhere(bad)[0])
            where = f"row {y}, column {x}" + (f" of slice {s}" if arr.shape[0] > 1 else "")
            raise InputError(
                f"{path} holds {int(bad.sum())} non-finite pixel value{'s' * (int(bad.sum()) > 1)} "
                f"(NaN or Inf), the first at {where}; replace them (e.g. with 0) in the file"
            )
    return arr


def _read_pillow(path: Path, mask: bool) -> np.ndarray:
    with _large_images_allowed(), Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode == "P":
            img = img if mask else img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in ("1", "LA", "La"):
            img = img.convert("L")
        elif mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif mode.startswith("I;16"):
            img = img.convert("I;16") if mode != "I;16" else img
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.int32 and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # Pillow opens some 16-bit PNGs as 32-bit "I"
    return arr[None]


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
    if arr.ndim != len(axes):  # tifffile squeezes length-1 axes from the data but not always from axes
        axes = axes[-arr.ndim :]
    channel = next((i for i, a in enumerate(axes) if a in "SC" and arr.shape[i] in (1, 2, 3, 4)), None)
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"cannot read {path}: TIFF axes {axes!r} have no Y and X")
    order = [i for i, a in enumerate(axes) if i != channel and a not in "YX"]
    order += [axes.index("Y"), axes.index("X")]
    if channel is not None:
        order.append(channel)
    arr = np.transpose(arr, order)
    if channel is None:
        arr = arr[..., None]
    arr = arr.reshape((-1,) + arr.shape[-3:])
    if arr.shape[-1] == 2:
        arr = arr[..., :1]  # grey + alpha
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return arr


def to_float(arr: np.ndarray, normalize: str = "dtype") -> np.ndarray:
    """Image values as float32 (same shape).

    "dtype": integers divided by their type's maximum (uint8 /255, uint16 /65535), floats kept;
    "percentile": the 1st..99th percentile mapped to 0..1 (for 12-bit data in 16-bit files, dim microscopy);
    "standardize": zero mean, unit standard deviation per image.
    """
    if normalize not in NORMALIZATIONS:
        raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "percentile":
        x = arr.astype(np.float32)
        lo, hi = np.percentile(x, [1, 99])
        return (x - lo) / max(float(hi - lo), 1e-6)
    if normalize == "standardize":
        x = arr.astype(np.float32)
        return (x - x.mean()) / max(float(x.std()), 1e-6)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        top = 65535.0 if arr.dtype == np.int32 else float(info.max)
        return arr.astype(np.float32) / top
    return arr.astype(np.float32)


def list_images(folder: str | Path, what: str = "images") -> list[Path]:
    """Image files (by suffix) directly in `folder`, sorted by name; an InputError when there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"the {what} folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"the {what} folder {folder} is a file, not a folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise InputError(f"the {what} folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files
