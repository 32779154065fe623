"""InfSplign spatial guidance through whole tiny diffusers pipelines: the object tokens, the gradient of
the loss against finite differences, the recorded layers and grids, the effect on the objects'
centroids, exactness without guidance, clean removal, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, Transformer2DModel

import multicond.core.diffusers_binding.spatial as binding
from multicond.core.diffusers_binding import (SpatialGuidance, generate_spatial, infsplign_scheduler,
                                              install_spatial_maps, object_tokens, tiny_pipeline, unet_layout)
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.pipeline import row_generators
from multicond.core.spatial import BALANCE, PRESENCE, SpatialSettings, guidance_layers

from .conftest import assert_close_scaled

PROMPT = "a cat to the left of a dog"
GUIDANCE = 7.5

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> StableDiffusionPipeline:
    return tiny_pipeline(request.param)


def timestep(pipe: StableDiffusionPipeline, steps: int = 10, index: int = 3) -> torch.Tensor:
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.timesteps[index]


def latent(images: int, height: int = 8, width: int = 12, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(images, 4, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- tokens


def test_object_tokens_of_single_and_multi_token_words() -> None:
    pipe = tiny_pipeline("sd1")  # the tiny tokenizer spells every word in characters: "dog" is 3 tokens
    tokenizer = pipe.tokenizer
    prompt = "an x to the left of a dog"
    ids = tokenizer(prompt).input_ids
    x, dog = object_tokens(pipe, prompt, "x"), object_tokens(pipe, prompt, "dog")
    assert len(x) == 1 and tokenizer.convert_ids_to_tokens([ids[x[0]]]) == ["x</w>"]
    assert len(dog) == 3 and "".join(tokenizer.convert_ids_to_tokens([ids[p] for p in dog])) == "dog</w>"
    assert dog == list(range(len(ids) - 4, len(ids) - 1)), "the last word before EOS; BOS is position 0"
    same = "a dog to the left of a dog"
    first = object_tokens(pipe, same, "dog")
    second = object_tokens(pipe, same, "dog", exclude=first)
    assert first == [2, 3, 4] and second[0] > first[-1] and len(second) == 3


def test_sdxl_object_tokens_come_from_clip_l() -> None:
    pipe = tiny_pipeline("sdxl")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second tokenizer was used")

    pipe.tokenizer_2 = refuse
    ids = pipe.tokenizer(PROMPT).input_ids
    cat = object_tokens(pipe, PROMPT, "cat")
    assert [ids[p] for p in cat] == pipe.tokenizer("cat", add_special_tokens=False).input_ids


def test_a_word_not_in_the_prompt_is_an_error_naming_it() -> None:
    pipe = tiny_pipeline("sd1")
    with pytest.raises(ValueError, match=r"'horse' is not in the prompt 'a cat to the left of a dog'"):
        object_tokens(pipe, PROMPT, "horse")
    with pytest.raises(ValueError, match=r"'cat' is not \(again"):
        object_tokens(pipe, PROMPT, "cat", exclude=object_tokens(pipe, PROMPT, "cat"))
    with pytest.raises(ValueError, match="horse"):
        generate_spatial(pipe, PROMPT, "cat", "left of", "horse", steps=1)


# ---------------------------------------------------------------- gradient


def guidance_for(pipe: StableDiffusionPipeline, handle: object, images: int, settings: SpatialSettings = SpatialSettings(),
                 width: int = 96) -> SpatialGuidance:
    return SpatialGuidance.build(pipe, handle, PROMPT, "cat", "dog", settings, images=images, height=64, width=width,
                                 guidance_scale=GUIDANCE)


def loss_and_gradient(guidance: SpatialGuidance, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_()
    with binding.frozen_weights(guidance.unet):
        loss = guidance.loss(leaf, t)[0]
        return loss.detach(), guidance.gradient(loss, leaf)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_gradient_matches_finite_differences(family: str) -> None:
    """grad . v from autograd against (L(x + hv) - L(x - hv)) / 2h, everything in float64, on a non-square latent."""
    pipe = tiny_pipeline(family).to(dtype=torch.float64)
    x = latent(2, dtype=torch.float64)
    direction = latent(2, dtype=torch.float64, seed=2)
    direction /= direction.norm()
    with install_spatial_maps(pipe) as handle:
        guidance = guidance_for(pipe, handle, images=2)
        t = timestep(pipe)
        _, grad = loss_and_gradient(guidance, x, t)
        h = 1e-4
        with torch.no_grad():
            difference = (guidance.loss(x + h * direction, t)[0].sum() - guidance.loss(x - h * direction, t)[0].sum()) / (2 * h)
    derivative = (grad.double() * direction).sum()
    assert abs(float(derivative)) > 1e-7, "a vanishing derivative would make the check empty"
    torch.testing.assert_close(derivative, difference, rtol=1e-5, atol=0)


def test_each_image_gets_its_own_gradient(pipe: StableDiffusionPipeline) -> None:
    """The summed loss's gradient for a batch of 2 is each image's gradient alone: images do not mix."""
    x = latent(2)
    with install_spatial_maps(pipe) as handle:
        t = timestep(pipe)
        both_loss, both = loss_and_gradient(guidance_for(pipe, handle, images=2), x, t)
        single = guidance_for(pipe, handle, images=1)
        for row in range(2):
            loss, alone = loss_and_gradient(single, x[row:row + 1], t)
            torch.testing.assert_close(both_loss[row:row + 1], loss, rtol=1e-5, atol=1e-7)
            assert_close_scaled(both[row:row + 1], alone, rel=1e-4)  # a gradient, through a batch of 2 vs 1
    assert not torch.allclose(both[0], both[1])


def test_a_step_against_the_gradient_lowers_the_loss(pipe: StableDiffusionPipeline) -> None:
    x = latent(2)
    with install_spatial_maps(pipe) as handle:
        guidance = guidance_for(pipe, handle, images=2)
        t = timestep(pipe)
        loss, grad = loss_and_gradient(guidance, x, t)
        rate = 0.05 / float(grad.abs().max())  # moves no latent entry by more than 0.05
        with torch.no_grad():
            lowered = guidance.loss(x - rate * grad, t)[0]
    assert (lowered < loss).all(), (loss, lowered)


def test_a_guided_prediction_is_cfg_plus_the_weighted_gradient(pipe: StableDiffusionPipeline) -> None:
    settings = SpatialSettings(weight=300.0)
    x = latent(2)
    with install_spatial_maps(pipe) as handle:
        guidance = guidance_for(pipe, handle, images=2, settings=settings)
        t = timestep(pipe)
        noise, loss, layers = guidance.guided(x, t)
        plain, _ = guidance.plain(x, t)
        expected_loss, grad = loss_and_gradient(guidance, x, t)
    torch.testing.assert_close(loss, expected_loss)
    # guided runs the uncond and cond halves as separate calls, plain as one: CFG amplifies their rounding.
    assert_close_scaled(noise, plain + settings.weight * grad, amplification=GUIDANCE)
    assert all(not layer.probs.requires_grad for layer in layers)
    assert all(parameter.requires_grad for parameter in pipe.unet.parameters()), "the flags are back"
    assert all(parameter.grad is None for parameter in pipe.unet.parameters()), "no weight got a gradient"


# ---------------------------------------------------------------- layers


def transformer_sizes(pipe: StableDiffusionPipeline) -> tuple[dict[str, tuple[int, int]], list]:
    """Test-side record of each Transformer2DModel's input (height, width), by module path."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, path=path: sizes.__setitem__(path, tuple(args[0].shape[-2:])))
             for path, module in pipe.unet.named_modules() if isinstance(module, Transformer2DModel)]
    return sizes, hooks


