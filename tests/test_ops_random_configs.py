"""Every unetx op on randomly drawn configurations: shapes (1-channel, 1-pixel, odd), flags, and memory layouts
(NCHW, channels_last, channel slices of a larger buffer, permuted), each tensor drawn independently.

Per configuration: outputs and all gradients against unetx.reference in float64 (or float32), by autograd through
both; the fake impl's output metadata (shape, strides, dtype) against the kernel's, for the op and for its backward
op with a random output mask, since torch.compile trusts the fake impl's strides. The hand-picked cases live in the
per-op files; this one finds the combinations nobody thought of (it found a fake/real stride mismatch for a
(N, 1, 1, 1) channels_last conv input, and weight gradients returned against the mask).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import device_param
from torch._subclasses.fake_tensor import FakeTensorMode
from unetx import ops
from unetx import reference as ref

N_CONFIGS = 48
LAYOUTS = ("nchw", "channels_last", "channel_slice", "channel_slice_nchw", "permuted")
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def in_layout(t: torch.Tensor, layout: str, device="cpu") -> torch.Tensor:
    n, c, h, w = t.shape
    like = dict(dtype=t.dtype, device=device)
    if layout == "nchw":
        return t.to(device).contiguous()
    if layout == "channels_last":
        return t.to(device).contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # channels [1, 1 + c) of a channels_last buffer (a concatenation's part)
        v = torch.empty(n, c + 3, h, w, **like).contiguous(memory_format=torch.channels_last)[:, 1 : 1 + c]
    elif layout == "channel_slice_nchw":  # and width-sliced: no layout is dense
        v = torch.empty(n, c + 3, h, w + 2, **like)[:, 2 : 2 + c, :, 1 : 1 + w]
    else:  # NHCW memory
        v = torch.empty(n, h, c, w, **like).permute(0, 2, 1, 3)
    return v.copy_(t)


class Draw:
    """One random configuration: op, its reference, inputs (float64 values + a layout each), backward-op sample."""

    def __init__(self, seed: int):
        r = random.Random(seed)
        self.r = r
        self.dtype = r.choice([torch.float32, torch.float64])
        self.op = r.choice(["conv_bn_relu"] * 4 + ["bn_relu", "bn_relu_pool", "avg_pool2x2", "upsample_concat"])
        self.values: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, str] = {}
        self.gen = torch.Generator().manual_seed(seed)
        n, c = r.choice([1, 2, 3]), r.choice([1, 2, 3, 5, 8, 17])
        h, w = r.choice([1, 2, 3, 4, 6, 7, 10, 16]), r.choice([1, 2, 3, 5, 8, 9, 33])
        getattr(self, "_" + self.op)(n, c, h, w)

    def tensor(self, name, *shape, std=1.0, mean=0.0, positive=False, layout=None):
        t = torch.randn(*shape, dtype=torch.float64, generator=self.gen) * std + mean
        self.values[name] = t.abs() + 0.5 if positive else t
        if len(shape) == 4:
            self.layouts[name] = layout or self.r.choice(LAYOUTS)

    def _vectors(self, c, with_mean):
        self.tensor("scale", c, positive=True)
        self.tensor("shift", c, std=0.5)
        if with_mean:
            self.tensor("mean", c, std=0.3)

    def _bn_relu(self, n, c, h, w):
        with_mean = self.r.random() < 0.5
        self.tensor("y", n, c, h, w, std=2.0, mean=1.0)
        self._vectors(c, with_mean)
        self.desc = dict(shape=(n, c, h, w), mean=with_mean)

    def _bn_relu_pool(self, n, c, h, w):
        self._bn_relu(n, c, 2 * max(1, h // 2), 2 * max(1, w // 2))

    def _avg_pool2x2(self, n, c, h, w):
        self.tensor("x", n, c, 2 * max(1, h // 2), 2 * max(1, w // 2))
        self.desc = dict(shape=tuple(self.values["x"].shape))

    def _upsample_concat(self, n, c, h, w):
        self.mode = self.r.choice(["none", "nearest", "bilinear"])
        f = 1 if self.mode == "none" else 2
        c2 = self.r.choice([1, 2, 3, 7])
        self.tensor("skip", n, c, f * h, f * w)
        self.tensor("x", n, c2, h, w)
        self.desc = dict(mode=self.mode, skip=(n, c, f * h, f * w), x=(n, c2, h, w))

    def _conv_bn_relu(self, n, c, h, w):
        r = self.r
        self.pool = r.random() < 0.4
        x2_mode = r.choice(["none", "nearest", "bilinear", None])
        even = 4 if self.pool and x2_mode in ("nearest", "bilinear") else 2 if self.pool or x2_mode else 1
        h, w = even * max(1, h // even), even * max(1, w // even)  # what pooling / upsampling x2 needs
        hh, ww = (h // 2, w // 2) if self.pool else (h, w)
        self.transposed = r.random() < 0.25
        k = 2 if self.transposed else r.choice([1, 3, 3, 5])
        self.stats = r.random() < 0.6 and n * hh * ww * (k * k if self.transposed else 1) > 1
        self.relu = not self.stats and r.random() < 0.6
        act = r.choice(["none", "scale", "mean"])
        self.mode, c2 = x2_mode or "none", r.choice([1, 2, 3, 6]) if x2_mode else 0
        f = 1 if self.mode == "none" else 2
        cout = r.choice([1, 2, 3, 4, 7, 16])
        self.tensor("x", n, c, h, w, mean=0.3)
        if act != "none":
            self._vectors(c, act == "mean")
        if c2:
            self.tensor("x2", n, c2, hh // f, ww // f)
        wshape = (c + c2, cout, k, k) if self.transposed else (cout, c + c2, k, k)
        self.tensor(
            "weight", *wshape, std=(k * k * (c + c2)) ** -0.5, layout=r.choice(["nchw", "nchw", "channels_last"])
        )
        if r.random() < 0.5:
            self.tensor("bias", cout)
        self.desc = dict(
            x=(n, c, h, w),
            c2=c2,
            mode=self.mode,
            k=k,
            cout=cout,
            act=act,
            pool=self.pool,
            transposed=self.transposed,
            stats=self.stats,
            relu=self.relu,
            bias="bias" in self.values,
        )

    # ---------------------------------------------------------------------------------------------------- calls
    def inputs(self, dtype, device="cpu", layouts=True) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.values.items():
            v = v.to(dtype)
            v = in_layout(v, self.layouts[k], device) if layouts and k in self.layouts else v.to(device)
            out[k] = v.requires_grad_()
        return out

    def call(self, fns, t: dict):
        g = t.get
        if self.op == "conv_bn_relu":
            if fns is ops:
                return ops.conv_bn_relu(
                    t["x"],
                    t["weight"],
                    g("bias"),
                    x_scale=g("scale"),
                    x_shift=g("shift"),
                    x_mean=g("mean"),
                    x_pool=self.pool,
                    x2=g("x2"),
                    x2_mode=self.mode,
                    transposed=self.transposed,
                    stats=self.stats,
                    relu=self.relu,
                )
            return ref.conv_bn_relu(
                t["x"],
                g("scale"),
                g("shift"),
                self.pool,
                g("x2"),
                self.mode,
                t["weight"],
                g("bias"),
                self.transposed,
                self.stats,
                self.relu,
                g("mean"),
            )
        if self.op in ("bn_relu", "bn_relu_pool"):
            return getattr(fns, self.op)(t["y"], t["scale"], t["shift"], g("mean"))
        if self.op == "avg_pool2x2":
            return fns.avg_pool2x2(t["x"])
        return fns.upsample_concat(t["skip"], t["x"], self.mode)

    def backward_sample(self, t: dict, outputs: tuple):
        """Arguments of the op's backward op as autograd would pass them, gradients in random layouts."""
        grads = [torch.randn(o.shape, dtype=o.dtype, generator=self.gen) for o in outputs]
        grads = [
            in_layout(g, self.r.choice(LAYOUTS), o.device) if o.dim() == 4 else g.to(o.device)
            for g, o in zip(grads, outputs)
        ]
        g = t.get
        if self.op == "conv_bn_relu":
            y, mean, _ = outputs
            grad_mean = grads[1] if self.stats and self.r.random() < 0.7 else None
            grad_var = grads[2] if self.stats and self.r.random() < 0.7 else None
            mask = [self.r.random() < 0.8 for _ in range(4)]
            return "conv_bn_relu_backward", (
                grads[0],
                grad_mean,
                grad_var,
                t["x"],
                g("scale"),
                g("shift"),
                self.pool,
                g("x2"),
                self.mode,
                t["weight"],
                "bias" in t,
                self.transposed,
                y,
                mean,
                self.relu,
                mask,
                g("mean"),
            )
        if self.op == "bn_relu":
            return "bn_relu_backward", (grads[0], t["y"], t["scale"], t["shift"], g("mean"))
        if self.op == "bn_relu_pool":
            return "bn_relu_pool_backward", (grads[0], grads[1], t["y"], t["scale"], t["shift"], g("mean"))
        if self.op == "avg_pool2x2":
            return "avg_pool2x2_backward", (grads[0],)
        return "upsample_concat_backward", (grads[0], t["skip"].shape[1], self.mode)


