"""A ControlNet acting only inside a mask on tiny SD3.5- and Flux-like ControlNet pipelines (token residuals)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxPipeline, SD3ControlNetModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)

from multicond.core.adapter import token_mask
from multicond.core.diffusers_binding import tiny_dit
from multicond.core.diffusers_binding.flow_pipeline import initial_flow_latents
from multicond.core.diffusers_binding.masked_control import install_masked_controlnet
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS, tiny_dit_pipeline

HEIGHT, WIDTH = 64, 96  # latent 8 x 12: a 4 x 6 token grid
TEXT = {"max_sequence_length": TINY_T5_TOKENS}


def controlnet_pipeline(family: str):
    base = tiny_dit_pipeline(family)
    if family == "sd3":
        config = {key: value for key, value in tiny_dit.tiny_sd3_config("sd35m").items() if key != "dual_attention_layers"}
        controlnet = tiny_dit._randomized(SD3ControlNetModel(**{**config, "num_layers": 1}), seed=3)
        return StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
    config = {key: value for key, value in tiny_dit.tiny_flux_config("dev").items() if key != "out_channels"}
    config.update(num_layers=1, num_single_layers=1)
    controlnet = tiny_dit._randomized(FluxControlNetModel(**config), seed=3)
    return FluxControlNetPipeline(**base.components, controlnet=controlnet)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request: pytest.FixtureRequest):
    return controlnet_pipeline(request.param)


def control_image() -> torch.Tensor:
    return torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))


def run(pipe, **call) -> torch.Tensor:
    latents = initial_flow_latents(pipe, 1, HEIGHT, WIDTH, seed=4)
    torch.manual_seed(0)  # the SD3 ControlNet pipeline samples the control image's VAE latent from the global RNG
    options = dict(num_inference_steps=2, guidance_scale=3.0, height=HEIGHT, width=WIDTH, latents=latents,
                   output_type="latent", **TEXT)
    if "control_image" not in call:
        call["control_image"] = control_image()
    return pipe("a house", **options, **call).images


def test_a_ones_mask_is_bit_identical_and_a_zeros_mask_is_no_control(pipe) -> None:
    controlled = run(pipe)
    with install_masked_controlnet(pipe, torch.ones(16, 24)):
        assert torch.equal(run(pipe), controlled)
    plain_class = StableDiffusion3Pipeline if isinstance(pipe, StableDiffusion3ControlNetPipeline) else FluxPipeline
    components = {key: value for key, value in pipe.components.items() if key != "controlnet"}
    plain = plain_class(**components)
    plain.set_progress_bar_config(disable=True)
    latents = initial_flow_latents(pipe, 1, HEIGHT, WIDTH, seed=4)
    uncontrolled = plain("a house", num_inference_steps=2, guidance_scale=3.0, height=HEIGHT, width=WIDTH,
                         latents=latents, output_type="latent", **TEXT).images
    assert not torch.equal(controlled, uncontrolled)
    with install_masked_controlnet(pipe, torch.zeros(16, 24)):
        assert torch.equal(run(pipe), uncontrolled)


def test_each_residual_is_its_tokens_times_the_token_mask(pipe) -> None:
    """A left-half mask on a non-square latent: every residual the transformer gets is the ControlNet's own times
    the mask at the 4 x 6 token grid, row-major (zero on the right three columns of tokens)."""
    mask = torch.zeros(HEIGHT // 8, WIDTH // 8)
    mask[:, : WIDTH // 16] = 1.0
    raw: list = []
    seen: list = []
    record = pipe.controlnet.register_forward_hook(lambda m, a, k, out: raw.append(out), with_kwargs=True)
    try:
        run(pipe)
        handle = install_masked_controlnet(pipe, mask)
        after = pipe.controlnet.register_forward_hook(lambda m, a, k, out: seen.append(out), with_kwargs=True)
        try:
            run(pipe)
        finally:
            after.remove()
            handle.remove()
    finally:
        record.remove()
    weights = token_mask(mask, (HEIGHT // 8, WIDTH // 8))
    assert weights.shape == (1, 24, 1) and weights.view(4, 6)[:, :3].eq(1).all() and weights.view(4, 6)[:, 3:].eq(0).all()
    # the first call of each run: raw residuals were recorded before the masking hook, masked ones after it
    for raw_part, masked_part in zip(raw[0], seen[0]):
        if raw_part is None:
            assert masked_part is None
            continue
        for residual, masked in zip(raw_part, masked_part):
            assert residual.abs().max() > 0
            assert torch.equal(masked, residual * weights)


def test_the_handle_takes_the_hooks_off(pipe) -> None:
    controlled = run(pipe)
    install_masked_controlnet(pipe, torch.zeros(4, 4)).remove()
    assert torch.equal(run(pipe), controlled)
    with pytest.raises(TypeError, match="needs an SD3/Flux ControlNet pipeline or model"):
        install_masked_controlnet(tiny_dit_pipeline("sd3"), torch.ones(4, 4))
