"""Epsilon Blend on SD3.5 and Flux-dev: the ComfyUI node and the diffusers binding (`install_flow_epsilon_blend`) on
the same tiny weights give the same blended prediction of one model call.

Both hosts see the same latent, σ, the same encoded prompts (the tiny diffusers pipeline's text encoders encode
them; ComfyUI gets the embeddings as its conditioning) and the same left/right weights. ComfyUI blends each prompt's
denoised x − σ·v per latent pixel in its masked-conditioning sum (a CALC_COND_BATCH wrapper); diffusers grows the
transformer call by the second prompt's rows and blends the velocities (on Flux, packed 2x2 per token). x − σ·v is
affine in v, so the comparison is at the level both define: ComfyUI's denoised against x − σ·v of the binding's
output, after CFG 4 on SD3.5 (a shared negative: [uncond, cond] halves) and at CFG 1 with guidance 3.5 on Flux-dev.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny DiTs come from diffusers: scripts/host_venv.sh installs it")

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import torch  # noqa: E402

from multicond.core.blend import Profile, Weights, blend, latent_weights  # noqa: E402
from multicond.core.diffusers_binding.dual_style import SecondPrompt  # noqa: E402
from multicond.core.diffusers_binding.dual_style_flow import (encode_flow_second_prompt,  # noqa: E402
                                                               install_flow_epsilon_blend)
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS, tiny_dit_pipeline  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny_dit  # noqa: E402
from .test_blend_nodes import epsilon  # noqa: E402

HEIGHT, WIDTH, SIGMA, GUIDANCE = 10, 14, 0.7, 3.5  # a non-square latent: 5 x 7 Flux tokens
IMAGES = 2
FIRST, SECOND, NEGATIVE = "a house, minecraft style", "a house, van gogh style", "blurry"
CFG = {"sd35l": 4.0, "flux-dev": 1.0}  # Flux-dev samples without an uncond: its guidance is an input


@functools.cache
def pipeline(family: str) -> Any:
    """The tiny diffusers pipeline (its text encoders) around the very transformer ComfyUI's model is built from."""
    flux = family == "flux-dev"
    pipe = tiny_dit_pipeline("flux" if flux else "sd3")
    pipe.transformer = tiny_dit.flux_transformer("dev") if flux else tiny_dit.transformer("sd35l")
    return pipe


def encoded(family: str, prompt: str) -> SecondPrompt:
    """A prompt's context `(1, tokens, width)` and pooled `(1, width)`, as the binding encodes its second prompt."""
    return encode_flow_second_prompt(pipeline(family), prompt, TINY_T5_TOKENS)


def conditioning(family: str, prompt: str) -> list:
    """The same embeddings as a ComfyUI conditioning (Flux-dev's carries its guidance)."""
    text = encoded(family, prompt)
    options = {"pooled_output": text.pooled, **({"guidance": GUIDANCE} if family == "flux-dev" else {})}
    return [[text.embeds, options]]


def comfy_denoised(model: Any, positive: list, negative: list, x: torch.Tensor, sigma: float,
                   cfg: float) -> torch.Tensor:
    """ComfyUI's (CFG'd) denoised of one sampler step at `sigma` on the latent `x` itself: a sampler function that
    calls the model once on `x` (the sampler's own noised start is ignored): conds, wrappers and CFG are the host's."""
    seen: dict[str, torch.Tensor] = {}

    def once(model_k: Any, noisy: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
             callback: Any = None, disable: Any = None) -> torch.Tensor:
        seen["denoised"] = model_k(x, sigmas[0] * x.new_ones(x.shape[0]), **(extra_args or {})).clone()
        return noisy

    with torch.inference_mode():
        comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, comfy.samplers.KSAMPLER(once),
                                   torch.tensor([sigma, 0.0]), positive, negative, torch.zeros_like(x),
                                   disable_pbar=True, seed=0)
    return seen["denoised"]


