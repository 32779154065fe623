"""Epsilon Blend on flow models (SD3.5, Flux-dev) in a real ComfyUI: a velocity blend (dit.md §4.3).

ComfyUI's masked-conditioning sum weighs each prompt's `denoised` per latent pixel; on a flow model
denoised = x − σ·v, so the node blends the two velocities, and with a shared negative and plain CFG the blend
before CFG equals the paper's blend of the two CFG'd predictions. Flux-dev runs without an uncond (CFG 1): the
blend acts on the two conditional velocities. Latents are 16 channels, non-square, and Flux's packing into 2x2
tokens happens inside the model, after the blend's per-pixel weights.
"""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny DiTs come from diffusers: scripts/host_venv.sh installs it")

import torch  # noqa: E402

from multicond.core.blend import Profile, blend, profile_weights  # noqa: E402
from multicond.core.layers import select_blocks  # noqa: E402
from multicond.nodes.common import model_layout  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny_dit  # noqa: E402
from .test_blend_nodes import apart, epsilon  # noqa: E402
from .test_dit_style import style_aligned  # noqa: E402

HEIGHT, WIDTH = 16, 24  # a non-square latent: 8 x 12 tokens


@pytest.fixture(scope="module", params=["sd35", "flux"])
def family(request):
    """(model, first, second, negative, cfg): SD3.5-L-like under CFG 4; Flux-dev-like at CFG 1, guidance 3.5."""
    if request.param == "sd35":
        return (tiny_dit.build("sd35l"), tiny_dit.conditioning(1), tiny_dit.conditioning(3), tiny_dit.conditioning(2),
                4.0)
    return (tiny_dit.build_flux_weighted("dev"), tiny_dit.flux_conditioning(1), tiny_dit.flux_conditioning(3),
            tiny_dit.flux_conditioning(2), 1.0)


def run(model, positive, negative, cfg, steps=3, batch=1):
    return tiny_dit.sample(model, batch=batch, height=HEIGHT, width=WIDTH, steps=steps, cfg=cfg, positive=positive,
                           negative=negative)


def test_one_step_is_the_papers_blend_of_the_two_predictions(family, monkeypatch):
    """One Euler step from σ = 1 to 0 returns the (CFG'd) denoised latent; the blend of the two prompts' equals the
    blended run's: a velocity blend, CFG commuting with it on SD3, the conditional velocities on Flux-dev."""
    model, first, second, negative, cfg = family
    model = apart(model, monkeypatch)
    patched, positive = epsilon(model, first, second)
    weight = profile_weights(Profile(), HEIGHT, WIDTH)
    expected = blend(run(model, first, negative, cfg, 1), run(model, second, negative, cfg, 1), weight)
    assert_close_scaled(run(patched, positive, negative, cfg, 1), expected, amplification=cfg)


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_a_constant_mask_gives_exactly_one_prompt(family, value, monkeypatch):
    model, first, second, negative, cfg = family
    model = apart(model, monkeypatch)
    patched, positive = epsilon(model, first, second, mask=torch.full((HEIGHT, WIDTH), value))
    alone = run(model, first if value else second, negative, cfg)
    assert torch.equal(run(patched, positive, negative, cfg), alone)


