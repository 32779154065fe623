"""Shared Attention and AdaIN Style on tiny SD3.5-M- and SD3.5-L-like models in a real ComfyUI.

The ComfyUI models carry the diffusers tiny transformers' weights (`tiny_dit`), so one model call of
the two nodes is compared with the diffusers binding (`install_style_aligned_dit`) on the same inputs.
"""

from __future__ import annotations

import logging

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny SD3 models come from diffusers: scripts/host_venv.sh installs it")

import comfy.patcher_extension  # noqa: E402
import torch  # noqa: E402

from multicond.core.diffusers_binding.joint_style import install_style_aligned_dit  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.joint_style import JointStyle  # noqa: E402
from multicond.core.layers import STYLE_FEATURES, DiTLayout, LayerId, LayerSelection  # noqa: E402
from multicond.nodes.common import model_layout, without_pack_patches  # noqa: E402
from multicond.nodes.style import BLOCK_TOKENS, OVERRIDE, AdaINStyle, SharedAttention  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny_dit  # noqa: E402
from .graph import call  # noqa: E402

VARIANTS = ["sd35m", "sd35l"]
SIGMA = 0.7
CFG, STEPS = 4.0, 2  # tiny_dit.sample's
JOINT = (LayerId("joint", 0), LayerId("joint", 1))


def shared(model, **inputs):
    return call(SharedAttention, model=model, **inputs)[0]


def adain(model, **inputs):
    return call(AdaINStyle, model=model, **inputs)[0]


def style_aligned(model, share=None, **inputs):
    """Shared Attention (`share`, default this file's `shared`) then AdaIN Style with the inputs both take."""
    common = {k: v for k, v in inputs.items() if k in ("reference_index", "start_percent", "end_percent", "layers")}
    return adain((share or shared)(model, **inputs), **common)


def one_call(model, data: dict, sigma: float = SIGMA, cond_or_uncond: tuple[int, ...] = (0,)) -> torch.Tensor:
    return tiny_dit.apply_model(model, data["x"], data["context"], data["pooled"], sigma, list(cond_or_uncond))


def diffusers_call(variant: str, data: dict, sigma: float, chunks: int,
                   layers: LayerSelection | None = None) -> torch.Tensor:
    """The diffusers binding's prediction as ComfyUI returns it: denoised = x - sigma * v (dit.md §5.3)."""
    transformer = tiny_dit.transformer(variant)
    with install_style_aligned_dit(transformer, JointStyle(), layers=layers, chunks=chunks):
        return tiny_dit.diffusers_denoised(transformer, data, sigma)


def record_chunks(model) -> list[list[int]]:
    """Each model call's cond_or_uncond (an APPLY_MODEL wrapper: SD3's forward runs no DIFFUSION_MODEL wrapper)."""
    seen: list[list[int]] = []

    def wrapper(executor, *args, **kwargs):
        seen.append(list(args[5]["cond_or_uncond"]))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.record", wrapper)
    return seen


def changed(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> bool:
    """Whether `b` differs from `a` by more than float noise; one styled call moves the tiny targets by ~8e-3."""
    return (a - b).abs().max().item() > by


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


def test_sd3_models_have_joint_layouts_and_unet_only_nodes_still_refuse_them(variant):
    model = tiny_dit.build(variant)
    assert model_layout(model, "test", dit=True) == DiTLayout("sd35", joint=2)
    with pytest.raises(InputError, match="test: input 'model': model family SD3 is not supported"):
        model_layout(model, "test")


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0)], ids=["cond", "uncond+cond"])
def test_one_call_equals_the_diffusers_binding(variant, cond_or_uncond):
    data = tiny_dit.inputs(3 * len(cond_or_uncond))
    ours = one_call(style_aligned(tiny_dit.build(variant)), data, cond_or_uncond=cond_or_uncond)
    assert_close_scaled(ours, diffusers_call(variant, data, SIGMA, len(cond_or_uncond)))
    assert changed(ours, one_call(tiny_dit.build(variant), data, cond_or_uncond=cond_or_uncond))