def node_denoised(family: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The Epsilon Blend node's prediction: the first and second prompts tagged, the negative shared."""
    model = tiny_dit.build_flux_weighted("dev") if family == "flux-dev" else tiny_dit.build("sd35l")
    patched, positive = epsilon(model, conditioning(family, FIRST), conditioning(family, SECOND), mask=mask)
    return comfy_denoised(patched, positive, conditioning(family, NEGATIVE), x, SIGMA, CFG[family])


def binding_denoised(family: str, x: torch.Tensor, weights: Weights | None) -> torch.Tensor:
    """x − σ·v of one transformer call with `install_flow_epsilon_blend`, CFG'd on SD3.5's [uncond, cond] halves."""
    pipe = pipeline(family)
    first = encoded(family, FIRST)
    rows = x.shape[0]
    with install_flow_epsilon_blend(pipe, SECOND, weights, TINY_T5_TOKENS):
        if family == "flux-dev":
            data = {"x": x, "context": first.embeds.expand(rows, -1, -1), "pooled": first.pooled.expand(rows, -1)}
            return tiny_dit.diffusers_flux_denoised(pipe.transformer, data, SIGMA, GUIDANCE)
        pipe._guidance_scale = CFG[family]  # what StableDiffusion3Pipeline.__call__ sets: the blend reads CFG from it
        negative = encoded(family, NEGATIVE)
        context = torch.cat([negative.embeds, first.embeds]).repeat_interleave(rows, 0)  # [uncond, cond] halves
        data = {"x": torch.cat([x, x]), "context": context,
                "pooled": torch.cat([negative.pooled, first.pooled]).repeat_interleave(rows, 0)}
        uncond, cond = tiny_dit.diffusers_denoised(pipe.transformer, data, SIGMA).chunk(2)
    return uncond + CFG[family] * (cond - uncond)  # CFG is affine: on x − σ·v as on v


def left_columns(columns: int = 5) -> torch.Tensor:
    """1 on the first `columns` latent columns: an odd count cuts Flux's 2x2 tokens, weighted per pixel in both."""
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[:, :columns] = 1.0
    return mask


@pytest.mark.parametrize("family", ["sd35l", "flux-dev"])
@pytest.mark.parametrize("weights", ["sigmoid profile", "left/right mask"])
def test_one_call_blends_alike_in_both_hosts(family: str, weights: str) -> None:
    """The node's denoised equals x − σ·v of the binding's blended call within float32 rounding (amplified by CFG)."""
    x = torch.randn(IMAGES, 16, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(11))
    mask = left_columns() if weights == "left/right mask" else None
    expected = binding_denoised(family, x, mask if mask is not None else Profile())
    actual = node_denoised(family, x, mask)
    assert actual.shape == expected.shape == x.shape
    assert_close_scaled(actual, expected, amplification=CFG[family])


@pytest.mark.parametrize("family", ["sd35l", "flux-dev"])
def test_the_blend_is_the_per_pixel_mix_of_the_two_prompts_in_both_hosts(family: str) -> None:
    """The compared blend is a real mix: it is neither prompt alone, and it is the profile's per-pixel blend of the
    two prompts' plain predictions (each host's own, equal across hosts)."""
    x = torch.randn(IMAGES, 16, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(12))
    model = tiny_dit.build_flux_weighted("dev") if family == "flux-dev" else tiny_dit.build("sd35l")
    negative = conditioning(family, NEGATIVE)
    alone = [comfy_denoised(model, conditioning(family, prompt), negative, x, SIGMA, CFG[family])
             for prompt in (FIRST, SECOND)]
    blended = binding_denoised(family, x, Profile())
    expected = blend(*alone, latent_weights(Profile(), HEIGHT, WIDTH)[:, None])
    assert_close_scaled(blended, expected, amplification=CFG[family])
    assert min(float((blended - one).abs().max()) for one in alone) > 1e-3 * float(blended.abs().max())
