"""StyleAligned with SD3/SD3.5 and Flux pipelines: schedule, inversion, pinning, isolation, loading (tiny DiTs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import save_file

from multicond.core.diffusers_binding.flow_pipeline import (flow_sigmas, flow_velocity, generate_flow,
                                                            initial_flow_latents, invert_flow_image,
                                                            invert_flow_latent, pack, pin_flow_reference, unpack)
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.pipeline import load_checkpoint
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS, tiny_dit_pipeline
from multicond.core.errors import InputError
from multicond.core.inversion import pinned_step

FAMILIES = ("sd3", "flux")
TEXT = {"max_sequence_length": TINY_T5_TOKENS}
SIZE = 64
PROMPTS = ["a toy train", "a toy car", "a toy boat"]


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request: pytest.FixtureRequest) -> StableDiffusion3Pipeline | FluxPipeline:
    return tiny_dit_pipeline(request.param, seed=0)


def image(seed: int = 0, side: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def close(a: torch.Tensor, b: torch.Tensor, relative: float = 1e-5) -> bool:
    """Equal up to float32 rounding, scaled to the magnitudes compared."""
    return float((a - b).abs().max()) <= relative * max(1.0, float(b.abs().max()))


def step_recorder(pipe) -> tuple[list[float], list[torch.Tensor], object]:
    """The σ schedule and each step's output latents, from the pipeline's own step callback."""
    sigmas: list[float] = []
    latents: list[torch.Tensor] = []

    def callback(pipeline, step, timestep, tensors):
        if not sigmas:
            sigmas.extend(float(s) for s in pipeline.scheduler.sigmas[:-1])
        latents.append(tensors["latents"].clone())
        return tensors

    return sigmas, latents, callback


@pytest.mark.parametrize("height, width", [(64, 64), (64, 128)])
def test_the_schedule_is_the_pipelines_own(pipe, height: int, width: int) -> None:
    """The inversion walks the σ the pipeline samples with (Flux: shifted by its token count)."""
    sigmas, _, callback = step_recorder(pipe)
    pipe("a", num_inference_steps=5, height=height, width=width, output_type="latent", callback_on_step_end=callback,
         **TEXT)
    assert flow_sigmas(pipe, 5, height, width) == pytest.approx(sigmas, abs=1e-7)


def test_flux_packing_is_the_pipelines_and_inverts() -> None:
    latents = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack(pack(latents), 16, 8, 12), latents)


def test_the_inversion_velocity_is_the_pipelines_prediction(pipe) -> None:
    """One pipeline step from z at σ0 moves by (σ1 − σ0)·v(z, σ0): the inversion's v (SD3 with CFG on the empty
    negative, Flux with its guidance embedded) is that v."""
    guidance = 3.0
    _, latents, callback = step_recorder(pipe)
    start = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    flux = isinstance(pipe, FluxPipeline)
    pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=guidance, height=SIZE, width=SIZE,
         latents=pack(start) if flux else start, output_type="latent", callback_on_step_end=callback, **TEXT)
    after = unpack(latents[0], 16, 8, 8) if flux else latents[0]
    sigma_0, sigma_1 = flow_sigmas(pipe, 3, SIZE, SIZE)[:2]
    velocity = flow_velocity(pipe, start, PROMPTS[0], guidance, TINY_T5_TOKENS)(start, sigma_0)
    assert close((after - start) / (sigma_1 - sigma_0), velocity, 1e-4)


def test_the_trajectory_is_euler_up_the_flow(pipe) -> None:
    """zts[i] = zts[i+1] + (σ_i − σ_{i+1})·v(zts[i+1], σ_{i+1}); it ends at the latent itself, twice (the clean
    latent is taken at the smallest σ, and it is what the last step must reach)."""
    steps = 4
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    zts = invert_flow_latent(pipe, latent, "a photo", steps, 2.0, TINY_T5_TOKENS)
    sigmas = flow_sigmas(pipe, steps, SIZE, SIZE)
    assert zts.shape == (steps + 1, 1, 16, 8, 8)
    assert torch.equal(zts[-1], latent) and torch.equal(zts[-2], latent)
    velocity = flow_velocity(pipe, latent, "a photo", 2.0, TINY_T5_TOKENS)
    for i in (0, steps - 2):
        expected = zts[i + 1] + (sigmas[i] - sigmas[i + 1]) * velocity(zts[i + 1], sigmas[i + 1])
        assert close(zts[i], expected)


def transformer_inputs(pipe) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["hidden_states"].detach().clone())

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("offset", [0, 2])
def test_the_reference_row_is_held_on_the_trajectory(pipe, offset: int) -> None:
    """The reference row enters step s as zts[pinned_step(s)] (every CFG half on SD3) and ends as the latent."""
    steps = 4
    zts = invert_flow_image(pipe, image(), "a photo", steps, 2.0, TINY_T5_TOKENS)
    reference = pin_flow_reference(pipe, zts, offset)
    seen, hook = transformer_inputs(pipe)
    try:
        out = generate_flow(pipe, ["a photo", *PROMPTS[:2]], steps=steps, guidance_scale=3.0, height=SIZE, width=SIZE,
                            reference=reference, output_type="latent", **TEXT)
    finally:
        hook.remove()
    reference_rows = (0, 3) if isinstance(pipe, StableDiffusion3Pipeline) else (0,)  # [uncond, cond] under CFG
    assert len(seen) == steps
    for step, batch in enumerate(seen):
        for row in reference_rows:
            assert torch.equal(batch[row], reference.zts[pinned_step(step, offset)][0])
    assert torch.equal(out[0], reference.zts[-1][0])


def test_the_pin_does_not_reach_other_rows_without_style(pipe) -> None:
    """Sampled plainly, the targets are the same with or without a pinned reference row beside them."""
    reference = pin_flow_reference(pipe, invert_flow_image(pipe, image(), "a photo", 3, 2.0, TINY_T5_TOKENS), 0)
    common = dict(steps=3, guidance_scale=3.0, height=SIZE, width=SIZE, output_type="latent", **TEXT)
    pinned = generate_flow(pipe, ["a photo", *PROMPTS[:2]], None, reference=reference, **common)
    free = generate_flow(pipe, ["a photo", *PROMPTS[:2]], None, **common)
    assert close(pinned[1:], free[1:], 1e-6)
    assert not close(pinned[0], free[0], 1e-3)


def test_the_reference_renders_as_alone_and_the_targets_take_its_style(pipe) -> None:
    """At the defaults (the reference isolated, AlignedGen's constrain_first) row 0 is the plain row 0; the targets
    change; the processors are restored afterwards."""
    processors = dict(pipe.transformer.attn_processors)
    common = dict(steps=3, guidance_scale=3.0, height=SIZE, width=SIZE, output_type="latent", **TEXT)
    styled = generate_flow(pipe, PROMPTS, **common)
    plain = generate_flow(pipe, PROMPTS, None, **common)
    assert close(styled[0], plain[0], 1e-5)
    assert not close(styled[1:], plain[1:], 1e-3)
    assert pipe.transformer.attn_processors == processors


def test_sd3_shares_within_one_chunk_without_cfg() -> None:
    """guidance_scale 1: StableDiffusion3Pipeline runs no uncond rows, so the batch is one chunk."""
    pipe = tiny_dit_pipeline("sd3")
    common = dict(steps=2, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="latent", **TEXT)
    styled, plain = generate_flow(pipe, PROMPTS, **common), generate_flow(pipe, PROMPTS, None, **common)
    assert close(styled[0], plain[0], 1e-5) and not close(styled[1:], plain[1:], 1e-3)


def test_a_reference_of_another_size_is_refused(pipe) -> None:
    reference = pin_flow_reference(pipe, invert_flow_image(pipe, image(side=96), "a photo", 2, 2.0, TINY_T5_TOKENS), 0)
    with pytest.raises(ValueError, match="invert the reference image at the generation size"):
        initial_flow_latents(pipe, 2, SIZE, SIZE, 0, reference)


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("family", FAMILIES)
def test_a_diffusers_folder_loads_offline_with_its_flow_scheduler(tmp_path: Path, family: str) -> None:
    tiny_dit_pipeline(family).save_pretrained(tmp_path)
    pipe = load_checkpoint(tmp_path, family)
    assert type(pipe) is (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    other = "flux" if family == "sd3" else "sd1"
    with pytest.raises(InputError, match=f"'--family': {other}, but .* holds an {family} model. Add --family {family}"):
        load_checkpoint(tmp_path, other)


def test_another_pipeline_folder_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(InputError, match="holds a WanPipeline"):
        load_checkpoint(tmp_path, "sd3")


@pytest.mark.parametrize("key, kind", [("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3/SD3.5"),
                                       ("double_blocks.0.img_attn.qkv.weight", "Flux.1")])
def test_a_dit_single_file_asks_for_its_diffusers_folder(tmp_path: Path, key: str, kind: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(3, 1)}, str(path))
    with pytest.raises(InputError, match=f"holds an {kind} model as a single file") as caught:
        load_checkpoint(path, "flux")
    assert "diffusers model folder" in caught.value.fix


# ---------------------------------------------------------------- the style-aligned command

def run_cli(tmp_path: Path, capsys: pytest.CaptureFixture, *flags: str) -> tuple[list[Path], str]:
    assert main(["style-aligned", "--steps", "2", "--prompts", "a cat", "a dog", "--out", str(tmp_path), *flags]) == 0
    return sorted(tmp_path.glob("*.png")), capsys.readouterr().out


@pytest.mark.parametrize("family, shared", [("sd3", "2 of 2 attention layers"), ("flux", "2 of 4 attention layers "
                                                                                         "(single)")])
def test_the_command_runs_on_the_tiny_dits(tmp_path: Path, capsys: pytest.CaptureFixture, family: str,
                                           shared: str) -> None:
    files, out = run_cli(tmp_path, capsys, "--family", family)
    assert [f.name[:3] for f in files] == ["00-", "01-"] and "reference" in files[0].name
    assert Image.open(files[0]).size == (SIZE, SIZE)
    assert f"StyleAligned on {shared}" in out and "--share-group-norm has no counterpart" in out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_takes_a_reference_image(tmp_path: Path, capsys: pytest.CaptureFixture, family: str) -> None:
    source = tmp_path / "source.png"
    image(side=80).save(source)
    files, out = run_cli(tmp_path / "out", capsys, "--family", family, "--reference-image", str(source),
                         "--reference-prompt", "a photo", "--pin-offset", "1")
    assert len(files) == 3 and "reference-a-photo" in files[0].name and "reference: 'a photo'" in out


def test_blocks_pick_the_shared_layers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, out = run_cli(tmp_path, capsys, "--family", "flux", "--blocks", "double.1, single.0", "--no-share-group-norm")
    assert "StyleAligned on 2 of 4 attention layers (double.1, single.0)" in out and "GroupNorm" not in out


@pytest.mark.parametrize("flags, message", [
    (["--family", "flux", "--blocks", "joint.1"], "--blocks 'joint.1' names no self-attention layer of this flux "
                                                  "model. Use blocks the model has: double.0-double.1, single.0-single.1"),
    (["--family", "sd1", "--blocks", "joint.1"], "--blocks picks SD3/Flux attention blocks"),
    (["--family", "flux", "--size", "72"], "--size must be a multiple of 16 on Flux"),
    (["--family", "flux", "--only-self-level", "0.5"], "--only-self-level does not pick Flux layers"),
    (["--family", "sd3", "--full-attention-share"], "--full-attention-share has no joint-attention form"),
    (["--family", "sd1", "--cfg", "1"], "--cfg must be > 1"),
])
def test_bad_dit_flags_are_one_line_usage_errors(capsys: pytest.CaptureFixture, flags: list[str],
                                                 message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["style-aligned", "--steps", "1", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
