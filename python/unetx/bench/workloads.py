"""The benchmark's fixed workloads (named, so results compare across time) and the forms each network runs in."""

from __future__ import annotations

from dataclasses import dataclass


class BenchConfigError(ValueError):
    """A benchmark asked for something this machine or configuration cannot run (the message says what)."""


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration. Named ones (WORKLOADS) stay fixed so results compare across time."""

    name: str
    device: str
    config: dict
    batch: int
    size: int
    autocast: str | None = None  # "bfloat16" / "float16": autocast dtype of the forward; None = float32

    def describe(self) -> str:
        c = self.config
        prec = f"{self.autocast} autocast" if self.autocast else "float32"
        return (
            f"UNet({c['in_channels']}->{c['out_channels']}, base {c['base_channels']}, depth {c['depth']}, "
            f"{c['pool']} pool, {c['upsample']} upsampling), batch {self.batch}, {self.size}x{self.size}, {prec}"
        )


def _unet_config(in_channels=1, out_channels=2, base_channels=32, depth=4, pool="avg", upsample="transpose") -> dict:
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        base_channels=base_channels,
        depth=depth,
        pool=pool,
        upsample=upsample,
    )


WORKLOADS: dict[str, Workload] = {
    "CPU-S": Workload("CPU-S", "cpu", _unet_config(1, 2, 32, 4), batch=4, size=256),
    # the same under bfloat16 autocast, the precision to train in on a CPU with native bfloat16
    "CPU-S-bf16": Workload("CPU-S-bf16", "cpu", _unet_config(1, 2, 32, 4), batch=4, size=256, autocast="bfloat16"),
    "GPU-L": Workload("GPU-L", "cuda", _unet_config(3, 2, 64, 4), batch=16, size=512, autocast="bfloat16"),
    "GPU-L-fp32": Workload("GPU-L-fp32", "cuda", _unet_config(3, 2, 64, 4), batch=16, size=512),
}


LAYOUTS = ("nchw", "channels_last")
_LAYOUT_LABEL = {"nchw": "NCHW", "channels_last": "channels_last"}


@dataclass(frozen=True)
class Form:
    """How a model runs: which implementation, memory layout, and compilation."""

    impl: str  # "unetx" | "stock"
    layout: str = "nchw"  # "nchw" | "channels_last"
    compile: str | None = None  # None (eager) | "default" | "max-autotune"
    freezing: bool = False  # inference only: torch._inductor freezing (weights folded as constants)

    @property
    def name(self) -> str:
        if self.compile is None:
            how = "eager"
        else:
            how = "compile" if self.compile == "default" else f"compile {self.compile}"
            if self.freezing:
                how += "+freezing"
        return f"{self.impl} {how} {_LAYOUT_LABEL[self.layout]}"


def default_forms(
    task: str, compile: bool, max_autotune: bool = False, compile_unetx: bool = False, device: str = "cpu"
) -> list[Form]:
    """The forms measured for task ("train" | "eval"): both implementations eager in both layouts; with compile,
    stock torch.compile (and, for eval, torch.compile with freezing). On the CPU inductor runs its convolutions in
    channels_last whatever the input layout (graph.decide_layout_opt), so there one input layout (NCHW, what a
    user writes) stands for both; on CUDA both layouts are compiled. compile_unetx adds unetx under torch.compile
    in channels_last."""
    forms = [Form(i, lay) for i in ("stock", "unetx") for lay in LAYOUTS]
    if compile:
        for mode in ["default"] + (["max-autotune"] if max_autotune else []):
            for lay in ("nchw",) if device == "cpu" else LAYOUTS:
                forms.append(Form("stock", lay, mode))
                if task == "eval":
                    forms.append(Form("stock", lay, mode, freezing=True))
        if compile_unetx:
            forms.append(Form("unetx", "channels_last", "default"))
            if task == "eval":
                forms.append(Form("unetx", "channels_last", "default", freezing=True))
    return forms
