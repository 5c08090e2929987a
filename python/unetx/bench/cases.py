"""One form of one workload, ready to time: a model copy (unetx.UNet or its plain-PyTorch twin), optimizer, inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..nn import UNet, reference
from .workloads import Form, Workload


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(w: Workload, device: torch.device):
    if w.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, w.autocast))


class Case:
    """One form of one workload, ready to run: a model copy, its optimizer, and inputs in the form's layout.

    `step()` runs one training step (train) or one no_grad forward (eval) and waits for the device."""

    def __init__(self, w: Workload, form: Form, task: str, state: dict, x: torch.Tensor, target: torch.Tensor):
        self.w, self.form, self.task = w, form, task
        self.device = torch.device(w.device)
        cls = UNet if form.impl == "unetx" else reference.UNet
        model = cls(**w.config)
        model.load_state_dict(state)
        fmt = torch.channels_last if form.layout == "channels_last" else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt).train(task == "train")
        self.x = x.to(self.device).contiguous(memory_format=fmt)
        self.target = target.to(self.device)
        self.fn: Callable = self.model
        if form.compile is not None:
            # options also make the compiled forms' backends differ, so dynamo never serves one form's graph to
            # another (its cache entries match on the backend); max-autotune is an inductor option like freezing
            options = {"freezing": True} if form.freezing else {}
            if form.compile == "max-autotune":
                options["max_autotune"] = True
            self.fn = torch.compile(self.model, options=options or None)
        # fused Adam for every form (torch's fastest Adam on the CPU and CUDA): the step compares the models, not
        # Adam implementations; unetx train uses it too (app/training/setup.py make_optimizer)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True) if task == "train" else None

    def _compiling(self):
        # freezing must be on while dynamo traces (it then installs the parameters as constants), not only in
        # inductor: torch.compile(options={"freezing": True}) alone leaves them graph inputs
        if self.form.freezing:
            return torch._inductor.config.patch(freezing=True)
        return contextlib.nullcontext()

    def forward(self) -> torch.Tensor:
        with _autocast(self.w, self.device), self._compiling():
            return self.fn(self.x)

    def step(self) -> None:
        if self.task == "train":
            self.opt.zero_grad(set_to_none=True)
            with _autocast(self.w, self.device):
                loss = F.cross_entropy(self.fn(self.x).float(), self.target)
            loss.backward()
            self.opt.step()
        else:
            with torch.no_grad():
                self.forward()
        _sync(self.device)


def _inputs(w: Workload, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = reference.UNet(**w.config).state_dict()
    x = torch.randn(w.batch, w.config["in_channels"], w.size, w.size, generator=g)
    target = torch.randint(0, w.config["out_channels"], (w.batch, w.size, w.size), generator=g)
    return state, x, target
