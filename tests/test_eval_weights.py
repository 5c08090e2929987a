"""Eval layers keep their folded weights (and, on the CPU, the Winograd transform of them) across calls
(unetx.nn.layers._eval_weights, ops.hold_weight_transforms): the kept ones must give exactly what folding afresh gives,
be dropped whenever a parameter, a running statistic, the autocast dtype or the train/eval mode changes, and be
released with the model."""

from __future__ import annotations

import gc

import pytest
import torch
import unetx
from conftest import randomise_batchnorm
from unetx import reference as ref


@pytest.fixture(autouse=True)
def _winograd_forward(monkeypatch):
    # Winograd forwards on these small layers too, so that the held transforms are what runs
    monkeypatch.setenv("UNETX_WINOGRAD", "1")
    monkeypatch.setenv("UNETX_CONV_ALGO", "conv3x3_forward=winograd4")


def model(seed=0, base=8, depth=2):
    gc.collect()  # earlier tests' models released first: the counts below are deltas
    torch.manual_seed(seed)
    r = ref.UNet(1, 2, base_channels=base, depth=depth)
    randomise_batchnorm(r)
    return unetx.UNet.from_reference(r).to(memory_format=torch.channels_last).eval()


def image(seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, 1, 24, 20).contiguous(memory_format=torch.channels_last)


def fresh(m: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """m(x) with the weights folded afresh in this call (grad enabled on parameters that require it: nothing kept)."""
    with torch.enable_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return m(x).detach()


def kept(m: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return m(x)


def fused_layers(m: torch.nn.Module) -> list[unetx.nn.layers.ConvBNReLU]:
    return [c for c in m.modules() if isinstance(c, unetx.nn.layers.ConvBNReLU)]


def convs(m: torch.nn.Module) -> int:
    return len(fused_layers(m))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_kept_weights_give_what_folding_afresh_gives(autocast):
    m, x = model(), image()
    expected = fresh(m, x, autocast)
    before = unetx.ops.held_weight_transforms()
    first, second = kept(m, x, autocast), kept(m, x, autocast)
    held, held_bytes = unetx.ops.held_weight_transforms()
    assert held - before[0] == convs(m)  # one folded weight per layer
    # each one's F(4x4) transform, float32 (36 positions of in x out channels), and no other
    layers = [c.conv for c in fused_layers(m)]
    assert held_bytes - before[1] == sum(36 * c.in_channels * c.out_channels * 4 for c in layers)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert second.dtype == (torch.bfloat16 if autocast else torch.float32)


def test_only_what_runs_is_held(monkeypatch):
    m, x = model(), image()
    before = unetx.ops.held_weight_transforms()
    monkeypatch.setenv("UNETX_CONV_ALGO", "conv3x3_forward=onednn")
    kept(m, x)
    held, held_bytes = unetx.ops.held_weight_transforms()
    assert held - before[0] == convs(m)
    assert held_bytes == before[1]  # ATen's convolution runs: no transform held
    monkeypatch.setenv("UNETX_CONV_ALGO", "conv3x3_forward=winograd2")
    kept(m, x)
    layers = [c.conv for c in fused_layers(m)]
    assert unetx.ops.held_weight_transforms()[1] - before[1] == sum(
        16 * c.in_channels * c.out_channels * 4 for c in layers
    )
    # a tile once chosen stays (a model predicting at two sizes may choose one per size)
    monkeypatch.setenv("UNETX_CONV_ALGO", "conv3x3_forward=winograd4")
    kept(m, x)
    assert unetx.ops.held_weight_transforms()[1] - before[1] == sum(
        (16 + 36) * c.in_channels * c.out_channels * 4 for c in layers
    )


def test_nothing_is_kept_while_parameters_are_differentiated():
    m, x = model(), image()
    before = unetx.ops.held_weight_transforms()[0]
    x.requires_grad_()
    m(x).sum().backward()
    assert unetx.ops.held_weight_transforms()[0] == before
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_released_with_the_model_and_at_train():
    m, x = model(), image()
    before = unetx.ops.held_weight_transforms()
    kept(m, x)
    assert unetx.ops.held_weight_transforms()[0] > before[0]
    m.train()
    assert unetx.ops.held_weight_transforms() == before
    m.eval()
    kept(m, x)
    assert unetx.ops.held_weight_transforms()[0] > before[0]
    del m
    gc.collect()
    assert unetx.ops.held_weight_transforms() == before


@pytest.mark.parametrize(
    "change",
    [
        "weight_in_place",
        "bias_in_place",
        "running_var_in_place",
        "load_state_dict",
        "train_forward_updates_running_stats",
        "data_copy_then_eval",
        "replaced_parameter",
        "dtype",
    ],
)
def test_a_change_is_seen_by_the_next_call(change):
    m, x = model(), image()
    kept(m, x)  # fold and hold
    layer = m.encoder[1].block1
    with torch.no_grad():
        if change == "weight_in_place":
            layer.conv.weight.mul_(-0.5)
        elif change == "bias_in_place":
            layer.bn.bias.add_(1.0)
        elif change == "running_var_in_place":
            layer.bn.running_var.mul_(4.0)
        elif change == "load_state_dict":
            m.load_state_dict(model(seed=5).state_dict())
        elif change == "train_forward_updates_running_stats":
            m.train()
            m(image(seed=3))
            m.eval()
        elif change == "data_copy_then_eval":
            layer.conv.weight.data.copy_(-layer.conv.weight)  # autograd (and the version) cannot see this one
            m.eval()
        elif change == "replaced_parameter":
            layer.conv.weight = torch.nn.Parameter(layer.conv.weight * 2)
        elif change == "dtype":  # a parameter's .data replaced: same tensors, same versions
            m.double()
            x = x.double()
    expected = fresh(m, x)
    torch.testing.assert_close(kept(m, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(kept(m, x), expected, rtol=0, atol=0)


def test_autocast_on_and_off_each_get_their_own_dtype():
    m, x = model(), image()
    f32, bf16 = fresh(m, x), fresh(m, x, autocast=True)
    for _ in range(2):
        torch.testing.assert_close(kept(m, x), f32, rtol=0, atol=0)
        torch.testing.assert_close(kept(m, x, autocast=True), bf16, rtol=0, atol=0)


def test_kept_under_inference_mode_then_used_under_no_grad():
    m, x = model(), image()
    expected = fresh(m, x)
    with torch.inference_mode():
        a = m(x)
    b = kept(m, x)
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    torch.testing.assert_close(b, expected, rtol=0, atol=0)


def test_converted_model_folds_every_call():
    """A converted model's stock modules have no train() of unetx's to drop kept weights by: nothing is kept."""
    torch.manual_seed(0)
    stock = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
    )
    randomise_batchnorm(stock)
    m = unetx.convert(stock).eval()
    x = torch.randn(2, 3, 20, 28).contiguous(memory_format=torch.channels_last)
    before = unetx.ops.held_weight_transforms()
    torch.testing.assert_close(kept(m, x), fresh(m, x), rtol=0, atol=0)
    assert unetx.ops.held_weight_transforms() == before
    with torch.no_grad():
        next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d)).weight.data.mul_(-1)
    torch.testing.assert_close(kept(m, x), fresh(m, x), rtol=0, atol=0)


def test_a_kept_call_folds_nothing(monkeypatch):
    m, x = model(), image()
    folds = []
    real = unetx.nn.layers._fold
    monkeypatch.setattr(unetx.nn.layers, "_fold", lambda *a: folds.append(1) or real(*a))
    first = kept(m, x)
    assert len(folds) == convs(m)
    w = [unetx.nn.layers._KEPT[c.bn].w for c in fused_layers(m)]
    torch.testing.assert_close(kept(m, x), first, rtol=0, atol=0)
    assert len(folds) == convs(m)  # the second call folded nothing
    assert all(unetx.nn.layers._KEPT[c.bn].w is wi for c, wi in zip(fused_layers(m), w))


def test_frozen_model_kept_under_inference_mode_then_differentiated_in_its_input():
    m, x = model(), image()
    m.requires_grad_(False)
    with torch.inference_mode():
        m(x)
    xg = x.clone().requires_grad_()
    m(xg).square().sum().backward()  # the kept weights are saved for backward: they must be normal tensors
    xr = x.clone().requires_grad_()
    m.requires_grad_(True)
    m(xr).square().sum().backward()  # folded afresh, differentiated in the parameters too
    torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["module", "data"])
