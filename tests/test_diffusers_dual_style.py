"""Dual-style blending (Goldszal & Mercier) through whole tiny diffusers pipelines: the epsilon and
cross-attention blends against the original's formulas, their limits, and the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, Transformer2DModel
from PIL import Image

import multicond.core.blend as core_blend
import multicond.core.diffusers_binding.dual_style as dual_style
from multicond.core.blend import Profile, blend, profile_weights
from multicond.core.diffusers_binding import (DualContextProcessor, generate_dual_style, install_cross_attention_blend,
                                              install_epsilon_blend, tiny_pipeline, unet_layout)
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.pipeline import cfg_unet_inputs, initial_latents
from multicond.core.layers import LayerSelection, select_evenly_spaced

from .conftest import assert_close_scaled

FIRST, SECOND = "a house in a minecraft style", "a house in a van gogh style"
BLENDS = ("epsilon", "cross-attention")
INSTALL = {"epsilon": install_epsilon_blend, "cross-attention": install_cross_attention_blend}
STEPS = 3
GUIDANCE = 7.5
# A blend's UNet batch (epsilon: 3 rows) or context (cross-attention: both prompts' tokens) has another shape than
# plain sampling's, which a CPU may round differently (~1e-6 per UNet call, by kernel and thread count); CFG and
# the steps amplify it. Against plain sampling the images are equal up to that, not bit for bit.
SAMPLED = GUIDANCE * STEPS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> StableDiffusionPipeline:
    return tiny_pipeline(request.param)


def sample(pipe: StableDiffusionPipeline, method: str, weights: object = None, second: str = SECOND, height: int = 64,
           width: int = 64, **kwargs: object) -> torch.Tensor:
    return generate_dual_style(pipe, FIRST, second, method, weights, steps=STEPS, guidance_scale=GUIDANCE,
                               height=height, width=width, output_type="latent", **kwargs)


def transformer_sizes(pipe: StableDiffusionPipeline) -> tuple[dict[str, tuple[int, int]], list]:
    """Test-side record of each Transformer2DModel's input (height, width), by module path."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, path=path: sizes.__setitem__(path, tuple(args[0].shape[-2:])))
             for path, module in pipe.unet.named_modules() if isinstance(module, Transformer2DModel)]
    return sizes, hooks


def transformer_of(attn2_path: str) -> str:
    return attn2_path.split(".transformer_blocks.")[0]


# ---------------------------------------------------------------- limits

def plain_second_tokens(pipe: StableDiffusionPipeline, width: int) -> torch.Tensor:
    """Plain sampling of the second prompt's text tokens; on SDXL under the first prompt's pooled embedding,
    which the cross-attention blend keeps (it cannot be blended per token)."""
    device = pipe.unet.device
    if pipe.unet.config.addition_embed_type is None:
        return sample(pipe, "plain-second", width=width)
    _, negative, pooled, negative_pooled = pipe.encode_prompt(FIRST, device=device, do_classifier_free_guidance=True)
    second = pipe.encode_prompt(SECOND, device=device, do_classifier_free_guidance=False)[0]
    return pipe(prompt_embeds=second, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                height=64, width=width, latents=initial_latents(pipe, 1, 64, width, seed=0), output_type="latent").images


