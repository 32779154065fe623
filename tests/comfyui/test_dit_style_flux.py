"""Shared Attention and AdaIN Style on tiny Flux-dev- and Flux-schnell-like models in a real ComfyUI.

The ComfyUI models carry the diffusers tiny transformers' weights (`tiny_dit.build_flux_weighted`), so one
model call of the two nodes is compared with the diffusers binding (`install_style_aligned_flux`, AlignedGen's
positions: AdaIN before RoPE, reference keys one grid width to the right) on the same inputs.
"""

from __future__ import annotations

import logging

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny Flux models come from diffusers: scripts/host_venv.sh installs it")

import comfy.model_base  # noqa: E402
import torch  # noqa: E402

from multicond.core.diffusers_binding import ALIGNEDGEN_STYLE, FluxPositions, install_style_aligned_flux  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.joint_style import JointStyle  # noqa: E402
from multicond.core.layers import STYLE_FEATURES, DiTLayout, LayerId, LayerSelection, select_blocks  # noqa: E402
from multicond.nodes.balance import LayerBalance  # noqa: E402
from multicond.nodes.common import model_layout, without_pack_patches  # noqa: E402
from multicond.nodes.style import FLUX_BLOCK, FLUX_CALL, OVERRIDE, AdaINStyle, SharedAttention  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import test_dit_style as dit_style  # noqa: E402
from . import tiny_dit  # noqa: E402
from .graph import call  # noqa: E402
from .test_dit_style import adain, record_chunks  # noqa: E402

VARIANTS = ["dev", "schnell"]
SIGMA = 0.7
GUIDANCE = 3.5
LAYOUT = DiTLayout("flux", double=2, single=2)
CFG, STEPS = 4.0, 2


def shared(model, **inputs):
    return call(SharedAttention, model=model, **{"share_group_norm": False, **inputs})[0]


def style_aligned(model, **inputs):
    return dit_style.style_aligned(model, share=shared, **inputs)


def one_call(model, data: dict, sigma: float = SIGMA, cond_or_uncond: tuple[int, ...] = (0,)) -> torch.Tensor:
    return tiny_dit.apply_flux(model, data["x"], data["context"], data["pooled"], sigma, list(cond_or_uncond), GUIDANCE)


def diffusers_call(variant: str, data: dict, sigma: float, chunks: int, style: JointStyle = ALIGNEDGEN_STYLE,
                   layers: LayerSelection | None = None, positions: FluxPositions = FluxPositions()) -> torch.Tensor:
    """The diffusers binding's prediction as ComfyUI returns it: the latent packed 2x2 into tokens, the velocity
    unpacked, denoised = x - sigma * v; both hosts embed 1000·sigma and 1000·guidance (dit.md §1.3)."""
    transformer = tiny_dit.flux_transformer(variant)
    with install_style_aligned_flux(transformer, style, layers=layers, chunks=chunks, positions=positions):
        return tiny_dit.diffusers_flux_denoised(transformer, data, sigma, GUIDANCE if variant == "dev" else None)


def changed(a: torch.Tensor, b: torch.Tensor, by: float = 1e-4) -> bool:
    return (a - b).abs().max().item() > by


def flux_sample(model, batch: int = 3, cfg: float = CFG, steps: int = STEPS) -> torch.Tensor:
    return tiny_dit.sample(model, batch=batch, cfg=cfg, steps=steps, positive=tiny_dit.flux_conditioning(1),
                           negative=tiny_dit.flux_conditioning(2))


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture
def model(variant):
    return tiny_dit.build_flux_weighted(variant)


def test_flux_models_have_flux_layouts_and_unet_only_nodes_still_refuse_them(model):
    assert model_layout(model, "test", dit=True) == LAYOUT
    with pytest.raises(InputError, match="test: input 'model': model family Flux"):
        model_layout(model, "test")


def test_the_tiny_models_equal_diffusers_unpatched(variant, model):
    data = tiny_dit.flux_inputs(2)
    plain = JointStyle(adain=None, share=None)
    assert_close_scaled(one_call(model, data), diffusers_call(variant, data, SIGMA, 1, plain))


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0)], ids=["cond", "uncond+cond"])
def test_one_call_with_alignedgens_scale_equals_the_diffusers_binding(variant, model, cond_or_uncond):
    data = tiny_dit.flux_inputs(3 * len(cond_or_uncond))
    ours = one_call(style_aligned(model, score_scale=1.1), data, cond_or_uncond=cond_or_uncond)
    assert_close_scaled(ours, diffusers_call(variant, data, SIGMA, len(cond_or_uncond)))
    assert changed(ours[1:3], one_call(model, data, cond_or_uncond=cond_or_uncond)[1:3])


