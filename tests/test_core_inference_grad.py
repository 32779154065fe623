"""Input gradients through inference-tensor weights equal ordinary autograd's."""

from __future__ import annotations

import copy

import pytest
import torch

from multicond.core.inference_grad import InferenceWeights


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