def test_a_per_timestep_selection_is_keyed_by_1000_sigma_as_in_diffusers(variant):
    """CB35's rule too: a layer shares only where both q and k are chosen."""
    schedule = {700: {JOINT[0]: frozenset({"q", "share"}), JOINT[1]: STYLE_FEATURES}, 300: {JOINT[1]: frozenset({"k"})}}
    selection = LayerSelection("sd35", frozenset(JOINT), "test", schedule=schedule)
    model = tiny_dit.build(variant)
    styled = style_aligned(model, layers=selection)
    data = tiny_dit.inputs(3)
    for sigma in (0.7, 0.3):
        ours = one_call(styled, data, sigma)
        assert_close_scaled(ours, diffusers_call(variant, data, sigma, 1, selection))
        assert changed(ours, one_call(model, data, sigma), 1e-4)


def test_only_the_selected_layers_act(variant):
    model = tiny_dit.build(variant)
    data = tiny_dit.inputs(3)
    second = one_call(style_aligned(model, layers=LayerSelection("sd35", frozenset({JOINT[1]}))), data)
    assert changed(second, one_call(style_aligned(model), data), 1e-4) and changed(second, one_call(model, data), 1e-4)
    with pytest.raises(InputError, match="for sd1 but the model is sd35"):
        shared(model, layers=LayerSelection("sd1", frozenset({LayerId("input", 1, 0)})))


def test_the_reference_renders_as_if_alone_and_the_targets_change(variant):
    model = tiny_dit.build(variant)
    plain = tiny_dit.sample(model)
    styled = tiny_dit.sample(style_aligned(model))
    assert_close_scaled(styled[0], plain[0], amplification=CFG * STEPS)
    assert changed(styled[1:], plain[1:])


def test_an_odd_latent_size_finds_its_padded_image_tokens():
    """ComfyUI pads an odd latent: 15x11 holds ceil(15/2)*ceil(11/2) = 48 image tokens (dit.md §1.2)."""
    model = tiny_dit.build("sd35m")
    data = tiny_dit.inputs(3, height=15, width=11)
    styled, plain = one_call(style_aligned(model), data), one_call(model, data)
    assert styled.shape == (3, 16, 15, 11)
    assert_close_scaled(styled[0], plain[0])
    assert changed(styled[1:], plain[1:])


def test_targets_do_not_see_each_other(variant):
    styled = style_aligned(tiny_dit.build(variant))
    data, other = tiny_dit.inputs(3), tiny_dit.inputs(3, seed=1)
    moved = {name: torch.cat([tensor[:2], other[name][2:]]) for name, tensor in data.items()}
    first, second = one_call(styled, data), one_call(styled, moved)
    assert_close_scaled(second[:2], first[:2])
    assert changed(second[2], first[2])