def test_under_another_override_the_block_keeps_rope_and_the_result_is_the_same(variant, model):
    """An override set after the style nodes that calls through to them: the blocks then apply RoPE themselves and the
    patch un-rotates the image q/k for AdaIN (the fallback path); one call still equals the diffusers binding."""
    styled = style_aligned(model, score_scale=1.1)
    outer = styled.clone()
    options = outer.model_options["transformer_options"]
    inner = options[OVERRIDE]
    seen = []
    options[OVERRIDE] = lambda func, *args, **kwargs: seen.append(args[0].shape) or inner(func, *args, **kwargs)
    data = tiny_dit.flux_inputs(3)
    ours = one_call(outer, data)
    assert seen  # the foreign override ran, the pack's patch below it
    assert_close_scaled(ours, diffusers_call(variant, data, SIGMA, 1))
    assert_close_scaled(ours, one_call(styled, data))


def test_the_default_score_scale_is_the_users_1(variant, model):
    data = tiny_dit.flux_inputs(3)
    expected = diffusers_call(variant, data, SIGMA, 1, JointStyle())
    assert_close_scaled(one_call(style_aligned(model), data), expected)


def test_the_positions_are_alignedgens_not_the_post_rope_same_position_variant(variant, model):
    """AdaIN before RoPE and shifted reference keys are not what a bare override would do (dit.md §4.1.2)."""
    data = tiny_dit.flux_inputs(3)
    ours = one_call(style_aligned(model), data)
    for positions in (FluxPositions(adain_before_rope=False), FluxPositions(shift_reference=False)):
        assert changed(ours, diffusers_call(variant, data, SIGMA, 1, JointStyle(), positions=positions), 1e-5)


def test_a_selection_of_double_and_single_blocks_is_honoured(variant, model):
    selection = select_blocks(LAYOUT, "double, single.1")
    data = tiny_dit.flux_inputs(3)
    ours = one_call(style_aligned(model, layers=selection), data)
    assert_close_scaled(ours, diffusers_call(variant, data, SIGMA, 1, JointStyle(), selection))
    assert changed(ours, one_call(style_aligned(model), data))
    with pytest.raises(InputError, match="for sd35 but the model is flux"):
        shared(model, layers=LayerSelection("sd35", frozenset({LayerId("joint", 0)})))


def test_a_layer_balance_block_list_on_flux_is_honoured(variant, model):
    selection = call(LayerBalance, model=model, source="blocks", blocks="double.1, single.0")[0]
    data = tiny_dit.flux_inputs(3)
    ours = one_call(style_aligned(model, layers=selection), data)
    assert_close_scaled(ours, diffusers_call(variant, data, SIGMA, 1, JointStyle(), selection))
    assert changed(ours, one_call(style_aligned(model), data))


def test_a_per_timestep_selection_is_keyed_by_1000_sigma_as_in_diffusers(variant, model):
    """CB35's rule too: a layer shares only where both q and k are chosen."""
    double, single = LayerId("double", 0), LayerId("single", 1)
    schedule = {700: {double: frozenset({"q", "share"}), single: STYLE_FEATURES}, 300: {double: frozenset({"k"})}}
    selection = LayerSelection("flux", frozenset({double, single}), "test", schedule=schedule)
    styled = style_aligned(model, layers=selection)
    data = tiny_dit.flux_inputs(3)
    for sigma in (0.7, 0.3):
        ours = one_call(styled, data, sigma)
        assert_close_scaled(ours, diffusers_call(variant, data, sigma, 1, JointStyle(), selection))
        assert changed(ours, one_call(model, data, sigma), 1e-5)


def test_the_reference_renders_as_if_alone_and_the_targets_change(model):
    plain = flux_sample(model)
    styled = flux_sample(style_aligned(model, score_scale=1.1))
    assert_close_scaled(styled[0], plain[0], amplification=CFG * STEPS)
    assert changed(styled[1:], plain[1:], 1e-3)


def test_an_odd_latent_size_keeps_the_reference(model):
    """ComfyUI pads an odd latent to whole patches: 15x11 holds 8x6 image tokens (dit.md §2.4)."""
    data = tiny_dit.flux_inputs(3, height=15, width=11)
    styled, plain = one_call(style_aligned(model), data), one_call(model, data)
    assert styled.shape == (3, 16, 15, 11)
    assert_close_scaled(styled[0], plain[0])
    assert changed(styled[1:], plain[1:])


def test_kontext_reference_latents_after_the_image_are_left_alone(model):
    """Kontext latents are appended after the image tokens (dit.md §1.3): the span stays the image's."""
    data = tiny_dit.flux_inputs(3)
    kontext = [torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(5)).expand(3, -1, -1, -1)]
    sigmas = torch.full((3,), SIGMA)

    def run(patched):
        options = {**patched.model_options.get("transformer_options", {}), "cond_or_uncond": [0], "sigmas": sigmas,
                   "wrappers": patched.wrappers}
        with torch.inference_mode():
            return patched.model.apply_model(data["x"], sigmas, c_crossattn=data["context"], y=data["pooled"],
                                             guidance=torch.full((3,), GUIDANCE), ref_latents=kontext,
                                             transformer_options=options).clone()

    styled, plain = run(style_aligned(model)), run(model)
    assert styled.shape == data["x"].shape
    assert_close_scaled(styled[0], plain[0])
    assert changed(styled[1:], plain[1:])


