"""The Trainer: one run's epoch loop (training steps, validation, the time budget) over the setup of setup.py,
writing through saving.py. Training a UNet on folders of images and masks, single process or
DistributedDataParallel under torchrun.

    from unetx.app.training import TrainConfig, train, resume
    summary = train(TrainConfig(images="train/images", masks="train/masks", out="runs/a", epochs=20))
    summary = resume("runs/a", epochs=30)          # continue a killed (or finished) run from its last checkpoint

RUN_DIR gets last.pt and best.pt (atomic checkpoints), history.csv and history.npy (one row per epoch), curves.png,
and overlays/ (validation images with predicted and true masks). Everything about the data and the options is
checked before the first step; a problem is one `InputError` listing every bad file.

Determinism: the weights are initialised from `seed`; the patches, augmentation and shuffling of epoch e come from
generators seeded by (seed, e), and dropout from torch's generator seeded at each epoch's start. A resumed run
therefore continues exactly as the killed one would have (on the same device and number of processes).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ...ops import algo_choice
from .. import checkpoint
from ..errors import InputError
from ..losses import make_loss, probabilities
from ..metrics import confusion_counts, dice_from_counts, foreground_mean, iou_from_counts
from ..plan import DEFAULT_BUDGET, PLANNED, format_duration, make_plan, parse_duration
from .config import TrainConfig, TrainingError
from .saving import save_epoch, write_overlays
from .setup import (
    amp_dtype,
    build_model,
    check_run_dir,
    distributed,
    make_loader,
    make_optimizer,
    make_scheduler,
    prepare_data,
    prepare_run_dir,
    resolve_device,
    restore_state,
)


class Trainer:
    """One training run. `Trainer(cfg).run()`; `Trainer.from_run_dir(dir)` to resume."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume_ckpt: dict | None = None,
        plan_given: set[str] | None = None,
        started: float | None = None,
    ):
        """plan_given: plan the run (unetx.app.plan) for the fields not named in it; None plans only with cfg.time
        (then every planned field left at its default is planned). started: when the time budget began
        (time.perf_counter(); default now)."""
        self.started = time.perf_counter() if started is None else started
        self._choices_saved = False
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.rank, self.world, self.local_rank = distributed()
        check_run_dir(self.out, resume=resume_ckpt is not None)
        self.device = resolve_device(cfg.device, self.local_rank)
        table = checkpoint.class_table(resume_ckpt) if resume_ckpt else None
        channels = resume_ckpt["config"]["in_channels"] if resume_ckpt else None
        self.data = prepare_data(cfg, table, channels)
        self.plan = None
        if resume_ckpt is None and (plan_given is not None or cfg.time is not None):
            self._make_plan(plan_given)
        self.budget = parse_duration(cfg.time) if cfg.time is not None else None
        # seconds of the budget spent by earlier sessions of this run (a resumed run continues the same budget)
        self.spent_before = float((resume_ckpt or {}).get("time_spent", 0.0))
        self.out_of_time = False
        # what the budget's reserve is made of (see _reserve): the plan's estimates until measured here
        self.est = {"val": None, "save": 5.0, "step": (self.plan.step_s if self.plan and self.plan.step_s else 0.0)}
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data, resume_ckpt)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.loss_fn = make_loss(cfg.loss)
        self.opt = make_optimizer(cfg, self.model.parameters())
        self.sched = make_scheduler(cfg, self.opt)
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.history: dict[str, list] = {}
        self.best = {"epoch": -1, "score": -math.inf}
        self.start_epoch = 0
        if resume_ckpt is not None:
            self.history, self.best, self.start_epoch = restore_state(
                resume_ckpt, cfg, self.opt, self.sched, self.scaler, self.best
            )
        if self.budget is not None and cfg.schedule == "cosine":
            self.sched = None  # the learning rate follows the budget's time instead (_time_lr)
        self.dataset, self.sampler, self.loader = make_loader(cfg, self.data, self.world, self.rank, self.device)
        self.ddp = None
        if self.budget is not None and self.time_left() <= self._reserve():
            raise InputError(
                f"--time {cfg.time}: no time is left to train ({format_duration(max(self.time_left(), 0))} left of "
                f"the budget, {format_duration(self._reserve())} needed for the final validation and checkpoint); "
                + ("continue with --resume and a longer --time" if resume_ckpt else "give a longer --time")
            )
        if self.is_main:
            prepare_run_dir(self.out, self.plan)

    def _make_plan(self, given: set[str] | None) -> None:
        cfg = self.cfg
        if given is None:  # the Python API with time=...: plan what was left at its default
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            given = {k for k in PLANNED if getattr(cfg, k) != defaults[k]}
        if cfg.time is None and "epochs" not in given:
            cfg.time = f"{DEFAULT_BUDGET.get(self.device.type, DEFAULT_BUDGET['cuda']) / 60:g}m"
        budget = parse_duration(cfg.time) if cfg.time is not None else None
        # under torchrun every process must reach the same plan: no probe there, the fingerprint's rules alone
        self.plan = make_plan(
            cfg,
            given,
            self.data,
            self.device,
            budget,
            amp_dtype=amp_dtype(cfg, self.device),
            log=self.log,
            measure=self.world == 1,
        )
        cfg.check()
        self.log(
            "unetx train: the plan ("
            + (f"budget {cfg.time}" if budget else f"{cfg.epochs} epochs")
            + "; any value can be set by its flag):"
        )
        for line in self.plan.lines():
            self.log("  " + line)

    # -------------------------------------------------------------------------------- the time budget
    def time_left(self) -> float:
        return self.budget - self.spent_before - (time.perf_counter() - self.started)

    def _reserve(self) -> float:
        """Seconds the run needs after its last step: a validation, the overlays, the checkpoints, one more step."""
        n_val = len(self.data.val)
        val = self.est["val"]
        if val is None:  # not measured yet: the plan's estimate, slowed as much as the steps run slower than probed
            plan = self.plan
            val = (
                plan.val_s * max(1.0, self.est["step"] / plan.step_s)
                if plan is not None and plan.val_s and plan.step_s
                else 0.0
            )
        overlays = val * min(self.cfg.overlays, n_val) / n_val if n_val else 0.0
        return 1.2 * (val + overlays + self.est["save"]) + self.est["step"] + 2.0

    def _time_lr(self) -> None:
        """Cosine from cfg.lr to cfg.lr / 100 over the part of the budget left for training."""
        window = max(self.budget - self._reserve(), 1e-9)
        progress = min(1.0, (self.budget - self.time_left()) / window)
        lr = self.cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in self.opt.param_groups:
            g["lr"] = lr

    def _should_stop(self) -> bool:
        if self.budget is None:
            return False
        stop = self.time_left() <= self._reserve()
        if self.world > 1:  # every process stops at the same step
            stop = bool(self._all_reduce(np.array([float(stop)]))[0] > 0)
        return stop

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, started: float | None = None, **overrides) -> Trainer:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise InputError(f"--resume {run_dir}: no such run folder")
        if not (run_dir / "last.pt").exists():
            raise InputError(
                f"--resume {run_dir}: the folder has no last.pt (no epoch finished yet?); "
                "start the run again without --resume"
            )
        ckpt = checkpoint.load(run_dir / "last.pt")
        args = dict(ckpt.get("train_args") or {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in args.items() if k in known})
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.out = str(run_dir)
        return cls(cfg, resume_ckpt=ckpt, started=started)

    # -------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _all_reduce(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.cpu().numpy()

    # -------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        model = self.ddp or self.model
        model.train()
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.cfg.seed * 100003 + epoch)
        total_loss, seen, steps = 0.0, 0, 0
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}" + (f"/{self.cfg.epochs}" if self.budget is None else "")
        bar = tqdm(
            self.loader,
            desc=desc,
            unit="batch",
            leave=False,
            disable=not (self.cfg.progress and self.is_main),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        t_prev = time.perf_counter()
        for image, target, weight in bar:
            if self._should_stop():
                self.out_of_time = True
                break
            if self.budget is not None and self.sched is None:
                self._time_lr()
            image = image.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            target = target.to(self.device, non_blocking=True)
            weight = weight.to(self.device, non_blocking=True) if self.cfg.weight_map else None
            with self._autocast():
                logits = model(image)
            loss = self.loss_fn(logits.float(), target, weight)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {steps + 1}; training "
                    f"stopped, {self._kept()}. Lower --lr, or try --amp off"
                )
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            n = image.shape[0]
            total_loss += loss.item() * n
            seen += n
            steps += 1
            if not self._choices_saved:  # what the first step measured, kept even if the run is killed later
                self._choices_saved = True
                algo_choice.save_quietly()
            elapsed = time.perf_counter() - t0
            now = time.perf_counter()  # a step as the budget sees it: loading and augmenting its patches included
            self.est["step"] = max(self.est["step"] * 0.8, now - t_prev)
            t_prev = now
            left = {} if self.budget is None else {"left": format_duration(self.time_left())}
            bar.set_postfix(
                loss=f"{total_loss / seen:.4f}", img_s=f"{seen * self.world / max(elapsed, 1e-9):.1f}", **left
            )
        else:
            if self.budget is not None and self._should_stop():
                self.out_of_time = True
        bar.close()
        sums = self._all_reduce(np.array([total_loss, seen], dtype=np.float64))
        elapsed = time.perf_counter() - t0
        return {
            "train_loss": sums[0] / max(sums[1], 1),
            "images_per_s": sums[1] / max(elapsed, 1e-9),
            "steps": steps,
            "seconds": elapsed,
        }

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and per-class Dice/IoU over the validation images (whole images, or overlap-tile when large);
        each process takes every world-th image and the counts are summed."""
        from ..predict import predict_tiled

        k = self.data.table.num_classes
        model = self.model
        model.eval()
        counts = np.zeros((k, 3), dtype=np.float64)
        loss_sum, n = 0.0, 0
        for s in self.data.val[self.rank :: self.world]:
            image = torch.from_numpy(s.image)
            target = torch.from_numpy(s.target.astype(np.int64))
            h, w = s.target.shape
            if h * w <= self.cfg.val_tile**2:
                with self._autocast():
                    logits = model(image[None].to(self.device)).float()
            else:
                logits = torch.from_numpy(predict_tiled(model, image, tile=self.cfg.val_tile, output="logits"))[None]
                logits = logits.to(self.device)
            weight = (
                torch.from_numpy(s.weight)[None].to(self.device)
                if (self.cfg.weight_map and s.weight is not None)
                else None
            )
            loss_sum += self.loss_fn(logits, target[None].to(self.device), weight).item()
            n += 1
            pred = probabilities(logits).argmax(1)[0]
            counts += confusion_counts(pred, target, k)
        model.train()
        totals = self._all_reduce(np.concatenate([counts.ravel(), [loss_sum, n]]))
        counts = totals[:-2].reshape(k, 3)
        dice, iou = dice_from_counts(counts), iou_from_counts(counts)
        out = {"val_loss": totals[-2] / max(totals[-1], 1), "val_dice": foreground_mean(dice)}
        for c, name in enumerate(self.data.table.names):
            out[f"val_dice_{name}"] = float(dice[c])
            out[f"val_iou_{name}"] = float(iou[c])
        return out

    def _kept(self) -> str:
        """What a stopped run leaves: the last good checkpoint, named only if one was written."""
        last = self.out / "last.pt"
        if last.exists():
            done = self.history["epoch"][-1] if self.history.get("epoch") else self.start_epoch
            return f"{last} still holds the last good epoch ({done})"
        return "no checkpoint was written (no epoch finished)"

    # -------------------------------------------------------------------------------- saving
    def save(self, epoch: int, best: bool) -> None:
        if not self.is_main:
            return
        kw = dict(
            classes=self.data.table,
            normalize=self.cfg.normalize,
            loss=self.cfg.loss,
            epoch=epoch,
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict() if self.sched else None,
            scaler=self.scaler.state_dict() if self.scaler else None,
            history=self.history,
            best=self.best,
            train_args=dataclasses.asdict(self.cfg),
            world_size=self.world,
            time_spent=self.spent_before + time.perf_counter() - self.started,
        )
        save_epoch(self.out, checkpoint.to_dict(self.model, **kw), best, self.history, self._kept())

    def write_overlays(self) -> list[Path]:
        """Validation images beside their predicted and true masks (best weights), in RUN_DIR/overlays/."""
        if not self.is_main or self.cfg.overlays <= 0 or not self.data.val:
            return []
        return write_overlays(self.out, self.data.val[: self.cfg.overlays], self.device, min(self.cfg.val_tile, 1024))

    # -------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        initialised_here = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            initialised_here = True
        try:
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            result = self._loop()
            if initialised_here:
                # the ranks tear the group down together: rank 0 saves and plots after the last collective, and a
                # gloo rank that destroyed its group while the other still held it was seen to abort ("terminate
                # called without an active exception", tests/ddp_model_worker.py). Not on an error: the other
                # ranks may never arrive.
                dist.barrier()
            return result
        finally:
            if initialised_here:
                dist.destroy_process_group()

    def _loop(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.start_epoch >= cfg.epochs:
            self.log(
                f"unetx train: {self.out} already has {self.start_epoch} of {cfg.epochs} epochs; "
                "nothing to do (raise --epochs to train longer)"
            )
        else:
            n_val = len(self.data.val)
            self.log(
                f"unetx train: {len(self.data.train)} training / {n_val} validation images, "
                f"{self.data.table.num_classes} classes ({self.data.table.kind}: {self.data.table.values}), "
                f"UNet {self.model.config}, {len(self.dataset)} patches of {cfg.crop}px per epoch, "
                f"device {self.device}{f' x {self.world} processes' if self.world > 1 else ''}"
                f"{', resuming after epoch ' + str(self.start_epoch) if self.start_epoch else ''}"
            )
        for epoch in range(self.start_epoch, cfg.epochs):
            stats = self.train_epoch(epoch)
            if stats["steps"] == 0:  # the time ran out before this epoch's first step
                break
            final = self.out_of_time or epoch + 1 == cfg.epochs
            if self.data.val and ((epoch + 1) % cfg.val_every == 0 or final):
                t_val = time.perf_counter()
                stats.update(self.validate())
                self.est["val"] = time.perf_counter() - t_val
            score = stats.get("val_dice", -stats["train_loss"])
            if self.sched is not None:
                if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.sched.step(stats.get("val_loss", stats["train_loss"]))
                else:
                    self.sched.step()
            row = {"epoch": epoch + 1, "lr": self.opt.param_groups[0]["lr"], **stats}
            done = len(self.history.get("epoch", []))
            for key in row:
                self.history.setdefault(key, [math.nan] * done)  # a column first seen now (e.g. validation)
            for key, col in self.history.items():
                col.append(float(row.get(key, math.nan)))
            # with no validation images, a time-budget run's best weights are its last: its learning rate has
            # decayed to its end there, and the training loss of random augmented patches is too noisy to pick by
            improved = score > self.best["score"] or (self.budget is not None and not self.data.val)
            if improved:
                self.best = {"epoch": epoch + 1, "score": float(score)}
            t_save = time.perf_counter()
            self.save(epoch + 1, improved)
            self.est["save"] = time.perf_counter() - t_save
            val_txt = (
                f", val loss {stats['val_loss']:.4f}, val Dice {stats['val_dice']:.4f}" if "val_dice" in stats else ""
            )
            left = "" if self.budget is None else f", {format_duration(self.time_left())} left"
            self.log(
                f"epoch {epoch + 1}{'' if self.budget is not None else f'/{cfg.epochs}'}: train loss "
                f"{stats['train_loss']:.4f}{val_txt}, {stats['images_per_s']:.1f} img/s, "
                f"{stats['seconds']:.1f}s{left}{' *' if improved else ''}"
            )
            if self.world > 1:
                dist.barrier()
            if self.out_of_time:
                break
        overlays = self.write_overlays()
        elapsed = time.perf_counter() - t_start
        best_txt = (
            f"best val Dice {self.best['score']:.4f} at epoch {self.best['epoch']}"
            if self.data.val
            else f"best.pt = epoch {self.best['epoch']} (train loss {-self.best['score']:.4f}; no validation "
            "images" + (", so the last epoch" if self.budget is not None else ", lowest train loss") + ")"
        )
        epochs_done = int(self.history["epoch"][-1]) if self.history.get("epoch") else 0
        self.log(
            f"unetx train: done, {epochs_done} epochs ({elapsed:.0f}s this session"
            + (
                f", budget {cfg.time}, {format_duration(self.spent_before + time.perf_counter() - self.started)} used"
                if self.budget is not None
                else ""
            )
            + f"), {best_txt}; "
            f"checkpoints {self.out / 'best.pt'}, {self.out / 'last.pt'}; history {self.out / 'history.csv'}, "
            f"curves {self.out / 'curves.png'}" + (f", overlays {self.out / 'overlays'}" if overlays else "")
        )
        return {
            "out": str(self.out),
            "epochs": epochs_done,
            "best_epoch": self.best["epoch"],
            "best_score": self.best["score"],
            "history": self.history,
            "seconds": elapsed,
            "best_checkpoint": str(self.out / "best.pt"),
            "last_checkpoint": str(self.out / "last.pt"),
        }


def train(cfg: TrainConfig | None = None, **options) -> dict:
    """Train a UNet (see TrainConfig for the options) and return a summary dict (paths, best score, history)."""
    cfg = dataclasses.replace(cfg, **options) if cfg is not None else TrainConfig(**options)
    return Trainer(cfg).run()


def resume(run_dir: str | Path, **overrides) -> dict:
    """Continue the run in run_dir from its last checkpoint (overrides e.g. epochs=, device=, workers=)."""
    return Trainer.from_run_dir(run_dir, **overrides).run()
