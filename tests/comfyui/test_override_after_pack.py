"""A node applied after the pack's DiT nodes that sets its own attention override (ComfyUI 0.33.0's Model Attention
Backend, a kernel pack's patch): ComfyUI has one override slot, so theirs would be silently dropped. The pack's
`OverrideGuard` puts its patches back on top of the newcomer, which then runs below them as if it had come first:
every DiT node gives the same result with the newcomer after it as without it, the newcomer's attention runs, and a
newcomer that wraps the pack's override is left as it is (the pack's patches run once)."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.patcher_extension  # noqa: E402
import torch  # noqa: E402

from multicond.nodes.common import (OVERRIDE, OVERRIDE_GUARD_KEY, OverrideGuard, reaches_pack_patch,  # noqa: E402
                                    without_pack_patches)

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny_dit  # noqa: E402
from .test_blend_dit import cross  # noqa: E402
from .test_dit_style import adain, changed, shared, style_aligned  # noqa: E402

SIGMA = 0.7


def backend() -> tuple[object, list]:
    """A foreign override as ComfyUI's `set_model_optimized_attention` makes one (it calls its attention function,
    not the override it replaced) and the list of its calls; a function, so that a clone's deep copy (0.3.64) keeps
    it."""
    calls: list[int] = []

    def override(func, *args, **kwargs):
        calls.append(args[0].shape[-2])
        return func(*args, **kwargs)

    return override, calls


def replaced(model, backend) -> object:
    """`model` after a node that sets `backend` as the override without keeping the one it found."""
    after = model.clone()
    after.model_options["transformer_options"][OVERRIDE] = backend
    return after


def one_call(model, flux: bool, data: dict) -> torch.Tensor:
    if flux:
        return tiny_dit.apply_flux(model, data["x"], data["context"], data["pooled"], SIGMA, [0])
    return tiny_dit.apply_model(model, data["x"], data["context"], data["pooled"], SIGMA, [0])


@pytest.fixture(params=["sd35m", "flux-dev"])
def family(request):
    """SD3.5-M (its image-only attn2 is handed down unstyled) or Flux-dev (its double blocks are, by default)."""
    flux = request.param == "flux-dev"
    model = tiny_dit.build_flux_weighted("dev") if flux else tiny_dit.build("sd35m")
    data = tiny_dit.flux_inputs(3) if flux else tiny_dit.inputs(3)
    second = tiny_dit.flux_conditioning(5) if flux else tiny_dit.conditioning(5)
    return model, flux, data, second


NODES = {
    "Shared Attention + AdaIN Style": lambda model, second: style_aligned(model),
    "Cross-Attention Blend": lambda model, second: cross(model, second),
    "Cross-Attention Blend + Shared Attention": lambda model, second: shared(cross(model, second)),
}


@pytest.mark.parametrize("node", NODES)
def test_a_later_override_runs_below_the_packs_nodes(family, node):
    model, flux, data, second = family
    patched = NODES[node](model, second)
    newcomer, calls = backend()
    expected = one_call(patched, flux, data)
    assert changed(expected, one_call(model, flux, data), by=1e-4)
    assert_close_scaled(one_call(replaced(patched, newcomer), flux, data), expected)
    assert calls, "the newcomer's attention runs where the pack's patches hand attention down"


def test_a_pack_node_after_the_newcomer_keeps_the_earlier_pack_nodes(family):
    """Shared Attention, the newcomer, then AdaIN Style: AdaIN is added to the whole chain, not just to the newcomer."""
    model, flux, data, _ = family
    newcomer, calls = backend()
    both = adain(replaced(shared(model), newcomer))
    assert_close_scaled(one_call(both, flux, data), one_call(style_aligned(model), flux, data))
    assert calls and reaches_pack_patch(both.model_options["transformer_options"][OVERRIDE])


def test_a_newcomer_that_wraps_the_packs_override_is_left_alone(family):
    """An override that keeps and calls the one it found (here in its closure) already runs the pack's patches: the
    guard hands it down unchanged, so they run once."""
    model, flux, data, _ = family
    styled = style_aligned(model)
    found = styled.model_options["transformer_options"][OVERRIDE]
    wrapping = replaced(styled, lambda func, *args, **kwargs: found(func, *args, **kwargs))
    seen = []
    guard = OverrideGuard(found)
    guard(lambda *args, **kwargs: seen.append(args[5][OVERRIDE]), None, None, None, None, None,
          wrapping.model_options["transformer_options"])
    assert seen == [wrapping.model_options["transformer_options"][OVERRIDE]]
    assert_close_scaled(one_call(wrapping, flux, data), one_call(styled, flux, data))


def test_without_the_packs_patches_the_guard_goes_too(family):
    model, _, _, _ = family
    plain = without_pack_patches(style_aligned(model))
    assert not plain.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, OVERRIDE_GUARD_KEY)
    assert OVERRIDE not in plain.model_options["transformer_options"]


def test_comfyuis_model_attention_backend_after_the_style_nodes(family):
    """0.33.0's core node (absent from 0.3.64): PyTorch attention set after Shared Attention + AdaIN Style."""
    advanced = pytest.importorskip("comfy_extras.nodes_model_advanced")
    if not hasattr(advanced, "ModelAttentionBackend"):
        pytest.skip("this ComfyUI has no Model Attention Backend node")
    model, flux, data, _ = family
    styled = style_aligned(model)
    (after,) = advanced.ModelAttentionBackend().patch(styled, "pytorch attention")
    assert not reaches_pack_patch(after.model_options["transformer_options"][OVERRIDE]), "it replaced the override"
    assert_close_scaled(one_call(after, flux, data), one_call(styled, flux, data))
