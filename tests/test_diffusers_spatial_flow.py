"""InfSplign on tiny diffusers SD3.5 and Flux pipelines (the seed's sd3_guidance_modular.py): the recorded maps against
an explicit softmax, the gradient reaching the latent, exactness without guidance, the guided fraction, a non-square
latent, the agreement of the latent move with the ComfyUI node's, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multicond.core.diffusers_binding import generate_spatial, tiny_dit_pipeline
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.joint_style import sd3_joint_qkv
from multicond.core.diffusers_binding.joint_style_flux import joint_qkv, rotated
from multicond.core.diffusers_binding.pipeline import row_generators
from multicond.core.diffusers_binding.spatial_flow import (FlowGuidance, flow_object_tokens, generate_spatial_flow,
                                                           install_flow_spatial_maps, seed_guided_steps)
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS
from multicond.core.diffusers_binding.tiny_dit import tiny_flux_inputs, tiny_sd3_inputs
from multicond.core.spatial import CLIP_TOKENS, SpatialSettings, flow_guided_denoised

from .conftest import assert_close_scaled

PROMPT = "a cat to the left of a dog"
TEXT = {"max_sequence_length": TINY_T5_TOKENS}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request: pytest.FixtureRequest):
    return tiny_dit_pipeline(request.param)


def is_flux(pipe) -> bool:
    return type(pipe).__name__ == "FluxPipeline"


def inputs(pipe, batch: int = 2, height: int = 8, width: int = 12, text_tokens: int = 90) -> dict[str, torch.Tensor]:
    """One transformer call's inputs; SD3 text longer than CLIP's 77 so the maps must cut it."""
    make = tiny_flux_inputs if is_flux(pipe) else tiny_sd3_inputs
    return make(batch, height=height, width=width, text_tokens=text_tokens)


def sample(pipe, settings: SpatialSettings = SpatialSettings(), **kwargs):
    options = dict(steps=6, height=64, width=64, output_type="latent", **TEXT)
    return generate_spatial_flow(pipe, PROMPT, "cat", "left of", "dog", settings, **{**options, **kwargs})


def plain(pipe, steps: int = 6, height: int = 64, width: int = 64) -> torch.Tensor:
    guidance = 3.5 if is_flux(pipe) else 7.0
    return pipe(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=row_generators(0, 1), output_type="latent", **TEXT).images


# ---------------------------------------------------------------- maps and gradient


def explicit_maps(pipe, attn, hidden: torch.Tensor, text: torch.Tensor, rotary) -> torch.Tensor:
    """The seed's explicit softmax over all joint keys, image rows x text columns (SD3: the CLIP part), head mean."""
    heads = attn.heads
    if is_flux(pipe):
        q, k, _ = joint_qkv(attn, hidden, text)
        q, k = rotated(q, rotary, heads), rotated(k, rotary, heads)
        rows, columns = slice(text.shape[1], None), slice(0, text.shape[1])
    else:
        q, k, _ = sd3_joint_qkv(attn, hidden, text)
        rows, columns = slice(0, hidden.shape[1]), slice(hidden.shape[1], hidden.shape[1] + CLIP_TOKENS)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    probs = (split(q) @ split(k).transpose(-1, -2) * (q.shape[-1] // heads) ** -0.5).softmax(dim=-1)
    return probs[:, :, rows, columns].mean(dim=1)


def test_maps_are_the_explicit_softmax_and_the_output_is_unchanged(pipe) -> None:
    transformer, call = pipe.transformer, inputs(pipe)
    seen = {}
    attn = transformer.transformer_blocks[0].attn
    hook = attn.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            before = transformer(**call, return_dict=False)[0]
            with install_flow_spatial_maps(transformer, is_flux(pipe)) as handle:
                with handle.recorder.recording(handle.early, slice(1, 2)) as maps:
                    after = transformer(**call, return_dict=False)[0]
    finally:
        hook.remove()
    assert torch.equal(before, after), "recording leaves the transformer's output alone"
    assert handle.early == (0,) and len(maps) == 1
    hidden, text = seen["hidden_states"], seen["encoder_hidden_states"]
    expected = explicit_maps(pipe, attn, hidden[1:2], text[1:2], seen.get("image_rotary_emb"))
    assert maps[0].shape == (1, 4 * 6, TINY_COLUMNS[is_flux(pipe)])
    assert_close_scaled(maps[0], expected, rel=1e-5)
    assert not any(type(processor).__name__ == "FlowMapProcessor" for processor in transformer.attn_processors.values())


TINY_COLUMNS = {False: CLIP_TOKENS, True: 90}  # SD3: the CLIP part of its 90 text tokens; Flux: all of them


def guidance_for(pipe, handle, steps: int = 10) -> FlowGuidance:
    return FlowGuidance(pipe, handle, [2, 3], [6, 7], SpatialSettings(), steps, {0}, is_flux(pipe),
                        losses=[None] * steps)


def test_the_gradient_reaches_the_latent_as_finite_differences_say(pipe) -> None:
    transformer = pipe.transformer.double()
    try:
        call = {key: value.double() if value.is_floating_point() else value for key, value in inputs(pipe).items()}
        with install_flow_spatial_maps(transformer, is_flux(pipe)) as handle:
            guidance = guidance_for(pipe, handle)
            guidance.grid = guidance.token_grid(call)
            loss, maps = guidance.guide(transformer, call, slice(None))
            move = guidance.move
            assert move.shape == call["hidden_states"].shape and move.abs().amax() > 0 and torch.isfinite(move).all()
            assert not any(p.grad is not None for p in transformer.parameters()), "no weight gradient"
            direction = move / move.norm()
            h = 1e-3  # above the float32 rounding of the quantile and of Flux's RoPE
            x = call["hidden_states"]
            shifted = [guidance.guide(transformer, {**call, "hidden_states": x + sign * h * direction},
                                      slice(None))[0].sum() for sign in (1, -1)]
        numeric = (shifted[0] - shifted[1]) / (2 * h)
        analytic = (move / 30.0 * direction).sum()  # move = 30 g at weight 1000
        assert numeric == pytest.approx(float(analytic), rel=1e-3)
        assert len(maps) == 1 and not maps[0].requires_grad and loss.shape == (2,)
    finally:
        transformer.float()


# ---------------------------------------------------------------- sampling


def test_the_guided_pass_runs_no_block_after_the_measured_ones(pipe) -> None:
    """The pipeline's own call predicts; the guided pass stops before the first block after the last measured one."""
    transformer, call = pipe.transformer, inputs(pipe)
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    ran: list[int] = []
    hooks = [block.register_forward_hook(lambda *args, number=number: ran.append(number))  # after a block has run
             for number, block in enumerate(blocks)]
    try:
        with install_flow_spatial_maps(transformer, is_flux(pipe), blocks=([0], [0])) as handle:
            guidance = guidance_for(pipe, handle)
            guidance.grid = guidance.token_grid(call)
            guidance.guide(transformer, call, slice(None))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0] and guidance.move.abs().amax() > 0


def test_weight_zero_is_the_pipelines_own_sampling_exactly(pipe) -> None:
    result = sample(pipe, SpatialSettings(weight=0))
    assert result.guided_steps == [] and torch.equal(result.images, plain(pipe))
    assert [loss is not None for loss in result.losses] == [False] * 5 + [True], "the last step's maps only"
    assert all(0 <= value <= 1 for point in result.centroids_a + result.centroids_b for value in point)


def test_only_the_guided_fraction_runs_with_autograd_and_it_moves_the_image(pipe) -> None:
    grad_calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *args: grad_calls.append(torch.is_grad_enabled()))
    try:
        unguided = sample(pipe, steps=10, start=0.2, end=0.2)
        grad_calls.clear()
        guided = sample(pipe, steps=10, start=0.2, end=0.5)
    finally:
        hook.remove()
    assert unguided.guided_steps == [] and torch.equal(unguided.images, plain(pipe, steps=10))
    assert guided.guided_steps == [2, 3, 4] and sum(grad_calls) == 3
    assert [i for i, loss in enumerate(guided.losses) if loss is not None] == [2, 3, 4, 9]
    assert not torch.equal(guided.images, unguided.images)
    assert seed_guided_steps(28, 0.0, 0.3, 1000.0) == list(range(8)), "the seed's int(28 * 0.3) steps"


