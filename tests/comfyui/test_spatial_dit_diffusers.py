"""SpatialGuidance on SD3.5 and Flux: the ComfyUI node and the diffusers binding (`spatial_flow`) on the same tiny
weights take the same gradient of the seed's loss, so one guided step moves the latent by the same -s dL/dx in both
hosts (the node through `flow_guided_denoised`, whose Euler step is tests/test_diffusers_spatial_flow.py's check)."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny DiTs come from diffusers: scripts/host_venv.sh installs it")

import torch  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402

from multicond.core.diffusers_binding.flow_pipeline import pack, unpack  # noqa: E402
from multicond.core.diffusers_binding.spatial_flow import FlowGuidance, install_flow_spatial_maps  # noqa: E402
from multicond.core.diffusers_binding.tiny_dit import flux_image_ids  # noqa: E402
from multicond.core.spatial import SpatialSettings  # noqa: E402
from multicond.nodes.common import model_layout  # noqa: E402
from multicond.nodes.spatial import STEP, WRAPPER_KEY, GuidanceWrapper, StepGradient, install_joint  # noqa: E402

from . import tiny_dit  # noqa: E402

TOKENS_A, TOKENS_B = (2, 3), (6, 7)
HEIGHT, WIDTH, SIGMA, GUIDANCE = 10, 14, 0.7, 3.5  # a non-square latent: 5 x 7 tokens


def node_gradient(flux: bool, data: dict) -> torch.Tensor:
    """dL/dx of the node's guided pass on the cond rows (its APPLY_MODEL wrapper fills the step's gradient)."""
    model = tiny_dit.build_flux_weighted("dev") if flux else tiny_dit.build("sd35l")
    patched = model.clone()
    guidance = install_joint(patched, model_layout(model, "test", dit=True), SpatialSettings(), TOKENS_A, TOKENS_B,
                             1.0, 0.0)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, GuidanceWrapper(guidance))
    rows = data["x"].shape[0]
    sigmas = torch.full((rows,), SIGMA)
    step = StepGradient()
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers, "cond_or_uncond": [0],
               "sigmas": sigmas, STEP: step}
    extra = {"guidance": torch.full((rows,), GUIDANCE)} if flux else {}
    with torch.inference_mode():
        patched.model.apply_model(data["x"], sigmas, c_crossattn=data["context"], y=data["pooled"],
                                  transformer_options=options, **extra)
    return step.mean()


def diffusers_gradient(flux: bool, data: dict) -> torch.Tensor:
    """dL/dx of the binding's guided pass: its latent move is 30 dL/dx at weight 1000."""
    transformer = tiny_dit.flux_transformer("dev") if flux else tiny_dit.transformer("sd35l")
    x, rows = data["x"], data["x"].shape[0]
    call = {"hidden_states": x, "encoder_hidden_states": data["context"], "pooled_projections": data["pooled"],
            "timestep": torch.full((rows,), SIGMA if flux else 1000.0 * SIGMA)}
    if flux:
        call.update(hidden_states=pack(x), img_ids=flux_image_ids(HEIGHT // 2, WIDTH // 2),
                    txt_ids=torch.zeros(data["context"].shape[1], 3), guidance=torch.full((rows,), GUIDANCE))
    with torch.no_grad(), install_flow_spatial_maps(transformer, flux) as handle:
        guidance = FlowGuidance(None if flux else _Pipe(transformer), handle, list(TOKENS_A), list(TOKENS_B),
                                SpatialSettings(), 10, {0}, flux, losses=[None] * 10)
        guidance.grid = guidance.token_grid(call)
        guidance.guide(transformer, call, slice(None))
    gradient = guidance.move / 30.0
    return unpack(gradient, x.shape[1], HEIGHT, WIDTH) if flux else gradient


class _Pipe:
    """What `FlowGuidance` reads of an SD3 pipeline: its transformer (for the patch size)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer


@pytest.mark.parametrize("flux", [False, True], ids=["sd35l", "flux-dev"])
def test_one_guided_step_moves_the_latent_alike_in_both_hosts(flux: bool) -> None:
    make = tiny_dit.flux_inputs if flux else tiny_dit.inputs
    data = make(2, height=HEIGHT, width=WIDTH, text_tokens=9)
    expected = diffusers_gradient(flux, data)
    actual = node_gradient(flux, data)
    assert expected.abs().max() > 0 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
