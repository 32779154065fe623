"""Style Reference Image on flow models (tiny SD3.5 and Flux.1) in a real ComfyUI: Euler inversion, the pin by σ."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny SD3 models come from diffusers: scripts/host_venv.sh installs it")

import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.core.inversion import nearest_step, pinned_step  # noqa: E402
from multicond.nodes.reference import PIN_WRAPPER_KEY, StyleReference, is_flow, style_stages  # noqa: E402
from multicond.nodes.style import OVERRIDE, AdaINStyle, SharedAttention  # noqa: E402

from . import tiny, tiny_dit, tiny_flow  # noqa: E402
from .graph import call  # noqa: E402

HEIGHT, WIDTH = 16, 12  # the latent's; the image is 8x that
BATCH = 3  # tiny_flow.sample's: a chunk (cond or uncond) of the model call
IMAGE = torch.rand(1, 8 * HEIGHT, 8 * WIDTH, 3, generator=torch.Generator().manual_seed(3))


def style_aligned(model, reference_index: int = 1):
    shared = call(SharedAttention, model=model, reference_index=reference_index, share_group_norm=False)[0]
    return call(AdaINStyle, model=shared, reference_index=reference_index)[0]


def reference(model, image=IMAGE, vae=None, **inputs):
    values = {"reference_index": 1, "inversion_steps": 8, "inversion_cfg": 1.0, "offset": 2, **inputs}
    return call(StyleReference, model=model, vae=vae or tiny_flow.FixedLatentVAE(), image=image,
                positive=tiny_dit.conditioning(1), negative=tiny_dit.conditioning(2), **values)[0]


def pin_of(model):
    return model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PIN_WRAPPER_KEY)[0]


def spy_reference_inputs(model, row: int = 1) -> list[tuple[torch.Tensor, float]]:
    """Each model call's reference rows and σ, as the model gets them (an APPLY_MODEL wrapper inside the pin's)."""
    seen: list[tuple[torch.Tensor, float]] = []

    def spy(executor, x, t, *args, **kwargs):
        seen.extend((x[start + row].clone(), float(t[start + row])) for start in range(0, x.shape[0], BATCH))
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.spy", spy)
    return seen


def test_sd3_is_a_flow_model_and_a_unet_is_not():
    assert is_flow(tiny_dit.build()) and not is_flow(tiny.build("sd15"))


def test_the_inversion_is_euler_up_the_flow_and_stays_finite_below_sigma_one(monkeypatch):
    """Trajectory: noisiest first, ends at the clean latent, each step x + Δσ·v with v = (x − D)/σ; the inversion's
    own sampler call ends below σ = 1, where ComfyUI's closing x / (1 − σ) would divide by zero."""
    returned = []
    original = comfy.sample.sample_custom
    monkeypatch.setattr(comfy.sample, "sample_custom",
                        lambda *args, **kwargs: returned.append(original(*args, **kwargs)) or returned[-1])
    model = tiny_dit.build()
    pin = pin_of(reference(model))
    assert returned and torch.isfinite(returned[0]).all() and torch.isfinite(pin.trajectory).all()
    assert pin.timesteps == [] and len(pin.sigmas) == 9 and pin.trajectory.shape == (9, 1, 16, HEIGHT, WIDTH)
    assert 0.999 < pin.sigmas[0] < 1 and pin.sigmas[-1] > 0 and pin.sigmas == sorted(pin.sigmas, reverse=True)
    with torch.inference_mode():
        clean = model.model.process_latent_in(tiny_flow.FixedLatentVAE().encode(IMAGE))
    torch.testing.assert_close(pin.trajectory[-1], clean, atol=1e-5, rtol=1e-5)
    (context, extra), = tiny_dit.conditioning(1)
    for i in (-1, -2):  # cfg 1: the prompt's prediction alone
        x, sigma, sigma_next = pin.trajectory[i], pin.sigmas[i], pin.sigmas[i - 1]
        velocity = (x - tiny_dit.apply_model(model, x, context, extra["pooled_output"], sigma, [0])) / sigma
        torch.testing.assert_close(pin.trajectory[i - 1], x + (sigma_next - sigma) * velocity, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "simple")])
