"""Reading images and masks, pairing them, turning masks into class maps, training patches and augmentation.

    pairs = unetx.data.pair_files("train/images", "train/masks")        # every problem reported at once
    table = unetx.data.infer_class_table([p.mask for p in pairs])       # or ClassTable.binary(...)/labels(...)
    samples = unetx.data.load_samples(pairs, table)                     # one Sample per image (or stack slice)
    ds = unetx.data.PatchDataset(samples, crop=256, augment=unetx.data.Augment())

Images: PNG, JPEG, BMP (pillow) and TIFF (tifffile), 8/16-bit or float, grey or RGB; a multi-page TIFF is a stack of
slices, each a sample. Masks: binary (any two values), integer label maps, or colour-coded with a class table.
All errors about the user's files are `InputError`s naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
NORMALIZATIONS = ("dtype", "percentile", "standardize")
MAX_CLASSES = 64  # a "mask" with more distinct values than this is almost surely an image
LOSSY_SEPARATION = 32  # grey levels between two class values of a JPEG mask (see _lossy_grey_values)


class InputError(ValueError):
    """Bad user input (files, folders, options, checkpoints). The CLI prints the message and exits with status 2."""


# ---------------------------------------------------------------------------------------------- reading files
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
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem; say which file
        raise InputError(f"cannot read {path}: {type(e).__name__}: {e} (the file is corrupt, truncated or not an image)") from None
    if arr.size == 0:
        raise InputError(f"{path} holds an empty image (shape {arr.shape})")
    if arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():  # NaN/Inf would make the whole batch's statistics NaN (training) or the prediction garbage
            s, y, x, _ = (int(i) for i in np.argwhere(bad)[0])
            where = f"row {y}, column {x}" + (f" of slice {s}" if arr.shape[0] > 1 else "")
            raise InputError(f"{path} holds {int(bad.sum())} non-finite pixel value{'s' * (int(bad.sum()) > 1)} "
                             f"(NaN or Inf), the first at {where}; replace them (e.g. with 0) in the file")
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
        axes = axes[-arr.ndim:]
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
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise InputError(f"the {what} folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


# ---------------------------------------------------------------------------------------------- classes
@dataclass
class ClassTable:
    """How mask pixel values map to classes. Class i is written as `values[i]` in the mask files.

    kind "binary": two grey values, class 0 background, class 1 foreground (which value is foreground is the
    polarity option); "labels": grey value k is class k; "colour": `values` are RGB triples.
    """

    kind: str
    values: list
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in ("binary", "labels", "colour"):
            raise InputError(f"class table kind must be binary, labels or colour, got {self.kind!r}")
        self.values = [tuple(int(c) for c in v) if isinstance(v, (list, tuple)) else int(v) for v in self.values]
        if len(self.values) < 2:
            raise InputError(f"a class table needs at least 2 classes, got values {self.values}")
        if len(set(self.values)) != len(self.values):
            raise InputError(f"class table values repeat: {self.values}")
        if self.kind == "colour" and not all(isinstance(v, tuple) and len(v) == 3 for v in self.values):
            raise InputError(f"a colour class table needs (r, g, b) triples, got {self.values}")
        if self.kind != "colour" and not all(isinstance(v, int) for v in self.values):
            raise InputError(f"a {self.kind} class table needs integer grey values, got {self.values}")
        if not self.names:
            self.names = (["background", "foreground"] if self.kind == "binary"
                          else [f"class{i}" for i in range(len(self.values))])
        if len(self.names) != len(self.values):
            raise InputError(f"class table has {len(self.values)} values but {len(self.names)} names")

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @classmethod
    def binary(cls, background: int = 0, foreground: int = 255) -> "ClassTable":
        return cls("binary", [background, foreground])

    @classmethod
    def labels(cls, num_classes: int) -> "ClassTable":
        return cls("labels", list(range(num_classes)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": [list(v) if isinstance(v, tuple) else v for v in self.values],
                "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassTable":
        return cls(d["kind"], list(d["values"]), list(d.get("names") or []))

    @classmethod
    def from_json(cls, path: str | Path) -> "ClassTable":
        """A JSON class table: {"kind": "colour", "values": [[0,0,0],[255,0,0]], "names": [...]}, or a bare list
        of values (colour triples or grey values; grey values 0..K-1 make a label table)."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the class table {path}: {e}") from None
        if isinstance(d, list):
            if all(isinstance(v, list) for v in d):
                d = {"kind": "colour", "values": d}
            else:
                d = {"kind": "labels" if d == list(range(len(d))) else "binary" if len(d) == 2 else "labels",
                     "values": d}
        if not isinstance(d, dict) or "values" not in d:
            raise InputError(f"class table {path}: expected a list of values or an object with 'values'")
        if d.get("kind") == "labels" and d["values"] != list(range(len(d["values"]))):
            raise InputError(f"class table {path}: a labels table must list 0..K-1; use kind 'binary' or remap")
        return cls(d.get("kind", "labels"), d["values"], d.get("names") or [])

    def _keys(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel keys and table keys in one integer space (RGB packed into one int)."""
        if self.kind == "colour":
            m = mask.astype(np.int64)
            if m.shape[-1] == 1:
                m = np.repeat(m, 3, axis=-1)
            keys = (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]
            table = np.array([(r << 16) | (g << 8) | b for r, g, b in self.values], dtype=np.int64)
        else:
            keys = mask[..., 0].astype(np.int64)
            table = np.array(self.values, dtype=np.int64)
        return keys, table

    def encode(self, mask: np.ndarray, name: str = "mask", lossy: bool = False) -> np.ndarray:
        """(H, W, C) mask values -> (H, W) class indices (uint8/int16). Values outside the table are an error,
        except for lossy files (JPEG), whose pixels go to the nearest table value."""
        if self.kind != "colour" and mask.shape[-1] == 3:
            if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
                raise InputError(f"mask {name} is colour but the classes are grey values {self.values}; "
                                 "give a colour class table (--class-table) or grey masks")
        keys, table = self._keys(mask)
        order = np.argsort(table)
        sorted_table = table[order]
        pos = np.clip(np.searchsorted(sorted_table, keys), 0, len(table) - 1)
        if lossy and self.kind != "colour":
            lower = np.clip(pos - 1, 0, len(table) - 1)
            pick_lower = np.abs(keys - sorted_table[lower]) < np.abs(keys - sorted_table[pos])
            pos = np.where(pick_lower, lower, pos)
        else:
            bad = sorted_table[pos] != keys
            if bad.any():
                raise InputError(self._unknown_message(name, np.unique(keys[bad])))
        return order[pos].astype(np.uint8 if len(table) <= 256 else np.int16)

    def _unknown_message(self, name: str, unknown: np.ndarray) -> str:
        shown = [self._show(int(k)) for k in unknown[:8]]
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        if self.kind == "labels":
            return (f"mask {name} has class values {shown}{more} but the model has {self.num_classes} classes "
                    f"(0..{self.num_classes - 1}); train with --classes {int(unknown.max()) + 1} or fix the mask")
        return (f"mask {name} has values {shown}{more} that are not in the class table {self.values} "
                f"({self.kind}, {self.num_classes} classes); fix the mask or give a class table that lists them")

    def _show(self, key: int):
        return (key >> 16, (key >> 8) & 255, key & 255) if self.kind == "colour" else key

    def decode(self, classes: np.ndarray) -> np.ndarray:
        """(H, W) class indices -> mask values as written in the training masks ((H, W) or (H, W, 3) uint8/uint16)."""
        lut = np.array(self.values)
        out = lut[classes]
        return out.astype(np.uint8 if out.max(initial=0) <= 255 else np.uint16)


def _lossy_grey_values(m: np.ndarray) -> np.ndarray:
    """The class values of a grey mask saved lossily (JPEG): its histogram's peaks, each the most frequent value
    within LOSSY_SEPARATION grey levels and at least 5% as frequent as the most frequent one. JPEG rings around
    edges with many rare values near each true one; `ClassTable.encode(lossy=True)` snaps them to the nearest."""
    vals, counts = np.unique(m[..., 0], return_counts=True)
    kept: list = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] < 0.05 * counts.max():
            break
        if all(abs(float(vals[i]) - float(k)) > LOSSY_SEPARATION for k in kept):
            kept.append(vals[i])
    return np.sort(np.array(kept, dtype=vals.dtype))


def infer_class_table(masks: Iterable[np.ndarray], mode: str = "auto", foreground: str = "bright",
                      num_classes: int | None = None, names: Sequence[str] | None = None,
                      lossy: Sequence[bool] | None = None) -> ClassTable:
    """The class table of a set of masks ((slices, H, W, C) arrays as from `read_image(mask=True)`).

    mode "binary": the two values present, foreground the brighter (or the darker with foreground="dark");
    "labels": grey value k is class k, `num_classes` (default: max value + 1) classes; "colour": the distinct
    colours, sorted, class 0 the first (black if present); "auto": colour if any mask has colour pixels, binary for
    two grey values, labels for more. `names` (file names, for the messages) and `lossy` (JPEG masks: their grey
    values are the histogram's peaks; see `_lossy_grey_values`) are per mask.
    """
    if mode not in ("auto", "binary", "labels", "colour"):
        raise InputError(f"mask mode must be auto, binary, labels or colour, got {mode!r}")
    if foreground not in ("bright", "dark"):
        raise InputError(f"foreground must be 'bright' or 'dark', got {foreground!r}")
    grey: set[int] = set()
    colours: set[tuple[int, int, int]] = set()
    is_colour = False
    limit = max(MAX_CLASSES, num_classes or 0)  # --classes K: label maps with up to K values are expected
    first: dict = {}  # value -> the first mask holding it (messages name the file to fix)
    for i, m in enumerate(masks):
        name = f"mask {names[i]}" if names is not None else "a mask"
        if m.shape[-1] == 3 and not (np.array_equal(m[..., 0], m[..., 1]) and np.array_equal(m[..., 0], m[..., 2])):
            is_colour = True
            flat = m.reshape(-1, 3).astype(np.int64)
            packed = np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2])
            if len(packed) > MAX_CLASSES:
                raise InputError(f"{name} has {len(packed)} distinct colours: more than {MAX_CLASSES}, so it is "
                                 "probably an image, not a mask (or a lossy JPEG); give masks with one colour per class")
            new = [(int(k >> 16), int((k >> 8) & 255), int(k & 255)) for k in packed]
            colours.update(new)
            for v in new:
                first.setdefault(v, name)
        else:
            vals = _lossy_grey_values(m) if (lossy is not None and lossy[i]) else np.unique(m[..., 0])
            if not np.issubdtype(vals.dtype, np.integer):
                if not np.all(vals == np.round(vals)):
                    raise InputError(f"{name} holds non-integer values {vals[:5].tolist()}; masks must hold integer "
                                     "class values or colours")
                vals = vals.astype(np.int64)
            if len(vals) > limit:
                if num_classes is not None:
                    raise InputError(f"{name} has {len(vals)} distinct grey values, more than --classes {num_classes}; "
                                     f"give --classes {int(vals.max()) + 1} or fix the mask")
                raise InputError(f"{name} has {len(vals)} distinct grey values: more than {MAX_CLASSES}, so it is "
                                 "probably an image, not a mask; for a label map with that many classes give "
                                 f"--classes {int(vals.max()) + 1}")
            grey.update(int(v) for v in vals)
            colours.update((int(v),) * 3 for v in vals)
            for v in vals:
                first.setdefault(int(v), name)
                first.setdefault((int(v),) * 3, name)

    def where(vs) -> str:  # "(128 first in mask a.png, 7 first in mask b.png)"; nothing without file names
        shown = [f"{v} first in {first[v]}" for v in vs if v in first]
        return f"({', '.join(shown)})" if names is not None and shown else ""

    if mode == "colour" or (mode == "auto" and is_colour):
        values = sorted(colours)
        if len(values) < 2:
            raise InputError(f"the masks hold a single colour {values}: nothing to segment {where(values)}")
        return ClassTable("colour", values)
    if is_colour:
        raise InputError(f"the masks are colour-coded but --mask-mode is {mode}; use --mask-mode colour")
    values = sorted(grey)
    if mode == "labels" or (mode == "auto" and (len(values) > 2 or num_classes is not None)):
        if values[0] < 0:
            raise InputError(f"label masks hold negative values {values[:5]} {where(values[:1])}")
        k = num_classes if num_classes is not None else max(values[-1] + 1, 2)
        if values[-1] >= k:
            raise InputError(f"the masks hold class values up to {values[-1]} {where(values[-1:])} but --classes "
                             f"is {k}; use --classes {values[-1] + 1}")
        if num_classes is None and values[-1] >= MAX_CLASSES:
            raise InputError(f"the masks hold {len(values)} grey values up to {values[-1]} {where(values[-1:])}; as "
                             f"label maps that would be {values[-1] + 1} classes. Give --classes {values[-1] + 1}, a "
                             "class table (--class-table) listing the values, or masks with values 0..K-1")
        return ClassTable.labels(k)
    if len(values) > 2:
        raise InputError(f"binary masks must hold two values, these hold {len(values)}: {values[:8]} "
                         f"{where(values[:8])}; use --mask-mode labels for label maps, or fix the masks")
    if len(values) < 2:
        only = values[0] if values else None
        if only is None:
            raise InputError("no masks were given")
        # all masks one value: assume the usual 0/255 (or 0/1) encoding with that value present
        other = (255 if only == 0 else 0) if only in (0, 255) else (1 if only == 0 else 0)
        values = sorted([only, other])
    lo, hi = values
    return ClassTable("binary", [lo, hi] if foreground == "bright" else [hi, lo])


# ---------------------------------------------------------------------------------------------- pairing
@dataclass
class Pair:
    """An image file, its mask file (None for unlabelled images) and their pixels, (slices, H, W, C)."""

    name: str
    image_path: Path
    mask_path: Path | None
    image: np.ndarray
    mask: np.ndarray | None = None


def pair_files(images: str | Path, masks: str | Path, mask_suffix: str = "") -> list[Pair]:
    """Read the images and masks of two folders and pair them by file stem (mask stem = image stem + mask_suffix).

    Every problem (images without masks, masks without images, two files with one stem, unreadable files, size or
    slice-count mismatches) is collected and raised as one InputError listing them all by name.
    """
    image_files = list_images(images, "images")
    mask_files = list_images(masks, "masks")
    problems: list[str] = []
    by_stem: dict[str, Path] = {}
    for p in image_files:
        if p.stem in by_stem:
            problems.append(f"two images with the stem '{p.stem}': {by_stem[p.stem].name}, {p.name}")
        by_stem[p.stem] = p
    mask_by_stem: dict[str, Path] = {}
    for p in mask_files:
        stem = p.stem
        if mask_suffix:
            if not stem.endswith(mask_suffix):
                problems.append(f"mask {p.name} does not end with the mask suffix '{mask_suffix}'")
                continue
            stem = stem[: -len(mask_suffix)]
        if stem in mask_by_stem:
            problems.append(f"two masks for '{stem}': {mask_by_stem[stem].name}, {p.name}")
        mask_by_stem[stem] = p
    for stem, p in by_stem.items():
        if stem not in mask_by_stem:
            problems.append(f"image {p.name} has no mask (expected {stem}{mask_suffix}.* in {masks})")
    for stem, p in mask_by_stem.items():
        if stem not in by_stem:
            problems.append(f"mask {p.name} has no image (expected {stem}.* in {images})")
    pairs = []
    for stem in sorted(set(by_stem) & set(mask_by_stem)):
        ip, mp = by_stem[stem], mask_by_stem[stem]
        img = msk = None
        for path, is_mask in ((ip, False), (mp, True)):
            try:
                arr = read_image(path, mask=is_mask)
            except InputError as e:
                problems.append(str(e))
                continue
            if is_mask:
                msk = arr
            else:
                img = arr
        if img is None or msk is None:
            continue
        if img.shape[1:3] != msk.shape[1:3]:
            problems.append(f"{ip.name} is {img.shape[2]}x{img.shape[1]} but its mask {mp.name} is "
                            f"{msk.shape[2]}x{msk.shape[1]} (width x height)")
            continue
        if img.shape[0] != msk.shape[0] and msk.shape[0] != 1:
            problems.append(f"{ip.name} has {img.shape[0]} slices but its mask {mp.name} has {msk.shape[0]}")
            continue
        pairs.append(Pair(stem, ip, mp, img, msk))
    if problems:
        raise InputError(f"cannot pair the images in {images} with the masks in {masks} "
                         f"({len(problems)} problem{'s' * (len(problems) > 1)}):\n  - " + "\n  - ".join(problems))
    return pairs


def read_images(inputs: str | Path | Sequence[str | Path]) -> list[Pair]:
    """Unlabelled images from a file, a folder, or a list of files (for prediction). Problems are listed together."""
    if isinstance(inputs, (str, Path)):
        p = Path(inputs)
        if not p.exists():
            raise InputError(f"input {p} does not exist")
        files = list_images(p, "input") if p.is_dir() else [p]
    else:
        files = [Path(f) for f in inputs]
    pairs, problems = [], []
    for f in files:
        try:
            pairs.append(Pair(f.stem, f, None, read_image(f)))
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError(f"cannot read {len(problems)} input file{'s' * (len(problems) > 1)}:\n  - "
                         + "\n  - ".join(problems))
    return pairs


# ---------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One training/validation image: (C, H, W) float32 pixels, (H, W) class indices, optional (H, W) loss weights."""

    name: str
    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None = None


def image_channels(pairs: Sequence[Pair]) -> int:
    return max(p.image.shape[-1] for p in pairs)


def image_to_chw(arr: np.ndarray, channels: int, normalize: str, name: str) -> np.ndarray:
    """One (H, W, C) slice -> (channels, H, W) float32; grey is repeated to fill RGB, colour into grey is refused."""
    c = arr.shape[-1]
    if c != channels:
        if c == 1:
            arr = np.repeat(arr, channels, axis=-1)
        else:
            raise InputError(f"{name} has {c} channels but the model takes {channels}; convert the image "
                             f"(e.g. to {'greyscale' if channels == 1 else 'RGB'})")
    return np.ascontiguousarray(np.moveaxis(to_float(arr, normalize), -1, 0))


def load_samples(pairs: Sequence[Pair], table: ClassTable, channels: int | None = None, normalize: str = "dtype",
                 weight_map: dict | None = None) -> list[Sample]:
    """Samples (one per image, or per slice of a stack) with masks encoded by `table`; every bad mask is listed.

    weight_map: None, or keyword arguments of `unet_weight_map` plus "class_weights" (the paper's loss weights).
    """
    channels = channels or image_channels(pairs)
    samples, problems = [], []
    for p in pairs:
        lossy = p.mask_path is not None and p.mask_path.suffix.lower() in LOSSY_SUFFIXES
        for k in range(p.image.shape[0]):
            name = p.name if p.image.shape[0] == 1 else f"{p.name}[{k}]"
            m = p.mask[k if p.mask.shape[0] > 1 else 0]
            try:
                target = table.encode(m, p.mask_path.name if p.mask_path else name, lossy=lossy)
                image = image_to_chw(p.image[k], channels, normalize, p.image_path.name)
            except InputError as e:
                problems.append(str(e))
                break
            weight = None
            if weight_map is not None:
                weight = unet_weight_map(target, **weight_map)
            samples.append(Sample(name, image, target, weight))
    if problems:
        raise InputError("bad training data:\n  - " + "\n  - ".join(problems))
    return samples


def class_frequencies(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.float64)
    for s in samples:
        counts += np.bincount(s.target.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def balancing_weights(frequencies: np.ndarray) -> list[float]:
    """w_c = 1 / (K * freq_c), clipped to [0.1, 10]: each class contributes equally to a weighted loss."""
    k = len(frequencies)
    w = 1.0 / (k * np.maximum(frequencies, 1e-6))
    return np.clip(w, 0.1, 10.0).tolist()


def unet_weight_map(target: np.ndarray, class_weights: Sequence[float] | None = None, w0: float = 10.0,
                    sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's loss weights (Ronneberger et al. 2015, eq. 2): w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    d1, d2: distances to the nearest and second-nearest object, where objects are the connected components of
    the non-background classes (class > 0); the border term applies to background pixels, so the thin gaps between
    touching objects get large weights. w_c: per-class weights (default 1).
    """
    from scipy import ndimage

    target = np.asarray(target)
    k = int(target.max()) + 1
    cw = np.ones(max(k, 2)) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    w = cw[np.minimum(target, len(cw) - 1)].astype(np.float32)
    labels, n = ndimage.label(target > 0)
    if n < 2:
        return w
    h, wd = target.shape
    reach = int(math.ceil(4 * sigma))  # beyond d1 > 4 sigma the term is below exp(-8): not worth computing
    d1 = np.full(target.shape, np.inf, dtype=np.float32)
    d2 = np.full(target.shape, np.inf, dtype=np.float32)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(sl[0].start - reach, 0), min(sl[0].stop + reach, h)
        x0, x1 = max(sl[1].start - reach, 0), min(sl[1].stop + reach, wd)
        d = ndimage.distance_transform_edt(labels[y0:y1, x0:x1] != i).astype(np.float32)
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        nearer = d < a
        b[...] = np.where(nearer, a, np.minimum(b, d))
        a[...] = np.where(nearer, d, a)
    border = w0 * np.exp(-np.square(d1 + d2) / (2 * sigma**2))
    return w + np.where(target == 0, border, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass
class Augment:
    """Random augmentation of a training patch, identical for image, mask and weight map (intensity: image only).

    flips and 90-degree rotations; the U-Net paper's elastic deformation (with probability `elastic`): random
    displacements on a coarse `elastic_grid` x `elastic_grid` grid, normal with `elastic_sigma` pixels standard
    deviation, bicubically upsampled to per-pixel displacements; brightness offset in +-`brightness` and contrast
    factor in 1 +- `contrast`.
    """

    flips: bool = True
    rot90: bool = True
    elastic: float = 0.5
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, image: np.ndarray, target: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator):
        if self.flips:
            if rng.random() < 0.5:
                image, target = image[:, :, ::-1], target[:, ::-1]
                weight = None if weight is None else weight[:, ::-1]
            if rng.random() < 0.5:
                image, target = image[:, ::-1], target[::-1]
                weight = None if weight is None else weight[::-1]
        if self.rot90 and image.shape[1] == image.shape[2]:
            k = int(rng.integers(4))
            image, target = np.rot90(image, k, axes=(1, 2)), np.rot90(target, k)
            weight = None if weight is None else np.rot90(weight, k)
        if self.elastic > 0 and rng.random() < self.elastic:
            image, target, weight = elastic_deform(image, target, weight, rng, self.elastic_sigma, self.elastic_grid)
        if self.brightness > 0 or self.contrast > 0:
            c = 1.0 + rng.uniform(-self.contrast, self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            mean = image.mean(axis=(1, 2), keepdims=True)
            image = (image - mean) * c + mean + b
        return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target),
                None if weight is None else np.ascontiguousarray(weight, dtype=np.float32))


def elastic_deform(image: np.ndarray, target: np.ndarray, weight: np.ndarray | None, rng: np.random.Generator,
                   sigma: float = 10.0, grid: int = 3):
    """The U-Net paper's elastic deformation of a (C, H, W) image with its (H, W) mask (nearest) and weights."""
    from scipy import ndimage

    h, w = target.shape
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    # bicubic (order 3) upsampling of the coarse displacement grid to one displacement per pixel
    dy = ndimage.zoom(coarse[0], (h / grid, w / grid), order=3, mode="nearest", grid_mode=True)[:h, :w]
    dx = ndimage.zoom(coarse[1], (h / grid, w / grid), order=3, mode="nearest", grid_mode=True)[:h, :w]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    image = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="reflect") for c in image])
    target = ndimage.map_coordinates(target, coords, order=0, mode="reflect")
    if weight is not None:
        weight = ndimage.map_coordinates(weight, coords, order=1, mode="reflect")
    return image, target, weight


def random_crop(image: np.ndarray, target: np.ndarray, weight: np.ndarray | None, size: int,
                rng: np.random.Generator):
    """A size x size window at a random position; a side shorter than `size` is first mirror-padded (reflect)."""
    _, h, w = image.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, ((0, 0),) + pads, mode="reflect" if min(h, w) > 1 else "edge")
        target = np.pad(target, pads, mode="reflect" if min(h, w) > 1 else "edge")
        weight = None if weight is None else np.pad(weight, pads, mode="reflect" if min(h, w) > 1 else "edge")
        _, h, w = image.shape
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    sl = (slice(y, y + size), slice(x, x + size))
    return image[:, sl[0], sl[1]], target[sl], None if weight is None else weight[sl]


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches: item i is a crop of sample i % len(samples), augmented.

    Randomness comes from numpy Generators seeded by (seed, epoch, i), so an epoch's patches are the same whatever
    the number of DataLoader workers or processes, and a resumed run sees the patches the killed one would have.
    Call `set_epoch(e)` before each epoch. Items: (image (C, s, s) float32, target (s, s) int64, weight (s, s) float32).
    """

    def __init__(self, samples: Sequence[Sample], crop: int | None = 256, augment: Augment | None = None,
                 patches_per_image: int = 1, seed: int = 0):
        if not samples:
            raise InputError("no training samples")
        if crop is not None and crop < 1:
            raise InputError(f"crop must be a positive number of pixels, got {crop}")
        if crop is None and len({s.target.shape for s in samples}) > 1:
            raise InputError("images of different sizes need a crop size (--crop) to be batched")
        self.samples = list(samples)
        self.crop = crop
        self.augment = augment
        self.patches_per_image = max(1, int(patches_per_image))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples) * self.patches_per_image

    def __getitem__(self, i: int):
        s = self.samples[i % len(self.samples)]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, target, weight = s.image, s.target, s.weight
        if self.crop is not None:
            image, target, weight = random_crop(image, target, weight, self.crop, rng)
        if self.augment is not None:
            image, target, weight = self.augment(image, target, weight, rng)
        if weight is None:
            weight = np.ones(target.shape, dtype=np.float32)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(target).astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))


def default_patches_per_image(samples: Sequence[Sample], crop: int | None) -> int:
    """Enough random crops per image per epoch to cover its area about once."""
    if crop is None:
        return 1
    area = np.mean([s.target.size for s in samples])
    return max(1, int(round(area / crop**2)))
