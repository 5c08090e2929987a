"""How mask pixel values map to classes: ClassTable (binary, label maps, colour-coded) and its inference from the
masks themselves (lossy JPEG masks included)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

MAX_CLASSES = 64  # a "mask" with more distinct values than this is almost surely an image
MASK_MODES = ("auto", "binary", "labels", "colour")
POLARITIES = ("bright", "dark")  # which value of a binary mask is foreground
LOSSY_SEPARATION = 32  # grey levels between two class values of a JPEG mask (see _lossy_grey_values)


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
            self.names = (
                ["background", "foreground"]
                if self.kind == "binary"
                else [f"class{i}" for i in range(len(self.values))]
            )
        if len(self.names) != len(self.values):
            raise InputError(f"class table has {len(self.values)} values but {len(self.names)} names")

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @classmethod
    def binary(cls, background: int = 0, foreground: int = 255) -> ClassTable:
        return cls("binary", [background, foreground])

    @classmethod
    def labels(cls, num_classes: int) -> ClassTable:
        return cls("labels", list(range(num_classes)))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "values": [list(v) if isinstance(v, tuple) else v for v in self.values],
            "names": list(self.names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassTable:
        return cls(d["kind"], list(d["values"]), list(d.get("names") or []))

    @classmethod
    def from_json(cls, path: str | Path) -> ClassTable:
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
                d = {
                    "kind": "labels" if d == list(range(len(d))) else "binary" if len(d) == 2 else "labels",
                    "values": d,
                }
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
        if self.kind != "colour" and mask.shape[-1] == 3 and not _is_grey(mask):
            raise InputError(
                f"mask {name} is colour but the classes are grey values {self.values}; "
                "give a colour class table (--class-table) or grey masks"
            )
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
            return (
                f"mask {name} has class values {shown}{more} but the model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1}); train with --classes {int(unknown.max()) + 1} or fix the mask"
            )
        return (
            f"mask {name} has values {shown}{more} that are not in the class table {self.values} "
            f"({self.kind}, {self.num_classes} classes); fix the mask or give a class table that lists them"
        )

    def _show(self, key: int):
        return (key >> 16, (key >> 8) & 255, key & 255) if self.kind == "colour" else key

    def decode(self, classes: np.ndarray) -> np.ndarray:
        """(H, W) class indices -> mask values as written in the training masks ((H, W) or (H, W, 3) uint8/uint16)."""
        lut = np.array(self.values)
        out = lut[classes]
        return out.astype(np.uint8 if out.max(initial=0) <= 255 else np.uint16)


def _is_grey(mask: np.ndarray) -> bool:
    """An (H, W, 3) mask whose three channels are equal."""
    return np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])


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


def infer_class_table(
    masks: Iterable[np.ndarray],
    mode: str = "auto",
    foreground: str = "bright",
    num_classes: int | None = None,
    names: Sequence[str] | None = None,
    lossy: Sequence[bool] | None = None,
) -> ClassTable:
    """The class table of a set of masks ((slices, H, W, C) arrays as from `read_image(mask=True)`).

    mode "binary": the two values present, foreground the brighter (or the darker with foreground="dark");
    "labels": grey value k is class k, `num_classes` (default: max value + 1) classes; "colour": the distinct
    colours, sorted, class 0 the first (black if present); "auto": colour if any mask has colour pixels, binary for
    two grey values, labels for more. `names` (file names, for the messages) and `lossy` (JPEG masks: their grey
    values are the histogram's peaks; see `_lossy_grey_values`) are per mask.
    """
    if mode not in MASK_MODES:
        raise InputError(f"mask mode must be auto, binary, labels or colour, got {mode!r}")
    if foreground not in POLARITIES:
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
                raise InputError(
                    f"{name} has {len(packed)} distinct colours: more than {MAX_CLASSES}, so it is "
                    "probably an image, not a mask (or a lossy JPEG); give masks with one colour per class"
                )
            new = [(int(k >> 16), int((k >> 8) & 255), int(k & 255)) for k in packed]
            colours.update(new)
            for v in new:
                first.setdefault(v, name)
        else:
            vals = _lossy_grey_values(m) if (lossy is not None and lossy[i]) else np.unique(m[..., 0])
            if not np.issubdtype(vals.dtype, np.integer):
                if not np.all(vals == np.round(vals)):
                    raise InputError(
                        f"{name} holds non-integer values {vals[:5].tolist()}; masks must hold integer "
                        "class values or colours"
                    )
                vals = vals.astype(np.int64)
            if len(vals) > limit:
                if num_classes is not None:
                    raise InputError(
                        f"{name} has {len(vals)} distinct grey values, more than --classes {num_classes}; "
                        f"give --classes {int(vals.max()) + 1} or fix the mask"
                    )
                raise InputError(
                    f"{name} has {len(vals)} distinct grey values: more than {MAX_CLASSES}, so it is "
                    "probably an image, not a mask; for a label map with that many classes give "
                    f"--classes {int(vals.max()) + 1}"
                )
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
            raise InputError(
                f"the masks hold class values up to {values[-1]} {where(values[-1:])} but --classes "
                f"is {k}; use --classes {values[-1] + 1}"
            )
        if num_classes is None and values[-1] >= MAX_CLASSES:
            raise InputError(
                f"the masks hold {len(values)} grey values up to {values[-1]} {where(values[-1:])}; as "
                f"label maps that would be {values[-1] + 1} classes. Give --classes {values[-1] + 1}, a "
                "class table (--class-table) listing the values, or masks with values 0..K-1"
            )
        return ClassTable.labels(k)
    if len(values) > 2:
        raise InputError(
            f"binary masks must hold two values, these hold {len(values)}: {values[:8]} "
            f"{where(values[:8])}; use --mask-mode labels for label maps, or fix the masks"
        )
    if len(values) < 2:
        only = values[0] if values else None
        if only is None:
            raise InputError("no masks were given")
        # all masks one value: assume the usual 0/255 (or 0/1) encoding with that value present
        other = (255 if only == 0 else 0) if only in (0, 255) else (1 if only == 0 else 0)
        values = sorted([only, other])
    lo, hi = values
    return ClassTable("binary", [lo, hi] if foreground == "bright" else [hi, lo])
