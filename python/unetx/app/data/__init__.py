"""Reading images and masks, pairing them, turning masks into class maps, training patches and augmentation.

    pairs = unetx.data.pair_files("train/images", "train/masks")        # every problem reported at once
    table = unetx.data.infer_class_table([p.mask for p in pairs])       # or ClassTable.binary(...)/labels(...)
    samples = unetx.data.load_samples(pairs, table)                     # one Sample per image (or stack slice)
    ds = unetx.data.PatchDataset(samples, crop=256, augment=unetx.data.Augment())

Images: PNG, JPEG, BMP (pillow) and TIFF (tifffile), 8/16-bit or float, grey or RGB; a multi-page TIFF is a stack of
slices, each a sample. Masks: binary (any two values), integer label maps, or colour-coded with a class table.
All errors about the user's files are `InputError`s naming the file and the fix.

  io.py        reading files, value normalisation      classes.py   ClassTable, inferring it from masks
  pairing.py   images with their masks, by file stem   samples.py   Sample, class frequencies, the weight map
  augment.py   flips, rotations, elastic deformation   dataset.py   random crops, PatchDataset
"""

from __future__ import annotations

from ..errors import InputError
from .augment import Augment, elastic_deform
from .classes import LOSSY_SEPARATION, MASK_MODES, MAX_CLASSES, POLARITIES, ClassTable, infer_class_table
from .dataset import PatchDataset, default_patches_per_image, random_crop
from .io import IMAGE_SUFFIXES, LOSSY_SUFFIXES, NORMALIZATIONS, list_images, read_image, to_float
from .pairing import Pair, pair_files, read_images
from .samples import (
    Sample,
    balancing_weights,
    class_frequencies,
    image_channels,
    image_to_chw,
    load_samples,
    unet_weight_map,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "LOSSY_SEPARATION",
    "LOSSY_SUFFIXES",
    "MASK_MODES",
    "MAX_CLASSES",
    "NORMALIZATIONS",
    "POLARITIES",
    "Augment",
    "ClassTable",
    "InputError",
    "Pair",
    "PatchDataset",
    "Sample",
    "balancing_weights",
    "class_frequencies",
    "default_patches_per_image",
    "elastic_deform",
    "image_channels",
    "image_to_chw",
    "infer_class_table",
    "list_images",
    "load_samples",
    "pair_files",
    "random_crop",
    "read_image",
    "read_images",
    "to_float",
    "unet_weight_map",
]
