"""unetx.convert: run a U-Net you already have on the fused ops, with the same weights and state_dict keys.

How: the model is traced with torch.fx; every Conv2d -> BatchNorm2d -> ReLU chain (ReLU as a module, F.relu,
torch.relu or .relu()) becomes one fused conv-BN-ReLU call that reads the original modules' parameters and
buffers, so state_dict, .train()/.eval() and running statistics behave exactly as before. Between two fused
layers the activation stays pending (only the pre-normalisation tensor is kept for backward), and a 2x2 average
pool between them moves into the next layer's input stage. Everything else - max pooling, transposed
convolutions, torch.cat, custom code - runs unchanged. Where a module cannot be traced (data-dependent Python
control flow), its children are converted one by one instead.

`unetx.reference.UNet` is recognised and becomes a `unetx.UNet` (fully fused, decoder included).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import reference
from .layers import Act, conv_bn_relu_pending
from .unet import UNet

__all__ = ["convert"]


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return an equivalent module running Conv2d-BatchNorm2d-ReLU chains and 2x2 average pools on unetx's fused ops.

    The result has the same state_dict keys and values, the same outputs and gradients, and the same
    train/eval behaviour. Unrecognised parts run unchanged. With inplace=False (default) `model` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unetx.convert: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, UNet):
        return model
    if type(model) is reference.UNet:
        return UNet.from_reference(model)
    if not inplace:
        model = copy.deepcopy(model)
    return _convert(model)


def _convert(m: nn.Module) -> nn.Module:
    try:
        gm = fx.symbolic_trace(m)
    except Exception:  # not traceable as a whole (e.g. shape checks in Python): convert its children
        for name, child in list(m.named_children()):
            setattr(m, name, _convert(child))
        return m
    if not _fuse(gm):
        return m  # nothing recognised: keep the user's module exactly as it was
    gm.train(m.training)
    return gm


# ------------------------------------------------------------------------------------------- patterns
def _materialize(a: Act) -> torch.Tensor:
    return a.materialize()


def _avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    # stock avg_pool2d floors odd sizes; keep that behaviour where the fused op (even sizes only) does not apply
    if x.dim() == 4 and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
        return ops.avg_pool2x2(x)
    return F.avg_pool2d(x, 2)


def _pooled_conv_bn_relu(a: Act, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Act:
    """conv-BN-ReLU of avg_pool2x2(a), the pool fused into the input stage (odd sizes: stock flooring pool)."""
    if a.y.shape[-1] % 2 == 0 and a.y.shape[-2] % 2 == 0:
        return conv_bn_relu_pending(a, conv, bn, pool=True)
    return conv_bn_relu_pending(Act(F.avg_pool2d(a.materialize(), 2)), conv, bn)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fusable_conv(conv) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    k = _pair(conv.kernel_size)
    pad = conv.padding if conv.padding == "same" else _pair(conv.padding)
    return (
        k[0] == k[1]
        and k[0] % 2 == 1
        and _pair(conv.stride) == (1, 1)
        and _pair(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and (pad == "same" or pad == (k[0] // 2, k[0] // 2))
    )


def _is_bn(mod, conv) -> bool:
    return type(mod) is nn.BatchNorm2d and mod.num_features == conv.out_channels


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_avg_pool2x2(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        p = modules.get(node.target)
        return (
            type(p) is nn.AvgPool2d
            and _pair(p.kernel_size) == (2, 2)
            and _pair(p.stride or 2) == (2, 2)
            and _pair(p.padding) == (0, 0)
            and not p.ceil_mode
            and p.divisor_override is None
        )
    if node.op == "call_function" and node.target is F.avg_pool2d:
        extra = dict(node.kwargs)
        args = list(node.args[1:])
        kernel = args[0] if args else extra.pop("kernel_size", None)
        stride = args[1] if len(args) > 1 else extra.pop("stride", None)
        return _pair(kernel) == (2, 2) and (stride is None or _pair(stride) == (2, 2)) and len(args) <= 2 and not extra
    return False


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse(gm: fx.GraphModule) -> bool:
    graph = gm.graph
    modules = dict(gm.named_modules())
    pending: dict[fx.Node, fx.Node] = {}  # materialize node -> the Act node it materialises
    changed = False
    for node in list(graph.nodes):
        if _is_avg_pool2x2(node, modules):
            with graph.inserting_after(node):
                new = graph.call_function(_avg_pool2x2, (node.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
            continue
        if node.op != "call_module" or not _fusable_conv(modules.get(node.target)):
            continue
        bn = _single_user(node)
        if bn is None or bn.op != "call_module" or not _is_bn(modules.get(bn.target), modules[node.target]):
            continue
        relu = _single_user(bn)
        if relu is None or not _is_relu(relu, modules) or relu.args[0] is not bn:
            continue
        src = node.args[0]
        with graph.inserting_before(node):
            fn = conv_bn_relu_pending
            if src in pending:  # the previous fused layer feeds this one directly
                act = pending[src]
            elif src.op == "call_function" and src.target is _avg_pool2x2 and src.args[0] in pending:
                act, fn = pending[src.args[0]], _pooled_conv_bn_relu
            else:
                act = graph.call_function(Act, (src,))
            conv_mod = graph.get_attr(node.target)
            bn_mod = graph.get_attr(bn.target)
            fused = graph.call_function(fn, (act, conv_mod, bn_mod))
            mat = graph.call_function(_materialize, (fused,))
        relu.replace_all_uses_with(mat)
        for dead in (relu, bn, node):
            graph.erase_node(dead)
        pending[mat] = fused
        changed = True
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return changed
