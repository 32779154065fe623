"""Input gradients through inference-tensor weights equal ordinary autograd's."""

from __future__ import annotations

import copy

import pytest
import torch

from multicond.core.inference_grad import InferenceWeights, guided_autograd


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.Flatten(2), Transpose(), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


class Transpose(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def input_gradient(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf).square().sum(), leaf)
    return grad


def test_inference_weights_need_the_mode_and_give_autograds_gradient():
    ordinary = network()
    with torch.inference_mode():
        frozen = copy.deepcopy(ordinary)
        for parameter in frozen.parameters():
            parameter.data = parameter.data.clone()  # inference tensors, as ComfyUI's loaded weights
    assert all(p.is_inference() for p in frozen.parameters())
    x = torch.randn(2, 4, 8, 8)
    expected = input_gradient(ordinary, x)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        input_gradient(frozen, x)
    with InferenceWeights():
        got = input_gradient(frozen, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in frozen.parameters())  # no weight gradient is computed


def test_ordinary_weights_take_the_usual_path():
    model = network()
    x = torch.randn(1, 4, 8, 8)
    with InferenceWeights():
        leaf = x.clone().requires_grad_(True)
        model(leaf).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_input_without_gradient_runs_plainly_on_inference_weights():
    with torch.inference_mode():
        frozen = network()
    with InferenceWeights(), torch.enable_grad():
        out = frozen(torch.randn(1, 4, 8, 8))
    assert not out.requires_grad


def test_an_inference_tensor_in_any_op_meets_the_gradient_as_a_copy():
    """A norm weight or a cached constant used outside the routed layers (a patch's own arithmetic)."""
    with torch.inference_mode():
        scale = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(2, 8)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (leaf * scale).square().sum().backward()
    with InferenceWeights():
        (grad,) = torch.autograd.grad(torch.cat([leaf * scale, leaf]).square().sum(), leaf)
    assert scale.is_inference()  # the original is left as it was
    torch.testing.assert_close(grad, 2 * x * scale.clone() ** 2 + 2 * x, atol=0, rtol=1e-6)


def test_guided_autograd_survives_a_later_in_place_write():
    """As the host's `h += control` or FreeU's scaling after an op has saved `h`."""
    x = torch.randn(3, 5)

    def forward(leaf: torch.Tensor, in_place: bool) -> torch.Tensor:
        hidden = leaf * 1.0
        out = hidden.sigmoid()  # saves its output
        if in_place:
            out += 1.0
        else:
            out = out + 1.0
        return out.square().sum()

    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(forward(leaf, False), leaf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        leaf = x.clone().requires_grad_(True)
        torch.autograd.grad(forward(leaf, True), leaf)
    with guided_autograd():
        leaf = x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(forward(leaf, True), leaf)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_routed_outputs_may_be_written_in_place_later():
    """Flux adds residuals in place into linear outputs: a routed output (input with a graph) and a plain one (input
    without) are tensors of their own, so the add and the backward pass both work."""
    with torch.inference_mode():
        weight, bias = torch.randn(6, 4), torch.randn(6)
    leaf = torch.randn(2, 3, 4, requires_grad=True)
    with InferenceWeights(), torch.enable_grad():  # with a bias, linear on a 3-D input returns a view of its output
        routed = torch.nn.functional.linear(leaf, weight, bias)
        plain = torch.nn.functional.linear(torch.randn(2, 3, 4), weight, bias)
        assert routed._base is None and plain._base is None
        routed += plain  # the residual add
        (grad,) = torch.autograd.grad(routed.square().sum(), leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