def test_half_and_back_is_seen(how):
    """.half() then .float() gives every parameter new storage (possibly at its old address) and no new version;
    `p.data = ...` alone keeps even the buffers."""
    m, x = model(), image()
    kept(m, x)
    if how == "module":
        m.half()
        m.float()
    else:
        for p in m.parameters():
            p.data = p.data.half().float()
    torch.testing.assert_close(kept(m, x), fresh(m, x), rtol=0, atol=0)


def test_fx_symbolic_trace_of_an_eval_layer():
    torch.manual_seed(0)
    layer = unetx.nn.layers.ConvBNReLU(3, 8)
    randomise_batchnorm(layer)
    layer.eval()
    x = torch.randn(1, 3, 12, 10)
    traced = torch.fx.symbolic_trace(layer)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)


def test_a_held_weight_changed_in_place_or_through_data_is_transformed_again():
    """ops.hold_weight_transforms on a tensor of one's own: the transform follows the tensor's values."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3)
    unetx.ops.hold_weight_transforms(w)
    for change in (None, "in_place", "data"):
        if change == "in_place":
            w.mul_(-2)
        elif change == "data":
            w.data = torch.randn(16, 8, 3, 3)
        expected = unetx.ops.winograd_conv3x3(x, w.clone())
        torch.testing.assert_close(unetx.ops.winograd_conv3x3(x, w), expected, rtol=0, atol=0)
    unetx.ops.release_weight_transforms(w)


def test_an_inference_tensor_is_not_held():
    with torch.inference_mode():
        w = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        unetx.ops.hold_weight_transforms(w)


@pytest.mark.parametrize("fn", ["hold_weight_transforms", "release_weight_transforms"])
def test_not_a_tensor_is_a_clear_error(fn):
    with pytest.raises(TypeError, match=rf"unetx\.{fn}: expected the weight as a torch\.Tensor, got list"):
        getattr(unetx.ops, fn)([1.0, 2.0])