def test_a_half_mask_keeps_each_side_of_a_flux_token_grid(family, monkeypatch):
    """A hard left/right mask on token boundaries: the first step's left half is the first prompt's, the right half the
    second's (Flux packs 2x2 pixels per token after the weights are applied per pixel)."""
    model, first, second, negative, cfg = family
    model = apart(model, monkeypatch)
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[:, :WIDTH // 2] = 1.0
    patched, positive = epsilon(model, first, second, mask=mask)
    blended = run(patched, positive, negative, cfg, 1)
    assert_close_scaled(blended[..., :WIDTH // 2], run(model, first, negative, cfg, 1)[..., :WIDTH // 2],
                        amplification=cfg)
    assert_close_scaled(blended[..., WIDTH // 2:], run(model, second, negative, cfg, 1)[..., WIDTH // 2:],
                        amplification=cfg)


def test_the_blend_composes_with_shared_attention_on_dits(family, monkeypatch):
    """After Shared Attention + AdaIN Style, a ones mask is the styled batch of the first prompt; a soft one differs."""
    model, first, second, negative, cfg = family
    styled = apart(style_aligned(model), monkeypatch)
    ones, positive = epsilon(styled, first, second, mask=torch.ones(HEIGHT, WIDTH))
    assert torch.equal(run(ones, positive, negative, cfg, batch=3), run(styled, first, negative, cfg, batch=3))
    soft, positive = epsilon(styled, first, second)
    blended = run(soft, positive, negative, cfg, batch=3)
    assert torch.isfinite(blended).all() and (blended - run(styled, first, negative, cfg, batch=3)).abs().max() > 1e-3


# --- Cross-Attention Blend: the two texts in one joint attention -----------------------------------


def cross(model, second, mask=None, layers=None):
    from .test_blend_nodes import cross as cross_node

    return cross_node(model, second, mask=mask, layers=layers)


def with_pooled_of(text: list, pooled_from: list) -> list:
    """`text`'s token embeddings with `pooled_from`'s pooled output (and Flux guidance): what the blend keeps."""
    return [[text[0][0], {**pooled_from[0][1]}]]


def test_a_ones_mask_is_the_first_prompt_and_a_zeros_mask_the_second_text(family):
    """Weight 1: the image and the first text never see the second text, in every joint attention (Flux: double and
    single blocks), so the batch is the first prompt's. Weight 0: the image sees only the second text; the pooled
    vector stays the first prompt's, so it is the second prompt's text with the first's pooled output."""
    model, first, second, negative, cfg = family
    ones = cross(model, second, mask=torch.ones(HEIGHT, WIDTH))
    assert_close_scaled(run(ones, first, negative, cfg, batch=2), run(model, first, negative, cfg, batch=2),
                        amplification=cfg * 3)
    zeros = cross(model, second, mask=torch.zeros(HEIGHT, WIDTH))
    assert_close_scaled(run(zeros, first, negative, cfg, batch=2),
                        run(model, with_pooled_of(second, first), negative, cfg, batch=2), amplification=cfg * 3)


def test_a_soft_profile_blends_and_a_block_selection_narrows_it(family):
    model, first, second, negative, cfg = family
    layout = model_layout(model, "test", dit=True)
    plain = run(model, first, negative, cfg)
    everywhere = run(cross(model, second), first, negative, cfg)
    one = select_blocks(layout, "single.0" if layout.family == "flux" else "joint.1")
    narrowed = run(cross(model, second, layers=one), first, negative, cfg)
    for a, b in ((everywhere, plain), (narrowed, plain), (narrowed, everywhere)):
        assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["sd35", "flux"])
def test_one_call_equals_the_diffusers_binding(variant):
    """The same weights in both hosts, one model call of [cond] rows with a soft profile: ComfyUI's override equals
    the diffusers processors (x − σ·v)."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from multicond.core.diffusers_binding.dual_style import SecondPrompt
    from multicond.core.diffusers_binding.dual_style_flow import FlowCrossAttentionBlend, install_dual_text_processors
    from multicond.core.diffusers_binding.joint_style import FlowClock

    flux = variant == "flux"
    model = tiny_dit.build_flux_weighted("dev") if flux else tiny_dit.build("sd35l")
    data = tiny_dit.flux_inputs(2) if flux else tiny_dit.inputs(2)
    second = (tiny_dit.flux_conditioning if flux else tiny_dit.conditioning)(7, tokens=5)
    sigma = 0.7
    ours = (tiny_dit.apply_flux if flux else tiny_dit.apply_model)(cross(model, second), data["x"], data["context"],
                                                                     data["pooled"], sigma, [0])
    pipe = SimpleNamespace(do_classifier_free_guidance=False, scheduler=FlowMatchEulerDiscreteScheduler())
    transformer = tiny_dit.flux_transformer("dev") if flux else tiny_dit.transformer("sd35l")
    blender = FlowCrossAttentionBlend(pipe, SecondPrompt(second[0][0], second[0][1]["pooled_output"]), Profile(
        sharpness=30.0), flux, clock=FlowClock(scale=1000.0 if flux else 1.0))
    with install_dual_text_processors(transformer, blender):
        theirs = (tiny_dit.diffusers_flux_denoised if flux else tiny_dit.diffusers_denoised)(transformer, data, sigma)
    assert_close_scaled(ours, theirs)
    assert (ours - (tiny_dit.apply_flux if flux else tiny_dit.apply_model)(model, data["x"], data["context"],
                                                                          data["pooled"], sigma, [0])).abs().max() > 1e-4


@pytest.mark.parametrize("order", ["blend after style", "style after blend"])
def test_the_blend_composes_with_shared_attention_and_adain_in_either_order(family, order):
    """Each pass of the blend is a whole joint attention for the style patch below it (its text count, Flux's rotary
    rows narrowed): a ones mask is the styled batch of the positive alone; a soft profile moves it."""
    model, first, second, negative, cfg = family
    styled = style_aligned(model)
    def both(mask=None):
        return cross(styled, second, mask=mask) if order == "blend after style" else \
            style_aligned(cross(model, second, mask=mask))
    alone = run(styled, first, negative, cfg, batch=3)
    assert_close_scaled(run(both(torch.ones(HEIGHT, WIDTH)), first, negative, cfg, batch=3), alone,
                        amplification=cfg * 3)
    assert (run(both(), first, negative, cfg, batch=3) - alone).abs().max() > 1e-4
    assert (alone - run(model, first, negative, cfg, batch=3)).abs().max() > 1e-4  # the style acts at all


