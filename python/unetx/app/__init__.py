"""The segmentation application on unetx.nn: data I/O and augmentation, losses, metrics, training, evaluation,
prediction, checkpoints, plots, synthetic data, run planning and the `unetx` command. Its dependencies beyond torch
and numpy (Pillow, tifffile, scipy, matplotlib, tqdm) load here, never on `import unetx`.

  errors.py      InputError                          data/         reading, class tables, pairing, samples, patches
  losses.py      losses for logits vs class maps     metrics.py    Dice, IoU from confusion counts
  training/      config, setup, the Trainer, saving  plan.py       planning a run for a time budget
  evaluate.py    evaluate(model, images, masks)      predict.py    overlap-tile prediction of any size
  checkpoint.py  saving and loading models           plots.py      curves and overlay PNGs
  synthetic.py   synthetic cell images (the demo)    cli.py        the `unetx` command
"""

from __future__ import annotations

from .errors import InputError
from .evaluate import Evaluation, evaluate
from .predict import predict_tiled
from .training import TrainConfig, Trainer, resume, train

__all__ = ["Evaluation", "InputError", "TrainConfig", "Trainer", "evaluate", "predict_tiled", "resume", "train"]
