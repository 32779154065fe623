"""Masked Adapter on SD3-family and Flux ControlNets: the ComfyUI node and the diffusers binding
(`install_masked_controlnet`) on the same main-transformer AND ControlNet weights give the same masked residuals and
the same model output for one call.

The ControlNets are diffusers models: an SD3 ControlNet (`SD3ControlNetModel`, loaded by the host's own
`load_controlnet_state_dict`) and a Flux InstantX ControlNet (`FluxControlNetModel`, the diffusers-format one; its
weights converted as the host's `load_controlnet_flux_instantx` converts them, at the tiny model's sizes, which the
host's detection would replace by Flux's real ones). ComfyUI attaches it with its Apply ControlNet and encodes the
hint image with a tiny VAE; diffusers gets that very hint latent (recorded at the ControlNet's input), so the
comparison starts where both hosts hold the same tensors. One sampler call at σ on a non-square latent with a
left-half effect mask, CFG 1 (the cond rows alone): ComfyUI's denoised against x − σ·v of the diffusers transformer
fed the masked residuals.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny DiTs come from diffusers: scripts/host_venv.sh installs it")

import comfy.controlnet  # noqa: E402
import comfy.latent_formats  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.ops  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxControlNetModel, SD3ControlNetModel  # noqa: E402

from multicond.core.adapter import token_mask  # noqa: E402
from multicond.core.diffusers_binding.flow_pipeline import pack, unpack  # noqa: E402
from multicond.core.diffusers_binding.masked_control import install_masked_controlnet  # noqa: E402
from multicond.core.diffusers_binding.tiny_dit import (_randomized, flux_image_ids, tiny_flux_config,  # noqa: E402
                                                       tiny_sd3_config)

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny_dit  # noqa: E402
from .test_blend_dit_diffusers import comfy_denoised  # noqa: E402
from .test_masked_adapter_dit import WIDE, apply_control, left_half, masked, recorded  # noqa: E402

SIGMA, GUIDANCE, IMAGES = 0.7, 3.5, 2
SIZE = WIDE  # a non-square latent (10 x 16): a 5 x 8 token grid
CPU = torch.device("cpu")
FAMILIES = ["sd3m", "sd35l", "flux-dev instantx"]


@dataclass
class Family:
    """One family's weights in both hosts: ComfyUI's model and ControlNet, the diffusers transformer and ControlNet."""

    name: str
    model: Any
    control: comfy.controlnet.ControlNet
    transformer: torch.nn.Module
    controlnet: torch.nn.Module

    @property
    def flux(self) -> bool:
        return self.name.startswith("flux")

    def conditioning(self, seed: int) -> list:
        return tiny_dit.flux_conditioning(seed) if self.flux else tiny_dit.conditioning(seed)


@functools.cache
def sd3_controlnet(variant: str) -> SD3ControlNetModel:
    """A one-block diffusers SD3 ControlNet shaped like the tiny `variant` (qk-norm on "sd35l")."""
    return _randomized(SD3ControlNetModel(**{**tiny_sd3_config(variant), "num_layers": 1}), seed=3)


@functools.cache
def flux_controlnet() -> FluxControlNetModel:
    """A one-double-, one-single-block diffusers Flux InstantX ControlNet (latent hint) for the tiny Flux-dev."""
    config = {key: value for key, value in tiny_flux_config("dev").items() if key != "out_channels"}
    return _randomized(FluxControlNetModel(**{**config, "num_layers": 1, "num_single_layers": 1}), seed=3)


def comfy_instantx(main: Any, source: FluxControlNetModel) -> comfy.controlnet.ControlNet:
    """`source`'s weights in ComfyUI's `ControlNetFlux`, converted as `load_controlnet_flux_instantx` does (the
    mmdit key map, then the ControlNet's own keys as they are), built at the main model's tiny sizes."""
    import comfy.ldm.flux.controlnet

    # convert_diffusers_mmdit pops the keys it maps and swaps tensors in place: it gets clones.
    clones = {key: value.clone() for key, value in source.state_dict().items()}
    converted = {**clones, **comfy.model_detection.convert_diffusers_mmdit(clones, "")}
    config = {key: value for key, value in main.model.model_config.unet_config.items()
              if key not in ("dtype", "device", "operations")}
    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, num_union_modes=0, control_latent_channels=source.config.in_channels // 4,
        operations=comfy.ops.disable_weight_init, device=CPU, dtype=torch.float32,
        **{**config, "depth": source.config.num_layers, "depth_single_blocks": source.config.num_single_layers})
    expected = model.state_dict().keys()
    assert expected <= converted.keys(), f"unmapped InstantX weights: {sorted(expected - converted.keys())[:4]}"
    model.load_state_dict({key: converted[key] for key in expected}, strict=True)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                       load_device=CPU, extra_conds=["y", "guidance"])


def family_of(name: str) -> Family:
    if name.startswith("flux"):
        main = tiny_dit.build_flux_weighted("dev")
        return Family(name, main, comfy_instantx(main, flux_controlnet()), tiny_dit.flux_transformer("dev"),
                      flux_controlnet())
    # The host's own loader takes the diffusers-format state dict (load_controlnet_mmdit).
    control = comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in sd3_controlnet(name).state_dict()
                                                           .items()})
    return Family(name, tiny_dit.build(name), control, tiny_dit.transformer(name), sd3_controlnet(name))


@dataclass
class NodeCall:
    """What ComfyUI's one call saw and gave: the ControlNet's hint latent, the residuals the model got, denoised."""

    hint: torch.Tensor
    control: dict[str, list[torch.Tensor | None]]
    denoised: torch.Tensor


@contextlib.contextmanager
def hints(control: comfy.controlnet.ControlNet) -> Iterator[list[torch.Tensor]]:
    """The hint latents ComfyUI's ControlNet model is called with (VAE-encoded and latent-format processed)."""
    seen: list[torch.Tensor] = []
    handle = control.control_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hint"].clone()), with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def node_call(family: Family, x: torch.Tensor, mask: torch.Tensor | None) -> NodeCall:
    """One sampler call of the controlled (and, with `mask`, Masked-Adapter'd) conditioning at CFG 1."""
    positive, negative = apply_control(family.control, family.conditioning(1), family.conditioning(2), size=SIZE)
    if mask is not None:
        positive, negative = masked(positive, negative, mask)
    with hints(family.control) as hint, recorded(family.model) as calls:
        denoised = comfy_denoised(family.model, positive, negative, x, SIGMA, 1.0)
    assert len(hint) == len(calls) == 1 and calls[0].rows == x.shape[0]  # the cond rows alone, in one call
    return NodeCall(hint[0], calls[0].control, denoised)


def binding_call(family: Family, x: torch.Tensor, hint: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[tuple, torch.Tensor]:
    """The diffusers ControlNet's (masked) residual lists and x − σ·v of the transformer fed them, as the SD3 and
    Flux ControlNet pipelines call both (SD3's ControlNet takes a zero pooled vector, as ComfyUI's does)."""
    rows = x.shape[0]
    context, options = family.conditioning(1)[0]
    context, pooled = context.expand(rows, -1, -1), options["pooled_output"].expand(rows, -1)
    call = {"encoder_hidden_states": context, "timestep": torch.full((rows,), SIGMA if family.flux else 1000 * SIGMA)}
    if family.flux:
        call.update(hidden_states=pack(x), pooled_projections=pooled, img_ids=flux_image_ids(*(s // 2 for s in SIZE)),
                    txt_ids=torch.zeros(context.shape[1], 3), guidance=torch.full((rows,), GUIDANCE))
        control_call = {**call, "controlnet_cond": pack(hint)}
    else:
        call.update(hidden_states=x, pooled_projections=pooled)
        control_call = {**call, "controlnet_cond": hint, "pooled_projections": torch.zeros_like(pooled)}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if mask is not None:
            stack.enter_context(install_masked_controlnet(family.controlnet, mask))
        residuals = family.controlnet(**control_call, return_dict=False)
        if family.flux:
            extra = {"controlnet_block_samples": residuals[0], "controlnet_single_block_samples": residuals[1]}
        else:
            extra = {"block_controlnet_hidden_states": residuals[0]}
        velocity = family.transformer(**call, **extra, return_dict=False)[0]
    velocity = unpack(velocity, x.shape[1], *SIZE) if family.flux else velocity
    return residuals, x - SIGMA * velocity


def residual_pairs(family: Family, node: dict, binding: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each host's residual of the first main block of each kind: SD3's joint blocks ("output" / the block list);
    Flux's double ("input" / block samples) and single blocks ("output" / single block samples)."""
    keys = ("input", "output") if family.flux else ("output",)
    return [(node[key][0], binding[index][0]) for index, key in enumerate(keys)]


def sample_latent(seed: int = 11) -> torch.Tensor:
    return torch.randn(IMAGES, 16, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_one_masked_call_is_the_same_in_both_hosts(name: str) -> None:
    """A left-half effect mask: the residuals each host's transformer receives, and its prediction, agree within
    float32 rounding; the right half's residual tokens are exactly zero in both."""
    family, x, mask = family_of(name), sample_latent(), left_half(SIZE)
    node = node_call(family, x, mask)
    residuals, denoised = binding_call(family, x, node.hint, mask)
    kept = token_mask(mask, SIZE)[0, :, 0] == 1
    assert 0 < int(kept.sum()) < kept.numel()
    pairs = residual_pairs(family, node.control, residuals)
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape and theirs[:, kept].abs().min() > 0
        assert ours[:, ~kept].eq(0).all() and theirs[:, ~kept].eq(0).all()
        assert_close_scaled(ours, theirs)
    assert_close_scaled(node.denoised, denoised)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_mask_matters_and_the_unmasked_control_agrees_too(name: str) -> None:
    """Without the Masked Adapter both hosts agree as well, and the mask moves the prediction well beyond the
    tolerance the hosts are compared at (so the masked comparison could fail)."""
    family, x = family_of(name), sample_latent(12)
    node = node_call(family, x, None)
    residuals, full = binding_call(family, x, node.hint, None)
    for ours, theirs in residual_pairs(family, node.control, residuals):
        assert_close_scaled(ours, theirs)
    assert_close_scaled(node.denoised, full)
    _, half = binding_call(family, x, node.hint, left_half(SIZE))
    assert (half - full).abs().max() > 1e-3 * full.abs().max()
