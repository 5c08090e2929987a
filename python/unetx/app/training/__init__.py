"""Training a UNet on folders of images and masks, single process or DistributedDataParallel under torchrun.

  from unetx.app.training import TrainConfig, train, resume
  summary = train(TrainConfig(images="train/images", masks="train/masks", out="runs/a", epochs=20))
  summary = resume("runs/a", epochs=30)          # continue a killed (or finished) run from its last checkpoint

config.py    TrainConfig (every option, checked up front), TrainingError
setup.py     device and processes, run folder, data, model, schedule, precision, patch loader, resume state
trainer.py   Trainer: the epoch loop, validation, the time budget; train(), resume()
saving.py    checkpoints, history, curves, overlays
"""

from __future__ import annotations

from .config import AMP_MODES, RUN_FILES, SCHEDULES, TrainConfig, TrainingError
from .saving import write_history
from .setup import RunData, build_model, prepare_data, resolve_device, warn_if_bf16_emulated
from .trainer import Trainer, resume, train

__all__ = [
    "AMP_MODES",
    "RUN_FILES",
    "SCHEDULES",
    "RunData",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "build_model",
    "prepare_data",
    "resolve_device",
    "resume",
    "train",
    "warn_if_bf16_emulated",
    "write_history",
]