def as_tuple(r) -> tuple:
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def metadata(ts) -> list:
    """Shape, dtype and the strides that matter (inductor's assert_size_stride skips size-1 dimensions)."""
    return [
        None
        if t is None
        else (tuple(t.shape), tuple(s if n > 1 else None for n, s in zip(t.shape, t.stride())), t.dtype)
        for t in ts
    ]


def fake_metadata(op, args) -> list:
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return metadata(as_tuple(op(*fake_args)))


@pytest.mark.parametrize("seed", range(N_CONFIGS))
@device_param
@pytest.mark.filterwarnings("ignore:unetx. no unetx kernels")
def test_random_configuration(device, seed):
    d = Draw(seed)
    what = f"{d.op} {d.dtype} {d.desc} layouts {d.layouts}"
    t = d.inputs(d.dtype, device)
    ours = as_tuple(d.call(ops, t))
    exact_in = d.inputs(torch.float64, layouts=False)  # on the CPU
    exact = as_tuple(d.call(ref, exact_in))
    live = [i for i, e in enumerate(exact) if e.numel()]

    tol = TOL[d.dtype]
    for i in live:
        assert ours[i].shape == exact[i].shape, what
        err = (ours[i].cpu().double() - exact[i]).abs().max() / exact[i].abs().max().clamp_min(1e-12)
        assert err <= tol, f"{what}: output {i} error {err:.3g}"
    cots = [torch.randn(exact[i].shape, dtype=torch.float64, generator=d.gen) for i in live]
    names = list(t)
    g_ours = torch.autograd.grad(
        sum((ours[i].double() * c.to(device)).sum() for i, c in zip(live, cots)),
        [t[k] for k in names],
        allow_unused=True,
    )
    g_exact = torch.autograd.grad(
        sum((exact[i] * c).sum() for i, c in zip(live, cots)), [exact_in[k] for k in names], allow_unused=True
    )
    for k, a, e in zip(names, g_ours, g_exact):
        assert (a is None) == (e is None), f"{what}: grad {k} defined on one side only"
        if e is None:
            continue
        assert a.shape == t[k].shape and a.dtype == d.dtype, f"{what}: grad {k} {a.shape} {a.dtype}"
        err = (a.cpu().double() - e).abs().max() / e.abs().max().clamp_min(1e-12)
        assert err <= tol, f"{what}: grad {k} error {err:.3g}"

    # torch.compile relies on the fake impl's output metadata: it must be the kernel's, as inductor checks it
    args = {k: v.detach() for k, v in t.items()}
    real_out = as_tuple(d.call(ops, args))
    mode = FakeTensorMode()
    fake_args = {k: mode.from_tensor(v) for k, v in args.items()}
    with mode:
        fake_out = as_tuple(d.call(ops, fake_args))
    assert metadata(fake_out) == metadata(real_out), f"{what}: fake impl of {d.op}"
    bw_name, bw_args = d.backward_sample(args, real_out)
    bw = getattr(torch.ops.unetx, bw_name).default
    assert fake_metadata(bw, bw_args) == metadata(as_tuple(bw(*bw_args))), f"{what}: fake impl of {bw_name}"


