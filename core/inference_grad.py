"""Input gradients through a model whose weights are inference tensors, patched by other nodes.

ComfyUI loads and patches weights inside `torch.inference_mode()`, so they are inference tensors,
which autograd refuses to save for backward. Guidance needs only the gradient with respect to the
input, and that never needs a weight gradient: `InferenceWeights` routes the ops that carry weights
(linear, conv2d, group_norm, layer_norm) to autograd functions that keep the weight as a plain
reference and compute the input gradient alone. No weight is copied or changed; ops on ordinary
weights take autograd's usual path. Any other op that meets an inference tensor (a norm's weight
in another patch, a constant cached during an inference step) gets an ordinary copy of it.

`guided_autograd` adds what a model patched by other nodes needs: their code and the host's write
in place into tensors autograd has saved (ControlNet residuals added with `+=`, FreeU's scaling,
attention outputs assembled row by row), so every saved tensor is kept as a copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
        out = F.linear(x, weight, bias)
        # A view out of a custom Function may not be written in place later (Flux's residual adds): own it.
        return out.clone() if out._base is not None else out

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


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _Linear.apply(x, weight, bias)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: int = 1) -> Any:
    if isinstance(padding, str):
        return NotImplemented
    return _Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)


def _norm(norm: Any) -> Any:
    def route(x: torch.Tensor, shape: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
        return _AffineNorm.apply(x, norm, shape, weight, bias, eps)
    return route


_WEIGHT_POSITION = {F.linear: 1, torch.conv2d: 1, F.group_norm: 2, F.layer_norm: 2}


def _weight_of(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    position = _WEIGHT_POSITION[func]
    return kwargs["weight"] if "weight" in kwargs else args[position] if len(args) > position else None


_ROUTES = {F.linear: _linear, torch.conv2d: _conv2d, F.group_norm: _norm(F.group_norm), F.layer_norm: _norm(F.layer_norm)}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _ordinary(value: Any) -> Any:
    """`value` with every inference tensor (in lists and tuples too) replaced by an ordinary copy."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_ordinary(item) for item in value)
    return value


class InferenceWeights(TorchFunctionMode):
    """While active, input gradients flow through ops that meet inference tensors, weights or not."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        route = _ROUTES.get(func)
        if route is None:
            tensors = list(_tensors((args, tuple(kwargs.values()))))
            if any(t.is_inference() for t in tensors) and any(t.requires_grad for t in tensors):
                args, kwargs = _ordinary(args), {key: _ordinary(value) for key, value in kwargs.items()}
            return func(*args, **kwargs)
        x, weight = kwargs.get("input", args[0] if args else None), _weight_of(func, args, kwargs)
        if not _frozen(weight):
            return func(*args, **kwargs)
        if not x.requires_grad:
            with torch.no_grad():  # an inference weight needs no graph when the input carries none
                out = func(*args, **kwargs)
            # A view made under no_grad may not be written in place later under grad (Flux's residual adds): own it.
            return out.clone() if out._base is not None else out
        out = route(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


@contextmanager
def guided_autograd() -> Iterator[None]:
    """Autograd through a host model that other code patches: inference weights routed, saved tensors copied."""
    # A copy on save: a later in-place write by the host or another node cannot invalidate the backward pass.
    with InferenceWeights(), torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
        yield
