"""Localized T2I-Adapter training on tiny diffusers pipelines, its checkpoints and resume, and the
`train-adapter` / `score-local` command lines."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers import T2IAdapter

from multicond.core.adapter import canny_edges, lf_mse_sobel, mask_features, sobel_image
from multicond.core.diffusers_binding import tiny_pipeline
from multicond.core.diffusers_binding.adapter_training import (AdapterTrainSettings, adapter_for_unet,
                                                               adapter_in_channels, encode_batch, find_samples,
                                                               load_adapter, load_example, save_adapter, train_adapter)
from multicond.core.diffusers_binding.cli_adapter import add_adapter_parsers
from multicond.core.errors import InputError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic 64x64 images (a coloured square each) with captions, and one unreadable file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = np.full((64, 64, 3), 30, np.uint8)
        x, y = rng.integers(4, 32, 2)
        pixels[y:y + 24, x:x + 24] = rng.integers(80, 255, 3)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a square number {i}\n", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request: pytest.FixtureRequest):
    return tiny_pipeline(request.param)


def family(pipe) -> str:
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd1"


def settings(images: Path, out: Path, pipe, **changes) -> AdapterTrainSettings:
    base = dict(images=images, out=out, family=family(pipe), steps=4, batch_size=2, grad_accumulation=2, warmup=1,
                checkpoint_every=2, device="cpu", seed=3)
    return AdapterTrainSettings(**{**base, **changes})


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m multicond")
    add_adapter_parsers(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.run(ns)


# ---------------------------------------------------------------- data and model

def test_samples_are_the_readable_images_with_their_captions(images: Path) -> None:
    samples = find_samples(images)
    assert [s.image.name for s in samples] == [f"{i:02d}.png" for i in range(8)]
    assert samples[3].caption == "a square number 3"


def test_masked_features_reach_the_unet_and_a_zero_mask_removes_them(pipe) -> None:
    torch.manual_seed(0)
    adapter = adapter_for_unet(pipe.unet, family(pipe))
    condition = torch.rand(2, 1, 64, 64)                         # the edge map: a canny adapter has 1 input channel
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([900, 300])
    text = encode_batch(pipe, ["a square", ""], 64)
    plain = pipe.unet(z, t, **text).sample
    features = adapter(condition)
    ones = pipe.unet(z, t, down_intrablock_additional_residuals=mask_features(features, torch.ones(64, 64)), **text).sample
    zeros = pipe.unet(z, t, down_intrablock_additional_residuals=mask_features(features, torch.zeros(64, 64)),
                      **text).sample
    assert (ones - plain).abs().max() > 1e-4
    torch.testing.assert_close(zeros, plain, rtol=0, atol=0)
    ones.square().mean().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert sum(p.grad.abs().sum() for p in adapter.parameters()) > 0


def test_the_condition_is_the_one_channel_edge_map(images: Path) -> None:
    image, condition = load_example(find_samples(images)[0], 64)
    rgb = np.asarray(Image.open(images / "00.png").convert("RGB"))
    assert image.shape == (3, 64, 64) and condition.shape == (1, 64, 64)
    assert torch.equal(condition[0], torch.from_numpy(canny_edges(rgb)).float() / 255.0)


@pytest.mark.parametrize("kind,channels", [("full_adapter", 1), ("full_adapter", 3), ("full_adapter_xl", 1),
                                           ("full_adapter_xl", 3), ("light_adapter", 1), ("light_adapter", 3)])
def test_the_input_channels_come_from_the_adapters_weights(kind: str, channels: int) -> None:
    factor = 16 if kind == "full_adapter_xl" else 8
    levels = [8, 16, 16] if kind == "light_adapter" else [8, 16, 32, 32]
    adapter = T2IAdapter(in_channels=channels, channels=levels, num_res_blocks=1, downscale_factor=factor,
                         adapter_type=kind)
    assert adapter_in_channels(adapter) == channels


# ---------------------------------------------------------------- training, checkpoints, resume

def test_training_writes_checkpoints_and_a_comfyui_readable_adapter(images: Path, pipe, tmp_path: Path) -> None:
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train_adapter(settings(images, tmp_path, pipe, steps=3), pipe=pipe)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert [p.name for p in result.checkpoints] == ["step-0000002", "step-0000003"]
    assert json.loads((result.checkpoints[0] / "trainer.json").read_text())["step"] == 2
    # The UNet is frozen: no gradients, unchanged weights.
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    # The final file: the diffusers T2IAdapter state dict, the keys ComfyUI's load_t2i_adapter detects.
    assert result.adapter_path == tmp_path / "adapter.safetensors"
    state = load_file(str(result.adapter_path))
    expected = adapter_for_unet(pipe.unet, family(pipe)).state_dict()
    assert set(state) == set(expected) and "adapter.body.0.resnets.0.block1.weight" in state
    factor = 16 if family(pipe) == "sdxl" else 8                 # 1 input channel, as the original's canny adapter
    assert state["adapter.conv_in.weight"].shape[1] == factor ** 2 and adapter_in_channels(load_adapter(tmp_path)) == 1
    assert all(state[k].shape == expected[k].shape for k in state)
    loaded = load_adapter(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_a_resumed_run_continues_as_the_uninterrupted_one(images: Path, pipe, tmp_path: Path) -> None:
    whole = train_adapter(settings(images, tmp_path / "whole", pipe), pipe=pipe)
    resumed = train_adapter(settings(images, tmp_path / "resumed", pipe,
                                     resume=str(whole.checkpoints[0])), pipe=pipe)
    assert (whole.start_step, resumed.start_step, resumed.steps) == (0, 2, 4)
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-6, abs=0)
    a, b = load_file(str(whole.adapter_path)), load_file(str(resumed.adapter_path))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    start = adapter_for_unet(pipe.unet, family(pipe))
    assert any(not torch.allclose(a[k], v) for k, v in start.state_dict().items())
    # --resume alone: the newest checkpoint of the output folder; a finished run has nothing left to do.
    again = train_adapter(settings(images, tmp_path / "whole", pipe, resume="latest"), pipe=pipe)
    assert again.start_step == 4 and again.losses == []


def test_init_adapter_feeds_the_edge_map_as_its_weights_take_it(images: Path, pipe, tmp_path: Path) -> None:
    """A 1-channel adapter (a diffusers folder, as TencentARC's canny) gets the edge map, a 3-channel one (our
    file) the map repeated: with the 3-channel conv_in made of the 1-channel one's weights / 3 per colour, the
    two see the same input, so their first losses agree; each output keeps its adapter's channels."""
    torch.manual_seed(0)
    one = adapter_for_unet(pipe.unet, family(pipe))
    one.save_pretrained(str(tmp_path / "one"))
    three = adapter_for_unet(pipe.unet, family(pipe), in_channels=3)
    state = one.state_dict()
    state["adapter.conv_in.weight"] = state["adapter.conv_in.weight"].repeat(1, 3, 1, 1) / 3  # unshuffle: c·f² + k
    three.load_state_dict(state)
    save_adapter(three, tmp_path / "three")
    results = {name: train_adapter(settings(images, tmp_path / f"out-{name}", pipe, steps=1, batch_size=1,
                                            grad_accumulation=1, init_adapter=str(tmp_path / name)), pipe=pipe)
               for name in ("one", "three")}
    assert results["three"].losses[0] == pytest.approx(results["one"].losses[0], rel=1e-5, abs=0)
    factor = 16 if family(pipe) == "sdxl" else 8
    for name, channels in (("one", 1), ("three", 3)):
        weight = load_file(str(results[name].adapter_path))["adapter.conv_in.weight"]
        assert weight.shape[1] == channels * factor ** 2
        assert adapter_in_channels(load_adapter(results[name].adapter_path)) == channels
    save_adapter(adapter_for_unet(pipe.unet, family(pipe), in_channels=2), tmp_path / "two")
    with pytest.raises(InputError, match="--init-adapter.*takes 2 input channels.*1 input channel"):
        train_adapter(settings(images, tmp_path / "out-two", pipe, steps=1, init_adapter=str(tmp_path / "two")),
                      pipe=pipe)