def test_the_reference_row_holds_the_inverted_latent_at_the_nearest_sigma(sampler, scheduler):
    model = tiny_dit.build()
    pinned = reference(model)
    pin = pin_of(pinned)
    styled = style_aligned(pinned)
    seen = spy_reference_inputs(styled)
    out = tiny_flow.sample(styled, steps=5, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(out).all() and len(seen) >= 10  # cond and uncond rows of every call
    assert max(sigma for _, sigma in seen) == 1.0  # the first step sits at σ = 1: pinned to the top, no NaN
    for latent, sigma in seen:
        expected = pin.trajectory[pinned_step(nearest_step(sigma, pin.sigmas), pin.offset)][0]
        torch.testing.assert_close(latent, expected, atol=0, rtol=0)  # fed as is: no (σ² + 1) scaling
    unpinned = tiny_flow.sample(style_aligned(model), steps=5, sampler=sampler, scheduler=scheduler)
    assert (out[[0, 2]] - unpinned[[0, 2]]).abs().max() > 1e-3  # the targets follow the real reference


def test_offset_zero_pins_the_first_step_to_the_top_of_the_inversion():
    pinned = reference(tiny_dit.build(), offset=0)
    styled = style_aligned(pinned)
    seen = spy_reference_inputs(styled)
    out = tiny_flow.sample(styled, steps=3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(seen[0][0], pin_of(pinned).trajectory[0][0], atol=0, rtol=0)


def test_the_sd3_style_override_is_found_with_its_reference_index():
    model = tiny_dit.build()
    styled = style_aligned(model, reference_index=1)
    stages = style_stages(styled.model_options["transformer_options"])
    assert styled.model_options["transformer_options"][OVERRIDE] is not None
    assert len(stages) == 2 and {stage.reference_index for stage in stages} == {1}
    pinned = reference(model)
    with pytest.raises(InputError, match="MultiCond_StyleReference: input 'model': no Shared Attention"):
        tiny_flow.sample(pinned, steps=1)
    with pytest.raises(InputError, match="input 'reference_index': the image is pinned to row 1, but .* row 0"):
        tiny_flow.sample(style_aligned(pinned, reference_index=0), steps=1)


@pytest.mark.parametrize("order", ["reference after style", "style after reference"])
def test_an_override_set_after_the_style_and_reference_nodes_keeps_them(order):
    """A later node's own override (as 0.33.0's Model Attention Backend sets) is put beneath the style override at
    sampling; the reference check sees that chain too, whether its wrapper runs before the guard's or after."""
    from .test_override_after_pack import backend

    model = tiny_dit.build()
    if order == "reference after style":
        pinned = reference(style_aligned(model, reference_index=1))
    else:
        pinned = style_aligned(reference(model), reference_index=1)
    newcomer, calls = backend()
    after = pinned.clone()
    after.model_options["transformer_options"][OVERRIDE] = newcomer
    expected = tiny_flow.sample(pinned, steps=2)
    torch.testing.assert_close(tiny_flow.sample(after, steps=2), expected, rtol=0,
                               atol=1e-5 * float(expected.abs().max()))
    assert calls


def test_a_connected_latent_and_the_vae_are_checked_before_the_inversion_runs(monkeypatch):
    import multicond.nodes.reference as reference_module

    monkeypatch.setattr(reference_module, "invert", lambda *args, **kwargs: (_ for _ in ()).throw(
        AssertionError("the inversion ran")))
    model = tiny_dit.build()
    with pytest.raises(InputError, match="input 'latent': the latent has 4 latent channels but the model takes 16"):
        reference(model, latent={"samples": torch.zeros(2, 4, HEIGHT, WIDTH)})
    with pytest.raises(InputError, match="input 'image'.*96x128 px but the latent is 64x64 px"):
        reference(model, latent={"samples": torch.zeros(2, 16, 8, 8)})
    with pytest.raises(InputError, match="input 'reference_index': 1 is not an image of the latent batch of 1"):
        reference(model, latent={"samples": torch.zeros(1, 16, HEIGHT, WIDTH)})
    with pytest.raises(InputError, match="input 'vae': the VAE encodes 4 latent channels but the model takes 16"):
        reference(model, vae=tiny_flow.FixedLatentVAE(channels=4))


def test_flux_dev_is_inverted_on_its_own_sigmas():
    """Flux-dev (ModelSamplingFlux, timestep(σ) = σ) is inverted by the same Euler path on its own schedule."""
    import comfy.model_sampling

    from multicond.nodes.reference import invert

    model = tiny_flow.build_flux()
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux) and is_flow(model)
    positive = tiny_flow.flux_conditioning(1)
    with torch.inference_mode():
        latent = tiny_flow.FixedLatentVAE().encode(IMAGE)
        trajectory, sigmas = invert(model, latent, positive, tiny_flow.flux_conditioning(2), 6, 1.0)
        clean = model.model.process_latent_in(latent)
        x, sigma = trajectory[-1], sigmas[-1]
        denoised = model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=positive[0][0],
                                           y=positive[0][1]["pooled_output"], guidance=torch.tensor([3.5]),
                                           transformer_options={"cond_or_uncond": [0]})
    assert trajectory.shape == (7, 1, 16, HEIGHT, WIDTH) and torch.isfinite(trajectory).all()
    assert 0.999 < sigmas[0] < 1 and 0 < sigmas[-1] < 1e-2  # the "normal" schedule's smallest σ, not 0
    torch.testing.assert_close(trajectory[-1], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trajectory[-2], x + (sigmas[-2] - sigma) * (x - denoised) / sigma, atol=1e-4, rtol=1e-4)


FLUX_CFG = {"dev": 1.0, "schnell": 1.0}  # Flux.1 is distilled: cfg 1, dev's guidance rides on the prompt


