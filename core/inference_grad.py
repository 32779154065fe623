"""Input gradients through a model whose weights are inference tensors.

ComfyUI loads and patches weights inside `torch.inference_mode()`, so they are inference tensors,
which autograd refuses to save for backward. Guidance needs only the gradient with respect to the
input, and that never needs a weight gradient: `InferenceWeights` routes the ops that carry weights
(linear, conv2d, group_norm, layer_norm) to autograd functions that keep the weight as a plain
reference and compute the input gradient alone. No weight is copied or changed; ops on ordinary
weights take autograd's usual path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _frozen(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.is_inference()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a reference, not save_for_backward: the input gradient needs no copy
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad @ ctx.weight.to(grad.dtype), None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any,
                dilation: Any, groups: int) -> torch.Tensor:
        ctx.weight, ctx.shape, ctx.geometry = weight, x.shape, (stride, padding, dilation, groups)
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        stride, padding, dilation, groups = ctx.geometry
        x_grad = torch.nn.grad.conv2d_input(ctx.shape, ctx.weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return x_grad, None, None, None, None, None, None


class _AffineNorm(torch.autograd.Function):
    """group_norm / layer_norm with an affine weight: the input gradient from the normalisation alone."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm: Any, shape: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.norm, ctx.shape, ctx.weight, ctx.eps = norm, shape, weight, eps
        return norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        weight = ctx.weight.to(grad.dtype)
        # y = normalise(x) * weight + bias: the weight scales the incoming gradient, per channel.
        scale = weight.reshape(-1, *[1] * (x.ndim - 2)) if ctx.norm is F.group_norm else weight
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (x_grad,) = torch.autograd.grad(ctx.norm(leaf, ctx.shape, None, None, ctx.eps), leaf, grad * scale)
        return x_grad, None, None, None, None, None


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> list:
    values = dict(zip(names, args))
    values.update(kwargs)
    return [values.get(name, defaults.get(name)) for name in names]


def _linear(*args: Any, **kwargs: Any) -> Any:
    x, weight, bias = _arguments(args, kwargs, ("input", "weight", "bias"), {})
    return _Linear.apply(x, weight, bias) if x.requires_grad and _frozen(weight) else NotImplemented


def _conv2d(*args: Any, **kwargs: Any) -> Any:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    x, weight, bias, stride, padding, dilation, groups = _arguments(
        args, kwargs, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if not (x.requires_grad and _frozen(weight)) or isinstance(padding, str):
        return NotImplemented
    return _Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)


def _norm(norm: Any, shape_name: str) -> Any:
    def route(*args: Any, **kwargs: Any) -> Any:
        x, shape, weight, bias, eps = _arguments(args, kwargs, ("input", shape_name, "weight", "bias", "eps"), {"eps": 1e-5})
        return _AffineNorm.apply(x, norm, shape, weight, bias, eps) if x.requires_grad and _frozen(weight) else NotImplemented
    return route


_ROUTES = {F.linear: _linear, torch.conv2d: _conv2d, F.group_norm: _norm(F.group_norm, "num_groups"),
           F.layer_norm: _norm(F.layer_norm, "normalized_shape")}


class InferenceWeights(TorchFunctionMode):
    """While active, input gradients flow through linear/conv2d/group_norm/layer_norm layers whose weights are inference tensors."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and torch.is_grad_enabled():
            out = route(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)