# ------------------------------------------------------------------------------- regressions the search found
def test_conv_output_layout_is_the_fake_impls_for_a_one_by_one_single_channel_input():
    """A channels_last x whose pooled input stage is (N, 1, 1, 1): the backend saw an ambiguous layout and wrote y
    in NCHW, the fake impl promised channels_last, and torch.compile failed on the stride assertion."""
    x = in_layout(torch.randn(1, 1, 2, 2, dtype=torch.float64), "channel_slice")
    args = (
        x,
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        True,
        None,
        "none",
        torch.randn(1, 4, 2, 2, dtype=torch.float64),
        None,
        True,
        True,
        False,
        None,
    )
    op = torch.ops.unetx.conv_bn_relu.default
    assert fake_metadata(op, args) == metadata(op(*args))


@pytest.mark.parametrize("mask", [[True, False, False, True], [False, False, True, False], [False, False, False, True]])
def test_conv_backward_returns_exactly_the_masked_in_gradients(mask):
    """oneDNN computes the weight and bias gradients together; the op must still return only what the mask asks
    for (frozen weights with a trainable bias), as the fake impl does."""
    x, w, b = torch.randn(3, 3, 10, 5), torch.randn(3, 2, 2, 2), torch.randn(2)
    y, mean, _ = torch.ops.unetx.conv_bn_relu(x, None, None, False, None, "none", w, b, True, False, True)
    args = (torch.randn_like(y), None, None, x, None, None, False, None, "none", w, True, True, y, mean, True, mask)
    op = torch.ops.unetx.conv_bn_relu_backward.default
    grads = op(*args)
    assert [grads[i] is not None for i in (0, 4, 5)] == [mask[0], mask[2], mask[3]]
    assert fake_metadata(op, args) == metadata(grads)
