"""StyleAligned through whole tiny diffusers pipelines: sampling, DDIM inversion with a pinned
reference, and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from multicond.core.diffusers_binding import (StyleAlignedProcessor, encode_image, generate, invert_image,
                                              pin_reference, tiny_pipeline)
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.pipeline import cfg_unet_inputs
from multicond.core.inversion import pinned_step
from multicond.core.style import StyleAlignedArgs

from .conftest import assert_close_scaled

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat, in watercolor style", "a dog, in watercolor style", "a bird, in watercolor style"]
STEPS = 5
GUIDANCE = 7.5  # generate's default


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> StableDiffusionPipeline:
    return tiny_pipeline(request.param)


def random_image(seed: int = 0, size: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# ---------------------------------------------------------------- (d) sampling

@pytest.mark.parametrize("args", [StyleAlignedArgs(), StyleAlignedArgs(shared_score_shift=0.693, shared_score_scale=0.5)])
def test_reference_image_is_its_solo_generation_and_targets_change(pipe: StableDiffusionPipeline,
                                                                   args: StyleAlignedArgs) -> None:
    shared = generate(pipe, PROMPTS, args, steps=STEPS, output_type="np")
    alone = generate(pipe, PROMPTS[:1], None, steps=STEPS, output_type="np")
    plain = generate(pipe, PROMPTS, None, steps=STEPS, output_type="np")
    # Another UNet batch (6 rows, not 2) rounds otherwise by CPU and thread count; CFG and the steps amplify it.
    assert_close_scaled(shared[0], alone[0], amplification=GUIDANCE * STEPS)
    assert min(np.abs(shared[i] - plain[i]).mean() for i in (1, 2)) > 1e-3
    assert not any(isinstance(p, StyleAlignedProcessor) for p in pipe.unet.attn_processors.values())


def test_each_image_noise_is_independent_of_the_batch(pipe: StableDiffusionPipeline) -> None:
    """Image i gets the noise of seed + i: the plain reference is the same alone or in a batch."""
    batch = generate(pipe, PROMPTS, None, steps=2, output_type="latent")
    alone = generate(pipe, PROMPTS[:1], None, steps=2, output_type="latent", seed=0)
    assert_close_scaled(batch[0], alone[0], amplification=GUIDANCE * 2)  # 6 UNet rows vs 2, over 2 guided steps


# ---------------------------------------------------------------- (e) inversion

def test_inversion_conditions_the_unet_as_sampling_does(pipe: StableDiffusionPipeline) -> None:
    seen: list[dict] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        generate(pipe, PROMPTS[:1], None, steps=1, output_type="latent")
    finally:
        hook.remove()
    ours = cfg_unet_inputs(pipe, PROMPTS[0], 64, 64)
    torch.testing.assert_close(ours["encoder_hidden_states"], seen[0]["encoder_hidden_states"])
    if "added_cond_kwargs" in ours:
        for key in ("text_embeds", "time_ids"):
            torch.testing.assert_close(ours["added_cond_kwargs"][key], seen[0]["added_cond_kwargs"][key].float())


def test_inversion_trajectory_and_pinned_reference(pipe: StableDiffusionPipeline) -> None:
    image, steps, offset = random_image(), 8, 3
    zts = invert_image(pipe, image, "a photo", steps)
    assert zts.shape == (steps + 1, 1, 4, 8, 8)
    assert torch.equal(zts[-1], encode_image(pipe, image))
    assert (zts[0] - zts[-1]).abs().max() > 0.1  # the trajectory moved away from the image

    inputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        final = generate(pipe, ["a photo", "a cat"], StyleAlignedArgs(), steps=steps,
                         reference=pin_reference(zts, offset), output_type="latent")
    finally:
        hook.remove()
    assert len(inputs) == steps
    for step, batch in enumerate(inputs):
        expected = zts[pinned_step(step, offset)][0]
        torch.testing.assert_close(batch[0], expected)  # uncond half's reference row
        torch.testing.assert_close(batch[2], expected)  # cond half's reference row
    assert torch.equal(final[0], zts[-1][0])
    assert (final[1] - zts[-1][0]).abs().max() > 0.1  # the target is not pinned


def test_pin_offset_must_fit_the_trajectory() -> None:
    with pytest.raises(ValueError, match="pin offset"):
        pin_reference(torch.zeros(6, 1, 4, 8, 8), offset=5)


# ---------------------------------------------------------------- (f) command line

def cli(out: Path, *extra: str, prompts: list[str] | None = None) -> list[Path]:
    assert main(["style-aligned", "--prompts", *(prompts or ["a cat", "a dog", "a bird"]),
                 "--style", "in watercolor style", "--steps", "4", "--out", str(out), *extra]) == 0
    return sorted(out.glob("*.png"))


def test_cli_writes_one_png_per_prompt_and_keeps_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = cli(tmp_path / "shared")
    assert "RANDOM weights" in capsys.readouterr().out
    assert [f.name for f in files] == ["00-reference-a-cat-in-watercolor-style.png",
                                       "01-a-dog-in-watercolor-style.png", "02-a-bird-in-watercolor-style.png"]
    assert all(Image.open(f).size == (64, 64) for f in files)
    solo = cli(tmp_path / "solo", "--plain", prompts=["a cat"])
    plain = cli(tmp_path / "plain", "--plain")
    assert np.abs(png(files[0]) - png(solo[0])).max() <= 1  # the reference is its solo generation
    assert min(np.abs(png(files[i]) - png(plain[i])).mean() for i in (1, 2)) > 0.5  # the targets took its style


def test_cli_reference_image_comes_back_as_its_inversion(tmp_path: Path) -> None:
    source = tmp_path / "style.png"
    Image.fromarray(random_image(3)).save(source)
    files = cli(tmp_path / "out", "--reference-image", str(source), "--reference-prompt", "a mosaic",
                "--pin-offset", "2", prompts=["a dog"])
    assert [f.name for f in files] == ["00-reference-a-mosaic.png", "01-a-dog-in-watercolor-style.png"]
    pipe = tiny_pipeline("sd1")  # the CLI's model: same family and seed
    with torch.no_grad():
        decoded = pipe.vae.decode(encode_image(pipe, random_image(3)) / pipe.vae.config.scaling_factor).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    assert np.abs(png(files[0]) - np.asarray(expected).astype(np.int16)).max() <= 1


def test_cli_rejects_a_reference_image_without_its_prompt(tmp_path: Path) -> None:
    source = tmp_path / "style.png"
    Image.fromarray(random_image()).save(source)
    with pytest.raises(SystemExit) as exit_info:
        main(["style-aligned", "--prompts", "a dog", "--reference-image", str(source), "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_python_dash_m_multicond_runs_the_same_command(tmp_path: Path) -> None:
    """`python -m multicond` (the package's __main__) gives the images `main()` gives."""
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "multicond").symlink_to(ROOT, target_is_directory=True)
    args = ["style-aligned", "--prompts", "a cat", "a dog", "--steps", "2", "--family", "sdxl"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "path")}
    run = subprocess.run([sys.executable, "-m", "multicond", *args, "--out", str(tmp_path / "m")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert "RANDOM weights" in run.stdout
    assert main([*args, "--out", str(tmp_path / "main")]) == 0
    outside = sorted((tmp_path / "m").glob("*.png"))
    inside = sorted((tmp_path / "main").glob("*.png"))
    assert [f.name for f in outside] == [f.name for f in inside] and len(inside) == 2
    assert all(np.abs(png(a) - png(b)).max() <= 1 for a, b in zip(outside, inside))