@pytest.mark.parametrize("method", BLENDS)
@pytest.mark.parametrize("value", [1.0, 0.0])
def test_a_constant_mask_gives_that_prompts_plain_image(pipe: StableDiffusionPipeline, method: str, value: float,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each blend returns its end bit for bit (torch.equal: at weight 1 (0) torch.lerp returns that end), so the
    image is that prompt's plain one, up to the rounding of the blend's other UNet shapes (SAMPLED)."""
    exact: list[bool] = []

    def spy(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = blend(first, second, weight)
        exact.append(torch.equal(out, first if value == 1.0 else second))
        return out

    monkeypatch.setattr(dual_style, "blend", spy)  # the epsilon blend's
    monkeypatch.setattr(core_blend, "blend", spy)  # dual_context_attention's
    mask = torch.full((1, 8, 12), value)
    blended = sample(pipe, method, mask, width=96)
    assert exact and all(exact)
    if value == 1.0:
        expected = sample(pipe, "plain-first", width=96)
    else:
        expected = sample(pipe, "plain-second", width=96) if method == "epsilon" else plain_second_tokens(pipe, 96)
    assert_close_scaled(blended, expected, amplification=SAMPLED)
    assert (sample(pipe, "plain-first", width=96) - sample(pipe, "plain-second", width=96)).abs().max() > 0.1


def test_cross_attention_with_the_second_prompt_equal_to_the_first_is_plain(pipe: StableDiffusionPipeline) -> None:
    """Both contexts give the same attention output, and lerp of equal ends is that end; the context is twice
    as long as plain sampling's, hence SAMPLED rather than bit for bit."""
    assert_close_scaled(sample(pipe, "cross-attention", second=FIRST), sample(pipe, "plain-first"),
                        amplification=SAMPLED)
    assert (sample(pipe, "cross-attention") - sample(pipe, "plain-first")).abs().max() > 0.1


@pytest.mark.parametrize("angle, near_first", [(0.0, "left"), (180.0, "right")])
def test_the_first_prompt_lands_where_the_direction_starts(pipe: StableDiffusionPipeline, angle: float,
                                                           near_first: str) -> None:
    blended = sample(pipe, "epsilon", Profile(angle=angle), width=96)
    first, second = sample(pipe, "plain-first", width=96), sample(pipe, "plain-second", width=96)
    columns = {"left": slice(0, 4), "right": slice(8, 12)}
    near, far = columns[near_first], columns["right" if near_first == "left" else "left"]
    assert (blended - first)[..., near].abs().mean() < 0.2 * (blended - second)[..., near].abs().mean()
    assert (blended - second)[..., far].abs().mean() < 0.2 * (blended - first)[..., far].abs().mean()


# ---------------------------------------------------------------- epsilon: the original's formulation

@pytest.mark.parametrize("width, profile", [(64, Profile()), (96, Profile(angle=30.0, center=0.4))])
def test_an_epsilon_step_is_the_originals_blend_of_two_cfg_predictions(pipe: StableDiffusionPipeline, width: int,
                                                                       profile: Profile) -> None:
    """One pipeline step with the blend equals the original's `mask e_L + (1 - mask) e_R`, where e_L and e_R
    are two separately guided predictions (the original's 4-row call), blended after CFG."""
    height = 64
    latents = initial_latents(pipe, 1, height, width, seed=0)
    outputs: list[torch.Tensor] = []
    with install_epsilon_blend(pipe, SECOND, profile):
        # Registered after the blend's hook, so it sees the [uncond, blended] output the pipeline gets.
        hook = pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
        try:
            stepped = pipe(prompt=FIRST, num_inference_steps=1, guidance_scale=GUIDANCE, height=height, width=width,
                           latents=latents, output_type="latent").images
        finally:
            hook.remove()
    assert len(outputs) == 1 and outputs[0].shape[0] == 2  # one UNet call; the pipeline saw two rows

    timestep = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        guided = {}
        for prompt in (FIRST, SECOND):
            uncond, cond = pipe.unet(torch.cat([latents, latents]), timestep,
                                     **cfg_unet_inputs(pipe, prompt, height, width)).sample.chunk(2)
            guided[prompt] = uncond + GUIDANCE * (cond - uncond)
    if profile == Profile():
        # The original: x_lin = linspace(1, 0, W), mask = sigmoid(20 (x_lin - 1/2)) per column.
        mask = torch.sigmoid(20 * (torch.linspace(1, 0, width // 8) - 0.5)).expand(height // 8, -1)
        assert_close_scaled(profile_weights(profile, height // 8, width // 8), mask)  # two sigmoid formulas
    else:
        mask = profile_weights(profile, height // 8, width // 8)
    original = mask * guided[FIRST] + (1 - mask) * guided[SECOND]

    uncond, blended = outputs[0].chunk(2)
    ours = uncond + GUIDANCE * (blended - uncond)
    # Not bitwise: blending before CFG is the same sum in another order (core.blend.blend's identity), and the
    # 3-row UNet call rounds otherwise than the two 2-row ones (uncond row included); CFG multiplies that.
    assert_close_scaled(ours, original, amplification=GUIDANCE)
    pipe.scheduler.set_timesteps(1)
    expected = pipe.scheduler.step(original, timestep, latents).prev_sample
    # The step scales the noise by ~0.01: the latent's own magnitude sets the rounding.
    assert_close_scaled(stepped, expected)


# ---------------------------------------------------------------- cross-attention: per-layer weights

def run_one_step(pipe: StableDiffusionPipeline, height: int, width: int) -> None:
    pipe(prompt=FIRST, num_inference_steps=1, guidance_scale=GUIDANCE, height=height, width=width,
         latents=initial_latents(pipe, 1, height, width, seed=0), output_type="latent")


@pytest.mark.parametrize("width", [64, 96])
def test_each_cross_attention_layer_uses_the_originals_column_weights_at_its_own_grid(
        pipe: StableDiffusionPipeline, width: int) -> None:
    """The original: w = sigmoid(30 (linspace(0, 1, W) - 1/2)) per column for the second prompt, at each layer's
    width; here W and H come from the layer's transformer input, so a non-square latent works."""
    sizes, hooks = transformer_sizes(pipe)
    try:
        with install_cross_attention_blend(pipe, SECOND) as handle:
            run_one_step(pipe, 64, width)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(handle.processors) == sum(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)
    grids = set()
    for path, processor in handle.processors.items():
        height_, width_ = sizes[transformer_of(path)]
        grids.add((height_, width_))
        original = 1 - torch.sigmoid(30 * (torch.linspace(0, 1, width_) - 0.5))
        assert processor.last_weight.shape == (1, height_ * width_, 1)
        assert_close_scaled(processor.last_weight.reshape(height_, width_), original.expand(height_, -1))
    assert len(grids) >= 2  # several resolutions
    if width != 64:
        assert all(h != w for h, w in grids)  # and none square: sqrt(N) would have failed


def test_a_mask_is_resized_to_the_latent_then_averaged_down_to_each_layer(pipe: StableDiffusionPipeline) -> None:
    mask = torch.zeros(64, 96)  # image-sized, white (first prompt) on the left half
    mask[:, :48] = 1
    sizes, hooks = transformer_sizes(pipe)
    try:
        with install_cross_attention_blend(pipe, SECOND, mask) as handle:
            run_one_step(pipe, 64, 96)
    finally:
        for hook in hooks:
            hook.remove()
    latent_columns = torch.tensor([1.0] * 6 + [0.0] * 6)  # the latent is 8 x 12
    for path, processor in handle.processors.items():
        height, width = sizes[transformer_of(path)]
        columns = latent_columns.reshape(width, -1).mean(dim=1)  # 12 -> 12, 6 or 3 columns
        assert torch.equal(processor.last_weight.reshape(height, width), columns.expand(height, -1))


def test_a_layer_selection_blends_only_its_layers(pipe: StableDiffusionPipeline) -> None:
    layout = unet_layout(pipe.unet)
    selection = select_evenly_spaced(layout, 0.5)
    expected = {layout.diffusers_path(layer).replace("attn1", "attn2") for layer in selection.layers}
    with install_cross_attention_blend(pipe, SECOND, layers=selection) as handle:
        run_one_step(pipe, 64, 64)
    assert 0 < len(expected) < len(handle.processors)
    assert {path for path, p in handle.processors.items() if p.active()} == expected
    assert all((p.last_weight is not None) == p.active() for p in handle.processors.values())
    # No layer selected: every layer attends to the first prompt only. Bit for bit what an all-ones mask gives (the
    # same kernels on the same shapes), and plain sampling up to its shorter context (SAMPLED).
    none = LayerSelection(layout.family, frozenset())
    unblended = sample(pipe, "cross-attention", layers=none)
    assert torch.equal(unblended, sample(pipe, "cross-attention", torch.ones(1, 8, 8)))
    assert_close_scaled(unblended, sample(pipe, "plain-first"), amplification=SAMPLED)


def test_a_graded_selection_is_followed_per_timestep(pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = unet_layout(pipe.unet)
    early, late = layout.layers[0], layout.layers[-1]
    pipe.scheduler.set_timesteps(2)
    first_step, second_step = (int(t) for t in pipe.scheduler.timesteps)
    graded = LayerSelection(layout.family, frozenset({early, late}), "graded",
                            schedule={first_step: {early: frozenset({"q"})}, second_step: {late: frozenset({"q", "k"})}})
    seen: list[tuple[object, int]] = []
    original = DualContextProcessor.layer_weight

    def spy(self: DualContextProcessor, *args: object) -> torch.Tensor:
        seen.append((self.layer, int(self.clock.timestep)))
        return original(self, *args)

    monkeypatch.setattr(DualContextProcessor, "layer_weight", spy)
    generate_dual_style(pipe, FIRST, SECOND, "cross-attention", steps=2, guidance_scale=GUIDANCE, height=64, width=64,
                        layers=graded, output_type="latent")
    assert seen == [(early, first_step), (late, second_step)]


# ---------------------------------------------------------------- install / remove

@pytest.mark.parametrize("method", BLENDS)
def test_remove_restores_the_unet(pipe: StableDiffusionPipeline, method: str) -> None:
    unet = pipe.unet
    processors = unet.attn_processors
    hook_counts = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in unet.modules()]
    plain = sample(pipe, "plain-first")
    handle = INSTALL[method](pipe, SECOND)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in unet.modules()] != hook_counts
    with pytest.raises(RuntimeError, match="already installed"):
        INSTALL["epsilon"](pipe, SECOND)
    run_one_step(pipe, 64, 64)
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert all(unet.attn_processors[name] is p for name, p in processors.items())
    assert not any(isinstance(p, DualContextProcessor) for p in unet.attn_processors.values())
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in unet.modules()] == hook_counts
    assert torch.equal(sample(pipe, "plain-first"), plain)
    with INSTALL[method](pipe, SECOND):  # installs again once removed
        pass
    assert torch.equal(sample(pipe, "plain-first"), plain)


def test_a_batch_that_is_not_uncond_cond_halves_raises(pipe: StableDiffusionPipeline) -> None:
    """Policy: an error, not a silent plain image. Without guidance the batch holds no uncond half."""
    for method in BLENDS:
        with INSTALL[method](pipe, SECOND), pytest.raises(ValueError, match="guidance_scale > 1"):
            pipe(prompt=FIRST, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    with pytest.raises(ValueError, match="guidance_scale must be > 1"):
        generate_dual_style(pipe, FIRST, SECOND, "epsilon", guidance_scale=1.0, steps=1)
    inputs = cfg_unet_inputs(pipe, FIRST, 64, 64)
    odd = {key: value[:1] if isinstance(value, torch.Tensor) else {k: v[:1] for k, v in value.items()}
           for key, value in inputs.items()}
    pipe._guidance_scale = GUIDANCE  # as during a guided call
    with install_epsilon_blend(pipe, SECOND), pytest.raises(ValueError, match=r"\[uncond, cond\] halves, got 1 rows"):
        pipe.unet(torch.zeros(1, 4, 8, 8), 500, **odd)


def test_bad_weights_are_refused_before_anything_is_installed(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        install_epsilon_blend(pipe, SECOND, torch.ones(1, 1, 8, 8))
    with pytest.raises(TypeError, match="Profile or a MASK"):
        install_cross_attention_blend(pipe, SECOND, [[1.0]])
    with pytest.raises(ValueError, match="method must be one of"):
        generate_dual_style(pipe, FIRST, SECOND, "pixels")
    with pytest.raises(TypeError, match="needs an SD1.x/SD2/SDXL pipeline"):
        install_epsilon_blend(pipe.unet, SECOND)  # a UNet alone cannot encode the second prompt
    assert not any(isinstance(p, DualContextProcessor) for p in pipe.unet.attn_processors.values())
    with install_epsilon_blend(pipe, SECOND):  # nothing was left claimed
        pass


# ---------------------------------------------------------------- command line

def run_cli(capsys: pytest.CaptureFixture, *args: str) -> list[Path]:
    assert main(["dual-style", "--steps", "2", *args]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    return [Path(line) for line in out.splitlines() if line.endswith(".png")]


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_cli_writes_pngs_for_both_methods(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    epsilon = run_cli(capsys, "--out", str(tmp_path), "--width", "96", "--compare")
    assert [p.name for p in epsilon] == ["epsilon-sigmoid.png", "first-a-house-in-a-minecraft-style.png",
                                         "second-a-house-in-a-van-gogh-style.png"]
    cross = run_cli(capsys, "--out", str(tmp_path), "--width", "96", "--method", "cross-attention",
                    "--direction", "top-to-bottom", "--family", "sdxl")
    assert [p.name for p in cross] == ["cross-attention-sigmoid.png"]
    for path in epsilon + cross:
        assert path.is_file() and Image.open(path).size == (96, 64)
    blended, first, second = (png(p) for p in epsilon)
    assert np.abs(blended - first).mean() > 1 and np.abs(blended - second).mean() > 1


def test_cli_white_mask_gives_the_first_prompts_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mask = tmp_path / "white.png"
    Image.new("L", (30, 20), 255).save(mask)
    for method in BLENDS:
        out = tmp_path / method
        blended, first, _ = run_cli(capsys, "--out", str(out), "--method", method, "--mask", str(mask), "--compare")
        assert blended.name == f"{method}-mask.png"
        # Equal latents up to the blend's other UNet shapes (SAMPLED); 8-bit rounding may tip a level.
        assert np.abs(png(blended) - png(first)).max() <= 1


@pytest.mark.parametrize("flags, message", [
    (["--width", "100"], "multiple of 8"),
    (["--profile", "mask"], "--profile mask needs --mask PATH"),
    (["--mask", "missing.png"], "no such file"),
    (["--mask", "NOT_AN_IMAGE"], "cannot read it as an image"),
    (["--profile", "linear", "--mask", "NOT_AN_IMAGE"], "--mask goes with --profile mask"),
    (["--cfg", "1"], "--cfg must be > 1"),
    (["--direction", "up"], "unknown direction 'up'"),
    (["--direction", "left-to-right", "--angle", "30"], "not allowed with argument"),
    (["--center", "1.5"], "--center must be in 0..1"),
])
def test_cli_rejects_a_bad_flag_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                             message: str) -> None:
    (tmp_path / "NOT_AN_IMAGE").write_text("#!/bin/sh\necho not an image\n")
    flags = [str(tmp_path / f) if f in ("missing.png", "NOT_AN_IMAGE") else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["dual-style", "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