def test_a_negative_prompt_guides_the_prompt_alone(pipe) -> None:
    """SD3's CFG negative, Flux's true CFG (a second transformer call per step): one guided pass per guided step, on
    the prompt's rows, so the first step's loss is the one without the negative (the same noise, the same prompt)."""
    negative = dict(negative_prompt="blurry", true_cfg_scale=3.0) if is_flux(pipe) else dict(negative_prompt="blurry")
    grad_calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *args: grad_calls.append(torch.is_grad_enabled()))
    try:
        with_negative = sample(pipe, steps=4, end=0.5, **negative)
    finally:
        hook.remove()
    without = sample(pipe, steps=4, end=0.5)
    assert with_negative.guided_steps == [0, 1] and sum(grad_calls) == 2
    assert len(grad_calls) == (4 * 2 if is_flux(pipe) else 4) + 2, "Flux: the negative's own call each step"
    assert with_negative.losses[0] == pytest.approx(without.losses[0], rel=1e-6)
    assert not torch.equal(with_negative.images, without.images), "the negative reaches the image"
    unguided = sample(pipe, SpatialSettings(weight=0), steps=4, **negative)
    own = pipe(prompt=[PROMPT], num_inference_steps=4, guidance_scale=3.5 if is_flux(pipe) else 7.0, height=64,
               width=64, generator=row_generators(0, 1), output_type="latent", **TEXT,
               **{key: [value] if key == "negative_prompt" else value for key, value in negative.items()}).images
    assert torch.equal(unguided.images, own)
    if not is_flux(pipe):
        with pytest.raises(ValueError, match="true_cfg_scale is Flux's"):
            sample(pipe, steps=1, true_cfg_scale=2.0)