def test_bad_settings_name_the_option(images: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="--images.*no usable images.*same-name .txt"):
        find_samples(empty)
    pipe = tiny_pipeline("sd1")
    with pytest.raises(InputError, match="--size"):
        train_adapter(settings(images, tmp_path / "a", pipe, size=48), pipe=pipe)
    with pytest.raises(InputError, match="--resume"):
        train_adapter(settings(images, tmp_path / "b", pipe, resume="latest"), pipe=pipe)


# ---------------------------------------------------------------- command lines

def test_cli_trains_the_tiny_model(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert cli(["train-adapter", "--images", str(images), "--out", str(out), "--steps", "2", "--batch-size", "1",
                "--grad-accumulation", "1", "--warmup", "0", "--checkpoint-every", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and str(out / "adapter.safetensors") in printed
    assert (out / "checkpoints" / "step-0000001" / "trainer.json").exists()
    assert cli(["train-adapter", "--images", str(images), "--out", str(out), "--steps", "3", "--batch-size", "1",
                "--grad-accumulation", "1", "--warmup", "0", "--device", "cpu", "--resume"]) == 0
    assert "from step 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--empty-prompts", "2"], "--empty-prompts must be a fraction"),
    (["--size", "50"], "--size must be a positive multiple of 8"),
])
def test_cli_rejects_bad_options(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["train-adapter", "--images", str(images), "--out", str(tmp_path), "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_errors_on_an_empty_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli(["train-adapter", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--images" in err and "no usable images" in err and ".txt" in err


def _square_image(lo: int, hi: int, size: int = 64) -> np.ndarray:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[lo:hi, lo:hi] = 200
    return pixels


def test_score_local_matches_files_by_name_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folders = {name: tmp_path / name for name in ("generated", "conditions", "masks")}
    for folder in folders.values():
        folder.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    square = _square_image(16, 48)
    Image.fromarray(square).save(folders["generated"] / "same.png")
    Image.fromarray(np.zeros_like(square)).save(folders["generated"] / "blank.png")
    Image.fromarray(square).save(folders["generated"] / "orphan.png")
    for name in ("same", "blank"):
        Image.fromarray(canny_edges(square)).save(folders["conditions"] / f"{name}.png")
        Image.fromarray(mask).save(folders["masks"] / f"{name}.png")
    args = ["score-local", "--generated", str(folders["generated"]), "--conditions", str(folders["conditions"]),
            "--masks", str(folders["masks"]), "--condition-name", "canny"]
    assert cli(args) == 0
    report = json.loads((folders["generated"] / "local_scores.json").read_text())
    assert report["images"] == 2 and report["unmatched"] == ["orphan"]
    scores = {r["file"]: r for r in report["per_image"]}
    assert scores["same.png"]["lf_mse_in"] == 0.0 and scores["same.png"]["coincidence"] == 1.0
    assert scores["blank.png"]["coincidence"] == 0.0 and scores["blank.png"]["lf_mse_in"] > 0
    assert report["summary"]["coincidence"]["mean"] == pytest.approx(0.5)
    assert "coincidence" in capsys.readouterr().out
    # Conditions given as images: their Canny edges are taken.
    image_conditions = tmp_path / "image_conditions"
    image_conditions.mkdir()
    Image.fromarray(square).save(image_conditions / "same.png")
    out = tmp_path / "scores.json"
    assert cli(["score-local", "--generated", str(folders["generated"]), "--conditions", str(image_conditions),
                "--masks", str(folders["masks"]), "--condition-kind", "image", "--out", str(out),
                "--condition-name", "canny"]) == 0
    assert json.loads(out.read_text())["per_image"][0]["lf_mse_in"] == 0.0


def test_score_local_defaults_to_the_originals_sobel_condition_and_reads_soft_masks(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("generated", "conditions", "masks", "images")}
    for folder in folders.values():
        folder.mkdir()
    generated = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    condition = _square_image(16, 48)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:56, 8:56] = 255
    mask[8:20, 8:56] = 100                                      # a grey band over the square's top edge
    Image.fromarray(generated).save(folders["generated"] / "a.png")
    Image.fromarray(sobel_image(condition)).save(folders["conditions"] / "a.png")
    Image.fromarray(condition).save(folders["images"] / "a.png")
    Image.fromarray(mask).save(folders["masks"] / "a.png")
    base = ["score-local", "--generated", str(folders["generated"]), "--masks", str(folders["masks"])]

    def score(*extra: str) -> dict:
        out = tmp_path / f"{len(list(tmp_path.glob('*.json')))}.json"
        assert cli([*base, "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    report = score("--conditions", str(folders["conditions"]))
    assert report["condition_name"] == "sobel" and report["soft_mask"] == "threshold"
    record = report["per_image"][0]
    assert "coincidence" not in record                          # DiffCC is the canny evaluation's
    expected = lf_mse_sobel(sobel_image(generated), sobel_image(condition), mask)
    assert (record["lf_mse_in"], record["lf_mse_out"], record["lf_mse_total"]) == tuple(expected.values())
    original = score("--conditions", str(folders["conditions"]), "--soft-mask", "original")["per_image"][0]
    expected = lf_mse_sobel(sobel_image(generated), sobel_image(condition), mask, soft_mask="original")
    assert (original["lf_mse_in"], original["lf_mse_out"]) == (expected["in"], expected["out"])
    assert original["lf_mse_in"] != record["lf_mse_in"] and original["lf_mse_out"] != record["lf_mse_out"]
    # The condition given as an image: its Sobel map is taken.
    from_image = score("--conditions", str(folders["images"]), "--condition-kind", "image")["per_image"][0]
    assert from_image["lf_mse_in"] == record["lf_mse_in"]


@pytest.mark.parametrize("flag,value", [("--soft-mask", "half"), ("--condition-name", "depth")])
def test_score_local_rejects_an_unknown_choice(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str,
                                                value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["score-local", "--generated", str(tmp_path), "--conditions", str(tmp_path), "--masks", str(tmp_path),
             flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and f"invalid choice: '{value}'" in err


def test_score_local_with_nothing_matched_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("g", "c", "m"):
        (tmp_path / name).mkdir()
    Image.fromarray(_square_image(16, 48)).save(tmp_path / "g" / "a.png")
    with pytest.raises(SystemExit):
        cli(["score-local", "--generated", str(tmp_path / "g"), "--conditions", str(tmp_path / "c"),
             "--masks", str(tmp_path / "m")])
    assert "name each condition and mask as its generated image" in capsys.readouterr().err
