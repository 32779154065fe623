"""StyleAligned through whole tiny diffusers pipelines: sampling, DDIM inversion with a pinned
reference, the command line, and single-file checkpoints loaded offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from multicond.core.diffusers_binding import (StyleAlignedProcessor, encode_image, generate, invert_image,
                                              pin_reference, tiny_pipeline)
from multicond.core.diffusers_binding import pipeline as loading
from multicond.core.diffusers_binding.cli import main
from multicond.core.diffusers_binding.pipeline import (cfg_unet_inputs, checkpoint_kind, checkpoint_shapes,
                                                       family_configs, find_tokenizer, load_checkpoint)
from multicond.core.diffusers_binding.tiny import ADD_TIME_WIDTH, sd_scheduler, tiny_sdxl_unet, tiny_tokenizer, tiny_vae
from multicond.core.errors import InputError
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


# ---------------------------------------------------------------- (g) single-file checkpoints, offline
# The tests write tiny pipelines in the original (LDM) single-file layout: the renames below are the
# inverse of what diffusers' single-file conversion reads.

RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION_NAMES = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out."))
OPEN_CLIP_NAMES = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
# Parameter counts of the released models (SD1.5, SDXL base 1.0): the shipped configs must rebuild them.
RELEASED_PARAMETERS = {("sd1", "unet"): 859_520_964, ("sdxl", "unet"): 2_567_463_684, ("sd1", "vae"): 83_653_863,
                       ("sdxl", "vae"): 83_653_863, ("sd1", "text_encoder"): 123_060_480,
                       ("sdxl", "text_encoder"): 123_060_480, ("sdxl", "text_encoder_2"): 694_659_840}


def unet_prefixes(config: Any) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) of every UNet part: SD's input/middle/output block numbering."""
    layers = config.layers_per_block
    names = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(len(config.down_block_types)):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            names += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.")]
        names.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
    for i, kind in enumerate(config.up_block_types):
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            names += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.")]
        slot = 2 if kind.startswith("CrossAttn") else 1  # the upsampler follows the attention when there is one
        names.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv."))
    return names


def renamed(name: str, pairs: Sequence[tuple[str, str]]) -> str:
    """`name` with its first matching prefix replaced."""
    return next((new + name[len(old):] for old, new in pairs if name.startswith(old)), name)