def test_the_recorded_layers_are_the_greenlisted_attn2_at_their_own_grids(pipe: StableDiffusionPipeline) -> None:
    layout = unet_layout(pipe.unet)
    expected = {layout.diffusers_path(layer).removesuffix("attn1") + "attn2": role
                for layer, role in guidance_layers(layout).items()}
    sizes, hooks = transformer_sizes(pipe)
    x = latent(3, height=8, width=12)  # 64 x 96 pixels: no layer's grid is square
    try:
        with install_spatial_maps(pipe) as handle:
            guidance = guidance_for(pipe, handle, images=3)
            t = timestep(pipe)
            for call in (lambda: guidance.loss(x, t)[2], lambda: guidance.plain(x, t, record=True)[1]):
                recorded = call()
                assert list(handle.recorder.maps) == list(expected) == list(handle.processors)
                for path, layer in zip(expected, recorded):
                    assert layer is handle.recorder.maps[path]
                    assert (layer.height, layer.width) == sizes[path.split(".transformer_blocks.")[0]]
                    assert layer.height != layer.width
                    assert layer.role == expected[path]
                    assert layer.probs.shape == (3, layer.height * layer.width, pipe.tokenizer.model_max_length)
                    torch.testing.assert_close(layer.probs.sum(-1), torch.ones(3, layer.height * layer.width))
    finally:
        for hook in hooks:
            hook.remove()
    roles = set(expected.values())
    assert roles == {PRESENCE, BALANCE}  # SD1: by level; SDXL: transformer_blocks.1 presence, later depths balance
    assert len({(layer.height, layer.width) for layer in recorded}) == (2 if layout.family == "sd1" else 1)


