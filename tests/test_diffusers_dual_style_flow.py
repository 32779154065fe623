"""Dual-style blending on tiny SD3.5- and Flux-like pipelines: the velocity blend (the paper's blend, CFG commuting,
Flux true CFG) and the cross-attention blend inside joint attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from multicond.core.blend import Profile, blend, latent_weights
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.dual_style import generate_dual_style
from multicond.core.diffusers_binding.dual_style_flow import (install_flow_cross_attention_blend,
                                                               install_flow_epsilon_blend)
from multicond.core.diffusers_binding.joint_style import dit_layout, install_style_aligned_dit
from multicond.core.diffusers_binding.joint_style_flux import flux_layout
from multicond.core.layers import select_blocks
from multicond.core.diffusers_binding.flow_pipeline import initial_flow_latents, pack, unpack
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS, tiny_dit_pipeline, tiny_pipeline

from .conftest import assert_close_scaled

TEXT = {"max_sequence_length": TINY_T5_TOKENS}
HEIGHT, WIDTH = 64, 96  # a non-square latent: 8 x 12 (Flux: 4 x 6 tokens)
FIRST, SECOND = "a house, minecraft style", "a house, van gogh style"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request: pytest.FixtureRequest):
    return tiny_dit_pipeline(request.param)


def one_step(pipe, prompt: str, guidance: float, **call) -> torch.Tensor:
    """One Euler step from σ = 1 to 0: the latent it returns is x − v, the pipeline's prediction of the image
    (unpacked on Flux)."""
    latents = initial_flow_latents(pipe, 1, HEIGHT, WIDTH, seed=3)
    out = pipe(prompt, num_inference_steps=1, guidance_scale=guidance, height=HEIGHT, width=WIDTH, latents=latents,
               output_type="latent", **TEXT, **call).images
    return unpack(out, 16, HEIGHT // 8, WIDTH // 8) if isinstance(pipe, FluxPipeline) else out


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_one_step_is_the_papers_blend_of_the_two_predictions(pipe, guidance: float) -> None:
    """x − v is affine in v: the blended step is the per-pixel blend of the two prompts' steps; under SD3's CFG (4)
    with its shared empty negative, blending before CFG is the paper's blend after it; at 1 (no CFG on SD3; Flux's
    guidance is an input) the conditional velocities are blended."""
    weight = latent_weights(Profile(), HEIGHT // 8, WIDTH // 8)[:, None]
    expected = blend(one_step(pipe, FIRST, guidance), one_step(pipe, SECOND, guidance), weight)
    with install_flow_epsilon_blend(pipe, SECOND, **TEXT):
        blended = one_step(pipe, FIRST, guidance)
    assert_close_scaled(blended, expected, amplification=guidance)


def test_flux_true_cfg_blends_before_the_shared_negative() -> None:
    """FluxPipeline with a negative prompt and true_cfg_scale > 1 calls the transformer twice a step: the negative
    call is left alone, so the blend is the blend of the two true-CFG predictions."""
    pipe = tiny_dit_pipeline("flux")
    true_cfg = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    weight = latent_weights(Profile(), HEIGHT // 8, WIDTH // 8)[:, None]
    expected = blend(one_step(pipe, FIRST, 3.5, **true_cfg), one_step(pipe, SECOND, 3.5, **true_cfg), weight)
    batches: list[int] = []
    with install_flow_epsilon_blend(pipe, SECOND, **TEXT):
        hook = pipe.transformer.register_forward_pre_hook(  # after the blend's hook: it sees the grown call
            lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        try:
            blended = one_step(pipe, FIRST, 3.5, **true_cfg)
        finally:
            hook.remove()
    assert batches == [2, 1]  # the cond call grown by the second prompt's row, the negative call as it was
    assert_close_scaled(blended, expected, amplification=3.0)


def test_the_flux_weights_are_packed_like_the_latent() -> None:
    """A hard left/right mask: every Flux token of the left half takes the first prompt's velocity, exactly."""
    pipe = tiny_dit_pipeline("flux")
    mask = torch.zeros(HEIGHT // 8, WIDTH // 8)
    mask[:, : WIDTH // 16] = 1.0
    first, second = one_step(pipe, FIRST, 3.5), one_step(pipe, SECOND, 3.5)
    with install_flow_epsilon_blend(pipe, SECOND, mask, **TEXT):
        blended = one_step(pipe, FIRST, 3.5)
    half = WIDTH // 16
    assert_close_scaled(blended[..., :half], first[..., :half])
    assert_close_scaled(blended[..., half:], second[..., half:])
    assert torch.equal(unpack(pack(blended), 16, HEIGHT // 8, WIDTH // 8), blended)


def test_the_handle_restores_the_plain_pipeline(pipe) -> None:
    before = one_step(pipe, FIRST, 4.0)
    handle = install_flow_epsilon_blend(pipe, SECOND, **TEXT)
    with pytest.raises(RuntimeError, match="already installed"):
        install_flow_epsilon_blend(pipe, SECOND, **TEXT)
    handle.remove()
    assert torch.equal(one_step(pipe, FIRST, 4.0), before)


def test_what_the_flow_blend_refuses(pipe) -> None:
    with pytest.raises(ValueError, match="the epsilon blend has none to select"):
        generate_dual_style(pipe, FIRST, SECOND, "epsilon", steps=1, layers=object(), **TEXT)
    with pytest.raises(TypeError, match="needs an SD3/SD3.5 or Flux pipeline"):
        install_flow_epsilon_blend(tiny_pipeline("sd1"), SECOND)
    with pytest.raises(ValueError, match="encode both with the same max_sequence_length"):
        with install_flow_epsilon_blend(pipe, SECOND, max_sequence_length=TINY_T5_TOKENS // 2):
            one_step(pipe, FIRST, 4.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["epsilon", "cross-attention"])
def test_the_dual_style_command_runs_on_the_tiny_dits(tmp_path: Path, family: str, method: str) -> None:
    assert main(["dual-style", "--family", family, "--method", method, "--steps", "2", "--width", "64", "--height",
                 "96", "--compare", "--out", str(tmp_path)]) == 0
    assert sorted(path.name.rsplit("-", 1)[0] for path in tmp_path.glob("*.png") if not path.name.startswith(
        ("first", "second"))) == [f"{method}"]
    assert len(list(tmp_path.glob("*.png"))) == 3


@pytest.mark.parametrize("flags, message", [
    (["--family", "flux", "--width", "72"], "--width must be a positive multiple of 16"),
    (["--family", "flux", "--cfg", "0"], "--cfg must be > 0"),
])
def test_bad_dual_style_flags_on_dits(capsys: pytest.CaptureFixture, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        main(["dual-style", *flags])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the cross-attention blend

def sampled(pipe, prompt: str, steps: int = 3, guidance: float = 4.0, **call) -> torch.Tensor:
    latents = initial_flow_latents(pipe, 2, HEIGHT, WIDTH, seed=5)
    return pipe([prompt] * 2, num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                latents=latents, output_type="latent", **TEXT, **call).images


def test_a_ones_mask_is_the_first_prompt_alone(pipe) -> None:
    """Weight 1 everywhere: the image never sees the second text and the first text never sees it either, in every
    joint attention (Flux: double and single blocks), so the run is the first prompt's (uncond rows untouched)."""
    plain = sampled(pipe, FIRST)
    with install_flow_cross_attention_blend(pipe, SECOND, torch.ones(HEIGHT // 8, WIDTH // 8), **TEXT):
        blended = sampled(pipe, FIRST)
    assert_close_scaled(blended, plain, amplification=4.0 * 3)


def test_the_blend_and_a_layer_selection_act(pipe) -> None:
    """A soft profile changes the run; blending on one block only is neither the plain run nor the full blend."""
    flux = isinstance(pipe, FluxPipeline)
    layout = flux_layout(pipe.transformer) if flux else dit_layout(pipe.transformer)
    plain = sampled(pipe, FIRST)
    with install_flow_cross_attention_blend(pipe, SECOND, **TEXT):
        everywhere = sampled(pipe, FIRST)
    with install_flow_cross_attention_blend(pipe, SECOND, layers=select_blocks(layout, "single.1" if flux else
                                                                                "joint.1"), **TEXT):
        one_block = sampled(pipe, FIRST)
    for a, b in ((everywhere, plain), (one_block, plain), (one_block, everywhere)):
        assert (a - b).abs().max() > 1e-4


def test_flux_true_cfg_negative_calls_stay_plain() -> None:
    pipe = tiny_dit_pipeline("flux")
    true_cfg = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    plain = sampled(pipe, FIRST, **true_cfg)
    with install_flow_cross_attention_blend(pipe, SECOND, torch.ones(HEIGHT // 8, WIDTH // 8), **TEXT):
        blended = sampled(pipe, FIRST, **true_cfg)
    assert_close_scaled(blended, plain, amplification=3.0 * 3)


def test_the_cross_attention_blend_restores_and_refuses(pipe) -> None:
    processors = dict(pipe.transformer.attn_processors)
    handle = install_flow_cross_attention_blend(pipe, SECOND, **TEXT)
    with pytest.raises(RuntimeError, match="already installed"):
        install_flow_epsilon_blend(pipe, SECOND, **TEXT)
    handle.remove()
    assert pipe.transformer.attn_processors == processors
    if not isinstance(pipe, FluxPipeline):
        with install_style_aligned_dit(pipe):
            with pytest.raises(RuntimeError, match="StyleAligned"):
                install_flow_cross_attention_blend(pipe, SECOND, **TEXT)


def test_under_sd3_cfg_the_second_pass_runs_on_the_cond_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """[uncond, cond] halves: the uncond rows (weight 1) are the plain call's, the cond rows the blend of a call of
    cond rows alone, and no second-text pass computes an uncond row (the ComfyUI node's `second_rows`)."""
    import multicond.core.diffusers_binding.dual_style_flow as dual_style_flow
    from multicond.core.diffusers_binding.tiny_dit import tiny_sd3_inputs

    pipe = tiny_dit_pipeline("sd3")
    call = tiny_sd3_inputs(4, height=8, width=12, text_tokens=TINY_T5_TOKENS + 77)  # [uncond x2, cond x2]
    passes: list[int] = []
    attention = dual_style_flow.sdpa_attention
    monkeypatch.setattr(dual_style_flow, "sdpa_attention", lambda q, *args: passes.append(q.shape[0]) or
                        attention(q, *args))
    with torch.no_grad():
        plain = pipe.transformer(**call, return_dict=False)[0]
        with install_flow_cross_attention_blend(pipe, SECOND, **TEXT):
            pipe._guidance_scale = 4.0  # what __call__ sets: CFG, so the call is [uncond, cond] halves
            under_cfg = pipe.transformer(**call, return_dict=False)[0]
            pipe._guidance_scale = 1.0
            cond_alone = pipe.transformer(**{key: value[2:] if value.ndim and value.shape[0] == 4 else value
                                             for key, value in call.items()}, return_dict=False)[0]
    joint = len(pipe.transformer.transformer_blocks)
    assert passes == [4, 2] * joint + [2, 2] * joint, "the second pass: the two cond rows"
    assert_close_scaled(under_cfg[:2], plain[:2])
    assert_close_scaled(under_cfg[2:], cond_alone)
    assert (under_cfg[2:] - plain[2:]).abs().max() > 1e-4