def ldm_unet(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    resnet = [(ours + ".", theirs + ".") for ours, theirs in RESNET_NAMES]
    out = {}
    for name, value in unet.state_dict().items():
        ours, theirs = next(pair for pair in unet_prefixes(unet.config) if name.startswith(pair[0]))
        rest = name[len(ours):]
        out["model.diffusion_model." + theirs + (renamed(rest, resnet) if ".resnets." in ours else rest)] = value
    return out


def ldm_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.down_block_types)
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(blocks):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")]
    out = {}
    for name, value in vae.state_dict().items():
        ldm = renamed(name, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in ldm:
            head, tail = ldm.split(".mid.attn_1.")
            ldm = f"{head}.mid.attn_1.{renamed(tail, VAE_ATTENTION_NAMES)}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # the original's 1x1 convolutions
        out["first_stage_model." + ldm] = value
    return out


def ldm_clip(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIP text keys under the original's prefix, with the text_model. that transformers 5.6 drops."""
    return {prefix + (name if name.startswith("text_model.") else "text_model." + name): value
            for name, value in text_encoder.state_dict().items()}


def ldm_open_clip(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's layout: fused q/k/v, `positional_embedding`, a transposed `text_projection`."""
    state = text_encoder.state_dict()
    out = {prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
           prefix + "text_projection": state["text_projection.weight"].T}
    for layer in range(text_encoder.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([state[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for name, ldm in OPEN_CLIP_NAMES:
                out[f"{theirs}{ldm}.{kind}"] = state[f"{ours}{name}.{kind}"]
    return out


def ldm_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """A pipeline's weights as an original single-file SD1.x or SDXL checkpoint."""
    out = {**ldm_unet(pipe.unet), **ldm_vae(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(ldm_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        out.update(ldm_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        out.update(ldm_clip(pipe.text_encoder, "cond_stage_model.transformer."))
    return {name: value.contiguous() for name, value in out.items()}


def wide_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """The tiny SDXL with a wider second text encoder: diffusers tells CLIP-L from OpenCLIP by width, as in SDXL."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)

        def text_config(width: int) -> CLIPTextConfig:
            return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                  projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

        unet = UNet2DConditionModel.from_config(tiny_sdxl_unet().config, cross_attention_dim=32 + 48,
                                                projection_class_embeddings_input_dim=48 + 6 * ADD_TIME_WIDTH)
        return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(32)),
                                         text_encoder_2=CLIPTextModelWithProjection(text_config(48)),
                                         tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet,
                                         scheduler=sd_scheduler(), add_watermarker=False)


def write_single_file(pipe: Any, folder: Path, name: str) -> tuple[Path, Path, Path]:
    """The checkpoint, a diffusers-layout config folder and a tokenizer folder (vocab.json, merges.txt) of `pipe`."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"{name}.safetensors"
    save_file(ldm_checkpoint(pipe), checkpoint)
    configs = folder / f"{name}-configs"
    pipe.save_config(configs)
    for component in ("unet", "vae", "scheduler"):
        getattr(pipe, component).save_config(configs / component)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).config.save_pretrained(configs / component)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "vocab.json").write_text(json.dumps(pipe.tokenizer.get_vocab()), encoding="utf-8")
    (tokenizer / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")  # the tiny vocabulary has no merges
    return checkpoint, configs, tokenizer


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails at once (the hub's, say), whatever network this machine has."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_loads_offline_with_the_weights_it_holds(family: str, tmp_path: Path, no_network: None) -> None:
    source = tiny_pipeline("sd1") if family == "sd1" else wide_sdxl_pipeline()
    checkpoint, configs, tokenizer = write_single_file(source, tmp_path, family)
    assert checkpoint_kind(checkpoint_shapes(checkpoint)) == family.upper()
    loaded = load_checkpoint(checkpoint, family, tokenizer=tokenizer, configs=configs)
    assert isinstance(loaded.scheduler, DDIMScheduler) and not loaded.scheduler.config.clip_sample
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(source, component, None) is None:
            continue
        ours, theirs = getattr(loaded, component).state_dict(), getattr(source, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    if family == "sdxl":
        assert loaded.tokenizer_2.pad_token == "!"  # OpenCLIP's padding, as SDXL base's tokenizer_2
    else:
        torch.testing.assert_close(generate(loaded, ["a cat"], None, steps=2, output_type="latent"),
                                   generate(source, ["a cat"], None, steps=2, output_type="latent"))


def test_cli_samples_a_single_file_offline_as_the_model_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  no_network: None) -> None:
    """`--checkpoint file.safetensors --tokenizer DIR` draws what the same weights draw as the built-in tiny model."""
    _, configs, tokenizer = write_single_file(tiny_pipeline("sd1"), tmp_path, "sd1")
    (tmp_path / "shipped").mkdir()
    configs.rename(tmp_path / "shipped" / "sd1")
    monkeypatch.setattr(loading, "CONFIGS", tmp_path / "shipped")  # the tiny model's configs stand for SD1.5's
    from_file = cli(tmp_path / "file", "--checkpoint", str(tmp_path / "sd1.safetensors"), "--tokenizer",
                    str(tokenizer), "--size", "64", prompts=["a cat", "a dog"])
    built_in = cli(tmp_path / "tiny", prompts=["a cat", "a dog"])
    assert [f.name for f in from_file] == [f.name for f in built_in] and len(built_in) == 2
    assert all(np.abs(png(a) - png(b)).max() <= 1 for a, b in zip(from_file, built_in))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shipped_configs_rebuild_the_released_models(family: str) -> None:
    """The configs give the released parameter counts, and the original-layout keys of those models are recognised
    as that family by diffusers (`infer_diffusers_model_type`) and by `checkpoint_kind`."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    folder = family_configs(family)
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    for name, model in parts.items():
        assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS[family, name], name
    layout = ldm_checkpoint(SimpleNamespace(**parts))
    assert infer_diffusers_model_type(layout) == {"sd1": "v1", "sdxl": "xl_base"}[family]
    assert checkpoint_kind({k: tuple(v.shape) for k, v in layout.items()}) == family.upper()
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    assert index["_class_name"] == {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    assert all((folder / name).is_dir() for name, entry in index.items() if isinstance(entry, list) and entry[0]
               and not name.startswith("tokenizer"))


def test_checkpoint_kind_reads_the_original_keys() -> None:
    clip = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}
    assert checkpoint_kind(clip) == "SD1"
    assert checkpoint_kind({"conditioner.embedders.1.model.positional_embedding": (77, 1280)}) == "SDXL"
    assert checkpoint_kind({"conditioner.embedders.0.model.positional_embedding": (77, 1280)}) == "SDXL refiner"
    assert checkpoint_kind({"cond_stage_model.model.token_embedding.weight": (49408, 1024)}) == "SD2"
    inpainting = {**clip, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert checkpoint_kind(inpainting).startswith("9-channel")
    assert checkpoint_kind({"unet.conv_in.weight": (320, 4, 3, 3)}) == "unknown"


def test_tokenizer_is_found_offline_or_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "cached_tokenizer", lambda: None)  # whatever this machine's cache holds
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (comfy / "comfy" / "sd1_tokenizer" / name).write_text("{}")
    checkpoint = comfy / "models" / "checkpoints" / "model.safetensors"
    assert find_tokenizer(checkpoint) == comfy / "comfy" / "sd1_tokenizer"
    diffusers_folder = tmp_path / "sd15"
    (diffusers_folder / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (diffusers_folder / "tokenizer" / name).write_text("{}")
    assert find_tokenizer(checkpoint, diffusers_folder) == diffusers_folder / "tokenizer"  # a model folder will do
    with pytest.raises(InputError, match="Pass --tokenizer DIR"):
        find_tokenizer(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match="no vocab.json and merges.txt"):
        find_tokenizer(checkpoint, tmp_path)