def test_recorded_cond_rows_of_a_plain_call_are_the_cond_calls_maps(pipe: StableDiffusionPipeline) -> None:
    """The final step's maps (cond rows of the batched call, no grad) are those of a guided step's cond call."""
    x = latent(2)
    with install_spatial_maps(pipe) as handle:
        guidance = guidance_for(pipe, handle, images=2)
        t = timestep(pipe)
        with torch.no_grad():
            from_cond = guidance.loss(x, t)[2]
        from_plain = guidance.plain(x, t, record=True)[1]
    for a, b in zip(from_cond, from_plain):
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- sampling


def run(pipe: StableDiffusionPipeline, settings: SpatialSettings, relation: str = "left of", steps: int = 4,
        images: int = 8, **kwargs: object):
    return generate_spatial(pipe, PROMPT, "cat", relation, "dog", settings, steps=steps, guidance_scale=GUIDANCE,
                            images=images, output_type="latent", **kwargs)


@pytest.mark.parametrize("family,relation", [("sd1", "left of"), ("sd1", "right of"), ("sdxl", "left of")])
def test_guidance_puts_the_objects_the_relations_way(family: str, relation: str) -> None:
    """8 images x 4 DDPM steps from fixed seeds: the guided final maps satisfy the relation more often than the
    unguided ones from the same noise, and every image's centroid gap moves the relation's way.

    The weight is 10x the original's 1000: the tiny model's random weights give nearly uniform maps
    (centroids within 0.01 of the middle) and gradients a hundred times smaller than a trained model's.
    """
    pipe = tiny_pipeline(family)
    pipe.scheduler = infsplign_scheduler(pipe)
    guided = run(pipe, SpatialSettings(weight=1e4), relation)
    plain = run(pipe, SpatialSettings(weight=0.0), relation)
    assert guided.guided_steps == [0, 1, 2, 3] and plain.guided_steps == []
    assert sum(guided.holds) > sum(plain.holds), (guided.distances, plain.distances)
    assert all(g > p for g, p in zip(guided.distances, plain.distances)), (guided.distances, plain.distances)
    assert all(loss is not None for loss in guided.losses) and plain.losses[:-1] == [None] * 3
    assert sum(guided.losses[-1]) < sum(plain.losses[-1])


@pytest.mark.parametrize("settings,start,end", [(SpatialSettings(weight=0.0), 0.0, 1.0), (SpatialSettings(), 0.5, 0.5)])
def test_no_guidance_is_the_pipelines_own_sampling_exactly(pipe: StableDiffusionPipeline, settings: SpatialSettings,
                                                           start: float, end: float) -> None:
    pipe.scheduler = infsplign_scheduler(pipe)  # DDPM draws step noise from the image generators too
    result = run(pipe, settings, steps=3, images=2, height=64, width=96, start=start, end=end)
    expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=GUIDANCE, num_images_per_prompt=2, height=64, width=96,
                    generator=row_generators(0, 2), output_type="latent").images
    assert torch.equal(result.images, expected)
    assert result.guided_steps == [] and len(result.centroids_a) == 2