def flux_reference(model, **inputs):
    values = {"reference_index": 1, "inversion_steps": 8, "inversion_cfg": 1.0, "offset": 2, **inputs}
    return call(StyleReference, model=model, vae=tiny_flow.FixedLatentVAE(), image=IMAGE,
                positive=tiny_dit.flux_conditioning(1), negative=tiny_dit.flux_conditioning(2), **values)[0]


def flux_sample(model, variant: str, steps: int = 4, **inputs) -> torch.Tensor:
    return tiny_flow.sample(model, steps=steps, cfg=FLUX_CFG[variant], positive=tiny_dit.flux_conditioning(1),
                            negative=tiny_dit.flux_conditioning(2), **inputs)


def spy_flux_inputs(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The latent the Flux model itself gets (a DIFFUSION_MODEL wrapper, inside the call stamp): x before packing."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(executor, x, timestep, *args, **kwargs):
        seen.append((x.clone(), timestep.clone()))
        return executor(x, timestep, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.flux_spy", spy)
    return seen


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("sampler,scheduler", [("euler", "simple"), ("dpmpp_2m", "beta")])
def test_the_flux_reference_row_holds_the_inverted_latent_at_the_nearest_sigma(variant, sampler, scheduler):
    """Flux.1 (cfg 1, dev with its distilled guidance): CONST sampling, so the pin feeds x_σ as is; the
    16-channel latent is pinned unpacked (the model packs it 2x2 itself), and the model gets the pinned row."""
    import comfy.model_sampling

    model = tiny_dit.build_flux_weighted(variant)
    sampling = model.get_model_object("model_sampling")
    # dev: ModelSamplingFlux; schnell: ModelSamplingDiscreteFlow with shift 1 and multiplier 1; both CONST.
    samplings = comfy.model_sampling
    family = samplings.ModelSamplingFlux if variant == "dev" else samplings.ModelSamplingDiscreteFlow
    assert isinstance(sampling, family) and isinstance(sampling, samplings.CONST) and is_flow(model)
    pinned = flux_reference(model)
    pin = pin_of(pinned)
    assert pin.timesteps == [] and len(pin.sigmas) == 9 and pin.trajectory.shape == (9, 1, 16, HEIGHT, WIDTH)
    styled = style_aligned(pinned)
    seen = spy_reference_inputs(styled)
    inside = spy_flux_inputs(styled)
    out = flux_sample(styled, variant, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(out).all() and len(seen) >= 4  # cfg 1: the cond chunk alone, every call
    assert len(inside) == len(seen) and all(x.shape == (BATCH, 16, HEIGHT, WIDTH) for x, _ in inside)
    for (latent, sigma), (x, _) in zip(seen, inside):
        expected = pin.trajectory[pinned_step(nearest_step(sigma, pin.sigmas), pin.offset)][0]
        torch.testing.assert_close(latent, expected, atol=0, rtol=0)  # fed as is: no (σ² + 1) scaling
        torch.testing.assert_close(x[1], expected, atol=0, rtol=0)  # what Flux packs is the pinned latent
    assert len({sigma for _, sigma in seen}) >= 3  # several σ: the pin follows the sampler
    unpinned = flux_sample(style_aligned(model), variant, sampler=sampler, scheduler=scheduler)
    assert (out[[0, 2]] - unpinned[[0, 2]]).abs().max() > 1e-3  # the targets follow the real reference


def test_flux_with_cfg_pins_the_reference_row_of_both_chunks():
    """Flux-dev at cfg > 1 (a negative prompt): the cond and uncond chunks each get the pinned reference row."""
    model = tiny_dit.build_flux_weighted("dev")
    pinned = flux_reference(model)
    pin = pin_of(pinned)
    styled = style_aligned(pinned)
    seen = spy_reference_inputs(styled)
    out = tiny_flow.sample(styled, steps=2, cfg=2.0, scheduler="simple", positive=tiny_dit.flux_conditioning(1),
                           negative=tiny_dit.flux_conditioning(2))
    assert torch.isfinite(out).all() and len(seen) == 4  # 2 steps x (cond, uncond)
    for latent, sigma in seen:
        expected = pin.trajectory[pinned_step(nearest_step(sigma, pin.sigmas), pin.offset)][0]
        torch.testing.assert_close(latent, expected, atol=0, rtol=0)


def test_the_flux_style_override_is_found_with_its_reference_index():
    model = tiny_dit.build_flux_weighted("dev")
    styled = style_aligned(model, reference_index=1)
    options = styled.model_options["transformer_options"]
    stages = style_stages(options)
    assert type(options[OVERRIDE]).__name__ == "FluxStylePatch"
    assert len(stages) == 2 and {stage.reference_index for stage in stages} == {1}
    pinned = flux_reference(model)
    with pytest.raises(InputError, match="MultiCond_StyleReference: input 'model': no Shared Attention"):
        flux_sample(pinned, "dev", steps=1)
    with pytest.raises(InputError, match="input 'reference_index': the image is pinned to row 1, but .* row 0"):
        flux_sample(style_aligned(pinned, reference_index=0), "dev", steps=1)