def test_cond_and_uncond_together_equal_apart(variant, monkeypatch):
    styled = style_aligned(tiny_dit.build(variant))
    together_model, apart_model = styled.clone(), styled.clone()
    together_calls, apart_calls = record_chunks(together_model), record_chunks(apart_model)
    together = tiny_dit.sample(together_model)
    # ComfyUI batches chunks only while it thinks they fit in memory: make them never fit.
    monkeypatch.setattr(apart_model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    apart = tiny_dit.sample(apart_model)
    assert {len(c) for c in together_calls} == {2} and {len(c) for c in apart_calls} == {1}
    assert_close_scaled(apart, together, amplification=CFG * STEPS)


def test_contexts_of_different_lengths_run_apart_and_are_styled():
    """SD3's contexts are CONDRegular: a prompt and a negative of other lengths never share a call (dit.md §2.5)."""
    model = tiny_dit.build("sd35l")
    styled = style_aligned(model)
    calls = record_chunks(styled)
    negative = tiny_dit.conditioning(2, tokens=7)
    out = tiny_dit.sample(styled, negative=negative)
    assert calls and {len(c) for c in calls} == {1}
    assert changed(out[1:], tiny_dit.sample(model, negative=negative)[1:])


def test_the_nodes_compose_in_either_order(variant):
    model = tiny_dit.build(variant)
    data = tiny_dit.inputs(6)
    assert torch.equal(one_call(adain(shared(model)), data, cond_or_uncond=(1, 0)),
                       one_call(shared(adain(model)), data, cond_or_uncond=(1, 0)))


def test_nothing_leaks_into_the_unpatched_model(variant):
    model = tiny_dit.build(variant)
    before = tiny_dit.sample(model)
    tiny_dit.sample(style_aligned(model))
    assert torch.equal(tiny_dit.sample(model), before)
    options = model.model_options["transformer_options"]
    assert OVERRIDE not in options and "patches_replace" not in options and not model.wrappers


def test_a_range_outside_the_call_is_the_plain_model():
    model = tiny_dit.build("sd35m")
    data = tiny_dit.inputs(3)
    off = style_aligned(model, start_percent=0.9, end_percent=1.0)  # sigmas below SIGMA
    assert torch.equal(one_call(off, data), one_call(model, data))


def test_an_override_and_a_dit_patch_already_there_keep_running():
    model = tiny_dit.build("sd35m")
    overridden, blocks = [], []

    def override(func, *args, **kwargs):
        overridden.append(args[0].shape[1])
        return func(*args, **kwargs)

    def block(args, extra):
        blocks.append(args["transformer_options"][BLOCK_TOKENS])
        return extra["original_block"](args)

    base = model.clone()
    base.model_options["transformer_options"][OVERRIDE] = override
    base.set_model_patch_replace(block, "dit", "double_block", 1)
    data = tiny_dit.inputs(3)
    out = one_call(style_aligned(base), data)
    # Only block 0's image-only attn2 (48 image tokens) is left to the earlier override; block 1's patch got the stamp.
    assert overridden == [48] and [(b.index, b.text, b.image) for b in blocks] == [(1, 10, 48)]
    assert_close_scaled(out, one_call(style_aligned(model), data))
    overridden.clear()
    one_call(style_aligned(base, start_percent=0.9), data)
    assert overridden == [10 + 48, 48, 10 + 48]  # outside the range every call reaches it


def test_without_the_packs_patches_the_foreign_ones_stay():
    base = tiny_dit.build("sd35m").clone()
    def override(func, *args, **kwargs):
        return func(*args, **kwargs)

    def block(args, extra):
        return extra["original_block"](args)

    base.model_options["transformer_options"][OVERRIDE] = override
    base.set_model_patch_replace(block, "dit", "double_block", 1)
    options = without_pack_patches(style_aligned(base)).model_options["transformer_options"]
    assert options[OVERRIDE] is override and options["patches_replace"]["dit"] == {("double_block", 1): block}
    options = without_pack_patches(style_aligned(tiny_dit.build("sd35m"))).model_options["transformer_options"]
    assert OVERRIDE not in options and not options["patches_replace"]["dit"]


def test_share_group_norm_warns_once_on_sd3(caplog):
    model = tiny_dit.build("sd35l")
    message = "no GroupNorm in SD3: share_group_norm has no effect"
    with caplog.at_level(logging.WARNING):
        tiny_dit.sample(adain(shared(model)), steps=1)
    assert [message in record.getMessage() for record in caplog.records].count(True) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        shared(model, share_group_norm=False)
    assert not any("GroupNorm" in record.getMessage() for record in caplog.records)


def test_inputs_without_a_joint_attention_form_are_refused():
    model = tiny_dit.build("sd35l")
    with pytest.raises(InputError, match="MultiCond_SharedAttention: input 'full_attention_share': SD3's joint"):
        shared(model, full_attention_share=True, share_group_norm=False)
    with pytest.raises(InputError, match="input 'share_attention': it is off, and nothing else"):
        shared(model, share_attention=False)
    with pytest.raises(InputError, match="no target besides the reference"):
        tiny_dit.sample(shared(model), batch=1)


def test_reference_control_is_zeroed_in_every_chunk():
    styled = shared(tiny_dit.build("sd35l"), reference_index=1, share_group_norm=False)
    wrapper = styled.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "multicond.style_batch")[0]
    residual = torch.ones(6, 48, 128)
    control = {"output": [residual, residual, None]}  # SD3 ControlNets repeat one tensor over blocks (dit.md §2.6)
    passed = wrapper(lambda *args, **kwargs: args[4], torch.zeros(6, 16, 16, 12), torch.ones(6), None, None, control,
                     {"cond_or_uncond": [1, 0]})
    assert passed["output"][2] is None
    for out in passed["output"][:2]:
        assert out[[1, 4]].abs().sum() == 0 and out[[0, 2, 3, 5]].min() == 1
    assert residual.min() == 1  # ComfyUI's own residuals are left as they were
    assert not shared(tiny_dit.build("sd35l"), zero_reference_control=False).get_wrappers(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, "multicond.style_batch")