def test_chosen_blocks_are_the_ones_measured(pipe) -> None:
    """`blocks` (early, late) replaces the seed's choice: the final loss is the one of the chosen block's maps."""
    seed_choice = sample(pipe, SpatialSettings(weight=0), steps=2)
    chosen = sample(pipe, SpatialSettings(weight=0), steps=2, blocks=([1], [1]))
    assert seed_choice.losses[1] != pytest.approx(chosen.losses[1], rel=1e-3), "tiny models: the seed measures block 0"
    assert torch.equal(seed_choice.images, chosen.images)
    for blocks in (([2], [0]), ([], [0]), ([0],)):
        with pytest.raises(ValueError, match=r"blocks must be two non-empty lists of (double|joint) block numbers in 0..1"):
            sample(pipe, steps=1, blocks=blocks)


def test_a_non_square_latent_and_two_images(pipe) -> None:
    result = sample(pipe, steps=4, height=64, width=96, images=2, end=0.5)
    assert result.guided_steps == [0, 1] and len(result.centroids_a) == 2 and len(result.losses[0]) == 2
    assert result.images.shape[0] == 2
    assert all(0 <= value <= 1 for point in result.centroids_a + result.centroids_b for value in point)


def test_words_are_clip_columns_on_sd3_and_t5_columns_on_flux(pipe) -> None:
    cat = flow_object_tokens(pipe, PROMPT, "cat", **TEXT)
    if is_flux(pipe):
        ids = pipe.tokenizer_2(PROMPT).input_ids
        assert [ids[i] for i in cat] == pipe.tokenizer_2("cat", add_special_tokens=False).input_ids, "no start token"
    else:
        ids = pipe.tokenizer(PROMPT).input_ids
        assert cat == [2, 3, 4] and ids[0] == pipe.tokenizer.bos_token_id, "CLIP-L, index + 1 for BOS"
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        generate_spatial_flow(pipe, PROMPT, "cat", "left of", "horse", steps=1, **TEXT)
    with pytest.raises(TypeError, match="generate_spatial_flow"):
        generate_spatial(pipe, PROMPT, "cat", "left of", "dog", steps=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        sample(pipe, steps=1, height=72)


def test_the_latent_move_is_the_ComfyUI_nodes_denoised_shift() -> None:
    """The node shifts denoised = x - sigma v by `flow_guided_denoised`; its Euler step lands where this binding's
    step-end move puts the pipeline's: x + (sigma' - sigma) v - 30 (weight / 1000) g."""
    x, v, g = torch.randn(3, 1, 4, 6, generator=torch.Generator().manual_seed(0)).unbind()
    sigma, sigma_next, weight = torch.tensor([0.8]), 0.6, 500.0
    denoised = flow_guided_denoised(x - sigma * v, sigma, sigma_next, g, weight)
    node = x + (sigma_next - sigma) * (x - denoised) / sigma
    assert_close_scaled(node, x + (sigma_next - sigma) * v - 30.0 * weight / 1000.0 * g, rel=1e-6)


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_runs_on_both_families(tmp_path: Path, capsys: pytest.CaptureFixture, family: str) -> None:
    assert main(["spatial", "--family", family, "--steps", "4", "--plain", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "centroids.json").read_text())
    assert report["family"] == family and report["end"] == 0.3
    assert report["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert report["cfg"] == {"sd3": 7.0, "flux": 3.5}[family]
    assert [entry["guided"] for entry in report["images"]] == [True, False]
    for entry in report["images"]:
        assert (tmp_path / entry["file"]).is_file() and str(tmp_path / entry["file"]) in printed
        assert entry["distance"] == pytest.approx(entry["centroid_b"][0] - entry["centroid_a"][0])


@pytest.mark.parametrize("flags,message", [
    (["--family", "sd3", "--scheduler", "ddpm"], "--scheduler ddpm is for UNets"),
    (["--family", "flux", "--size", "72"], "--size must be a positive multiple of 16"),
    (["--family", "flux", "--object-b", "horse"], "'horse' is not in the prompt"),
    (["--family", "sd3", "--start", "0.5"], "--start (0.5) must not be after --end (0.3)"),
])
def test_cli_rejects_bad_flags_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                           message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["spatial", "--steps", "1", "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and error[-1].count("error:") == 1
    assert not (tmp_path / "out" / "centroids.json").exists()