def test_partial_range_guides_only_those_steps(pipe: StableDiffusionPipeline) -> None:
    result = run(pipe, SpatialSettings(), steps=4, images=1, start=0.25, end=0.75)
    assert result.guided_steps == [1, 2]
    assert [loss is not None for loss in result.losses] == [False, True, True, True]  # the last step records too


def installed_state(pipe: StableDiffusionPipeline) -> tuple:
    unet = pipe.unet
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())
    return dict(unet.attn_processors), hooks, [p.requires_grad for p in unet.parameters()]


def test_nothing_stays_installed_even_after_an_error(pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    first = next(pipe.unet.parameters())
    first.requires_grad_(False)  # a mixed set of flags comes back as it was
    try:
        before = installed_state(pipe)
        call = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=GUIDANCE, height=64, width=64,
                    generator=row_generators(0, 1), output_type="latent")
        plain_before = pipe(**call).images
        run(pipe, SpatialSettings(), steps=2, images=1)
        after = installed_state(pipe)
        assert after[0] == before[0] and all(after[0][k] is before[0][k] for k in before[0])
        assert after[1:] == before[1:]
        call["generator"] = row_generators(0, 1)
        assert torch.equal(pipe(**call).images, plain_before)

        def fail(*args: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(binding, "guidance_loss", fail)
        with pytest.raises(RuntimeError, match="boom"):
            run(pipe, SpatialSettings(), steps=2, images=1)
        assert installed_state(pipe)[1:] == before[1:]
        assert all(installed_state(pipe)[0][k] is before[0][k] for k in before[0])
    finally:
        first.requires_grad_(True)


def test_bad_arguments() -> None:
    pipe = tiny_pipeline("sd1")
    with pytest.raises(ValueError, match="relation"):
        generate_spatial(pipe, PROMPT, "cat", "inside", "dog", steps=1)
    with pytest.raises(ValueError, match="start and end"):
        generate_spatial(pipe, PROMPT, "cat", "left of", "dog", steps=1, start=0.6, end=0.4)
    assert generate_spatial(pipe, PROMPT, "cat", "to the left of", "dog", SpatialSettings(weight=0), steps=1,
                            output_type="latent").relation == "left of"
    with install_spatial_maps(pipe):
        with pytest.raises(RuntimeError, match="already installed"):
            install_spatial_maps(pipe)


# ---------------------------------------------------------------- command line


def test_cli_writes_images_and_centroids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["spatial", "--steps", "2", "--images", "2", "--plain", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "centroids.json").read_text())
    assert (report["object_a"], report["relation"], report["object_b"]) == ("cat", "left of", "dog")
    assert report["scheduler"] == "DDPMScheduler" and report["settings"]["weight"] == 1000.0
    assert [(entry["seed"], entry["guided"]) for entry in report["images"]] == [(0, True), (1, True), (0, False), (1, False)]
    for entry in report["images"]:
        assert (tmp_path / entry["file"]).is_file() and str(tmp_path / entry["file"]) in printed
        (ax, ay), (bx, by) = entry["centroid_a"], entry["centroid_b"]
        assert all(0 <= value <= 1 for value in (ax, ay, bx, by))
        assert entry["distance"] == pytest.approx(bx - ax) and entry["holds"] == (entry["distance"] > 0)


def test_cli_takes_the_words_given(tmp_path: Path) -> None:
    assert main(["spatial", "--prompt", "a bird over a boat", "--object-a", "bird", "--relation", "above",
                 "--object-b", "boat", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "centroids.json").read_text())
    entry = report["images"][0]
    assert report["relation"] == "above" and entry["distance"] == pytest.approx(entry["centroid_b"][1] - entry["centroid_a"][1])


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "a cat and a dog"], "no relation phrase"),
    (["--object-b", "horse"], "'horse' is not in the prompt"),
    (["--relation", "inside"], "unknown relation"),
    (["--start", "0.8", "--end", "0.2"], "--start"),
])
def test_cli_rejects_bad_input_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                                            message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["spatial", "--steps", "1", "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    if "relation phrase" in message:
        assert "--object-a" in error and "to the left of" in error
    assert not (tmp_path / "out" / "centroids.json").exists()