def test_targets_do_not_see_each_other(model):
    styled = style_aligned(model)
    data, other = tiny_dit.flux_inputs(3), tiny_dit.flux_inputs(3, seed=1)
    moved = {name: torch.cat([tensor[:2], other[name][2:]]) for name, tensor in data.items()}
    first, second = one_call(styled, data), one_call(styled, moved)
    assert_close_scaled(second[:2], first[:2])
    assert changed(second[2], first[2])


def test_cond_and_uncond_together_equal_apart(monkeypatch):
    styled = style_aligned(tiny_dit.build_flux_weighted("schnell"))
    together_model, apart_model = styled.clone(), styled.clone()
    together_calls, apart_calls = record_chunks(together_model), record_chunks(apart_model)
    together = flux_sample(together_model)
    # ComfyUI batches chunks only while it thinks they fit in memory: make them never fit.
    monkeypatch.setattr(apart_model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    apart = flux_sample(apart_model)
    assert {len(c) for c in together_calls} == {2} and {len(c) for c in apart_calls} == {1}
    assert_close_scaled(apart, together, amplification=CFG * STEPS)


def test_flux_dev_at_cfg_1_runs_the_cond_chunk_only_and_is_styled():
    model = tiny_dit.build_flux_weighted("dev")
    styled = style_aligned(model)
    calls = record_chunks(styled)
    out = flux_sample(styled, cfg=1.0)
    assert calls and {tuple(c) for c in calls} == {(0,)}
    assert changed(out[1:], flux_sample(model, cfg=1.0)[1:])


def test_the_nodes_compose_in_either_order(model):
    data = tiny_dit.flux_inputs(6)
    assert torch.equal(one_call(adain(shared(model)), data, cond_or_uncond=(1, 0)),
                       one_call(shared(adain(model)), data, cond_or_uncond=(1, 0)))


def test_nothing_leaks_into_the_unpatched_model(model):
    before = flux_sample(model, steps=1)
    flux_sample(style_aligned(model), steps=1)
    assert torch.equal(flux_sample(model, steps=1), before)
    options = model.model_options["transformer_options"]
    assert OVERRIDE not in options and "patches_replace" not in options and not model.wrappers


def test_a_range_outside_the_call_is_the_plain_model(model):
    data = tiny_dit.flux_inputs(3)
    assert torch.equal(one_call(style_aligned(model, start_percent=0.9), data), one_call(model, data))


def test_an_override_and_a_dit_patch_already_there_keep_running():
    model = tiny_dit.build_flux_weighted("dev")
    overridden, blocks = [], []

    def override(func, *args, **kwargs):
        overridden.append(args[0].shape[2])
        return func(*args, **kwargs)

    def block(args, extra):
        options = args["transformer_options"]
        blocks.append((options[FLUX_BLOCK].layer, options[FLUX_CALL].image))
        return extra["original_block"](args)

    base = model.clone()
    base.model_options["transformer_options"][OVERRIDE] = override
    base.set_model_patch_replace(block, "dit", "single_block", 1)
    data = tiny_dit.flux_inputs(3)
    out = one_call(style_aligned(base), data)
    # The double blocks are outside the default selection: they reach the earlier override; 7 text + 48 image tokens.
    assert overridden == [55, 55] and blocks == [(LayerId("single", 1), (7, 55))]
    assert_close_scaled(out, one_call(style_aligned(model), data))
    options = without_pack_patches(style_aligned(base)).model_options["transformer_options"]
    assert options[OVERRIDE] is override and options["patches_replace"]["dit"] == {("single_block", 1): block}


def test_share_group_norm_warns_on_flux(caplog, model):
    with caplog.at_level(logging.WARNING):
        call(SharedAttention, model=model)
    assert any("no GroupNorm in Flux: share_group_norm has no effect" in r.getMessage() for r in caplog.records)


def test_inputs_without_a_joint_attention_form_are_refused(model):
    with pytest.raises(InputError, match="input 'full_attention_share': Flux's joint attention has no full-batch"):
        shared(model, full_attention_share=True)
    with pytest.raises(InputError, match="input 'share_attention': it is off, and nothing else of this node acts on "
                                         "Flux"):
        shared(model, share_attention=False, share_group_norm=True)
    with pytest.raises(InputError, match="no target besides the reference"):
        flux_sample(shared(model), batch=1, steps=1)


@pytest.mark.parametrize("node", [SharedAttention, AdaINStyle], ids=["SharedAttention", "AdaINStyle"])
def test_chroma_like_models_are_refused_by_name(node):
    model = tiny_dit.build_flux()
    model.model.__class__ = comfy.model_base.Chroma  # a Chroma's model object derives from Flux's (dit.md §2.7)
    node_id = node.define_schema().node_id
    with pytest.raises(InputError, match=rf"{node_id}: input 'model': Chroma models are not supported"):
        call(node, model=model)
