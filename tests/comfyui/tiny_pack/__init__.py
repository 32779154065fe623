"""Test-only ComfyUI node pack: a checkpoint loader that returns tiny random models.

The workflow test links this folder into a throwaway ComfyUI's `custom_nodes/` and swaps every
`CheckpointLoaderSimple` of a shipped workflow for `MultiCondTest_TinyCheckpoint`. The MODEL is a
tiny SD1.5- or SDXL-shaped UNet of the real comfy classes (configs from `tests/comfyui/tiny.py`),
the CLIP is comfy's own SD1.5 / SDXL text encoder (real tokenizers) with tiny transformer
configs, and the VAE is the tiny AutoencoderKL of `tests/comfyui/tiny.py` (the usual 8x downscale).
Family "sd35l" is SD3.5-Large-like: the MODEL is ComfyUI's SD3 detected from the 2-block diffusers transformer of
the pack's core/diffusers_binding/tiny_dit.py (the one tests/comfyui/tiny_dit.py and the style tests use), the CLIP is
comfy's SD1 CLIP-L (real tokenizer) at the model's context width 64 with a 32-wide pooled projection (the tiny SD3's
conditioning shapes: a real SD3 text encoder pads to 4096), and the VAE the tiny AutoencoderKL with 16 latent channels.
Family "flux1_dev" is Flux.1-dev-like: the MODEL is ComfyUI's Flux built from the same module's 2+2-block diffusers
transformer (built directly: ComfyUI's detection fixes Flux's real head count), the CLIP is comfy's own Flux text
encoder (CLIP-L + T5-XXL, real tokenizers) with tiny configs giving the model's context width 32 and pooled 16, and
the VAE the 16-channel one of "sd35l".
`MultiCondTest_TinyControlNet` stands in for ControlNetLoader: a UNet ControlNet of the family's tiny UNet, on "sd35l"
an SD3.5 ControlNet (its hint VAE-encoded, as Stability's canny/blur/depth ones) and on "flux1_dev" an XLabs Flux
ControlNet (the image as its hint), each of one block sized to the tiny DiT (builders in tests/comfyui/tiny.py).
Nothing is downloaded and nothing is read from disk but the tokenizers that ship with ComfyUI.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd

TINY_NODE = "MultiCondTest_TinyCheckpoint"
TINY_CONTROLNET = "MultiCondTest_TinyControlNet"
TINY_T2I = "MultiCondTest_TinyT2IAdapter"
TINY_MODELS_ENV = "MULTICOND_TINY_MODELS"
BASE_FAMILIES = ("sd15", "sdxl")
SD35 = "sd35l"  # the tiny SD3.5-Large-like DiT
FLUX_DEV = "flux1_dev"  # the tiny Flux.1-dev-like DiT
# _shaped: the real block structure (T2I-Adapters fit)
FAMILIES = (*BASE_FAMILIES, "sd15_shaped", "sdxl_shaped", SD35, FLUX_DEV)

# Text encoders: real vocabulary (the tokenizers emit ids up to 49407), a few tiny layers.
# SDXL reads layer -2 of both encoders, so each needs at least 3 layers.
CLIP_L_SD15 = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}
CLIP_L_SDXL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
CLIP_G_SDXL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3}
SDXL_POOLED = 1280  # SDXL's adm input (2816) = pooled CLIP-G (1280) + 6 size embeddings of 256
SDXL_CONTEXT = CLIP_L_SDXL["hidden_size"] + CLIP_G_SDXL["hidden_size"]
SD35_LATENT_CHANNELS = 16
# Flux's text encoder: the T5-XXL output is the context (width 32 = FLUX_CONTEXT_WIDTH), CLIP-L's unprojected pooled
# output the vector input (width 16 = FLUX_POOLED_WIDTH); real vocabularies, so the tokenizers' ids fit.
FLUX_CLIP_L = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}
FLUX_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}

def _tiny_models_path() -> Path:
    """tests/comfyui/tiny.py: from MULTICOND_TINY_MODELS (set by the test), else next to this package."""
    return Path(os.environ.get(TINY_MODELS_ENV) or Path(__file__).resolve().parent.parent / "tiny.py")


def _load_tiny_module() -> ModuleType:
    return _load_file("multicond_test_tiny_models", _tiny_models_path())


def _load_tiny_dit_module() -> ModuleType:
    """The pack's core/diffusers_binding/tiny_dit.py (torch + diffusers only), by path: the server loads the pack
    under a module name of its own, so `multicond` may not be importable here."""
    root = _tiny_models_path().resolve().parents[2]
    return _load_file("multicond_test_tiny_dit", root / "core" / "diffusers_binding" / "tiny_dit.py")


def _load_file(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def model_config(family: str) -> Any:
    tiny = _load_tiny_module()
    config_class, unet_config = tiny.CONFIGS[family]
    if tiny.family(family) == "sd15":
        config = config_class(dict(unet_config))
    else:
        config = config_class(dict(unet_config, context_dim=SDXL_CONTEXT))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_model(config: Any, seed: int) -> comfy.model_patcher.ModelPatcher:
    model = config.get_model({}, device=torch.device("cpu"))
    _load_tiny_module().randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def build_clip(config: Any, family: str, seed: int) -> comfy.sd.CLIP:
    """comfy's own CLIP wrapper and text encoder classes for the family, with tiny configs."""
    family = _load_tiny_module().family(family)
    sizes = {"clip_l_model_config": CLIP_L_SD15} if family == "sd15" else \
        {"clip_l_model_config": CLIP_L_SDXL, "clip_g_model_config": CLIP_G_SDXL}
    clip = comfy.sd.CLIP(config.clip_target(), model_options={**sizes, "dtype": torch.float32})
    encoder = clip.cond_stage_model
    if family == "sdxl":  # comfy's projection is hidden -> hidden; SDXL needs a 1280-wide pooled output
        width = CLIP_G_SDXL["hidden_size"]
        encoder.clip_g.transformer.text_projection = comfy.ops.manual_cast.Linear(width, SDXL_POOLED, bias=False)
    _load_tiny_module().randomize(encoder, seed + 1)
    return clip


def build_vae(seed: int) -> comfy.sd.VAE:
    return _load_tiny_module().build_vae(seed + 2)


def build_sd35(seed: int) -> tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE of the tiny SD3.5-Large-like family (shapes of multicond's tiny_dit: context 64, pooled 32)."""
    tiny_dit = _load_tiny_dit_module()
    CONTEXT_WIDTH, POOLED_WIDTH = tiny_dit.CONTEXT_WIDTH, tiny_dit.POOLED_WIDTH  # noqa: N806 - the module's constants

    state = dict(tiny_dit.tiny_sd3_transformer(SD35, seed).state_dict())
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    assert model is not None, "ComfyUI did not detect the tiny SD3.5 model"

    width = {**CLIP_L_SD15, "hidden_size": CONTEXT_WIDTH}
    clip = comfy.sd.CLIP(model_config("sd15").clip_target(), model_options={"clip_l_model_config": width,
                                                                           "dtype": torch.float32})
    encoder = clip.cond_stage_model
    clip_l = encoder.clip_l  # SD1's CLIP-L pools without its projection; SD3 takes the projected pooled output
    clip_l.transformer.text_projection = comfy.ops.manual_cast.Linear(CONTEXT_WIDTH, POOLED_WIDTH, bias=False)
    clip_l.return_projected_pooled = True
    clip_l.options_default = (*clip_l.options_default[:2], True)
    _load_tiny_module().randomize(encoder, seed + 1)
    return model, clip, build_vae16(seed)


def build_vae16(seed: int) -> comfy.sd.VAE:
    """The tiny AutoencoderKL with 16 latent channels (SD3's and Flux's latent width)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    tiny = _load_tiny_module()
    ddconfig = dict(tiny.TINY_VAE_DDCONFIG, z_channels=SD35_LATENT_CHANNELS)
    params = {"ddconfig": ddconfig, "embed_dim": SD35_LATENT_CHANNELS}
    autoencoder = AutoencoderKL(**params)
    tiny.randomize(autoencoder, seed + 2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params}, dtype=torch.float32)
    vae.latent_channels = SD35_LATENT_CHANNELS
    return vae


def build_flux_dev(seed: int) -> tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE of the tiny Flux.1-dev-like family (multicond's tiny_dit: context 32, pooled 16)."""
    import comfy.text_encoders.flux
    from comfy.supported_models_base import ClipTarget

    model = _load_tiny_module().flux_from_diffusers(_load_tiny_dit_module().tiny_flux_transformer("dev", seed), "dev")
    target = ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": FLUX_CLIP_L, "t5xxl_model_config": FLUX_T5,
                                                "dtype": torch.float32})
    _load_tiny_module().randomize(clip.cond_stage_model, seed + 1)
    return model, clip, build_vae16(seed)


class TinyLoader:
    """What both test loaders take: the family of the tiny model and the seed of its weights."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's V1 node API
        return {"required": {
            "family": (list(FAMILIES), {"default": "sd15", "tooltip": "Architecture of the tiny model."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seed of the random weights."}),
        }}

    CATEGORY = "_for_testing"


class TinyCheckpoint(TinyLoader):
    """Stands in for CheckpointLoaderSimple: MODEL, CLIP, VAE of a tiny random SD1.5, SDXL, SD3.5-L or Flux.1-dev."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    DESCRIPTION = "Test only: tiny random models of the real comfy classes (MultiCond workflow test)."

    def load(self, family: str, seed: int) -> tuple[Any, Any, Any]:
        if family == SD35:
            return build_sd35(seed)
        if family == FLUX_DEV:
            return build_flux_dev(seed)
        config = model_config(family)
        return build_model(config, seed), build_clip(config, family, seed), build_vae(seed)


class TinyControlNet(TinyLoader):
    """Stands in for ControlNetLoader: a tiny random ControlNet matching the tiny model of the family (a UNet
    ControlNet; on "sd35l" an SD3.5 ControlNet, on "flux1_dev" an XLabs-style Flux ControlNet, sized to those
    models)."""

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    DESCRIPTION = "Test only: a tiny random ControlNet (MultiCond workflow test)."

    def load(self, family: str, seed: int) -> tuple[Any]:
        tiny = _load_tiny_module()
        if family == SD35:  # an SD3.5-Large ControlNet (canny/blur/depth): its hint goes through the VAE
            pooled = _load_tiny_dit_module().POOLED_WIDTH
            return (tiny.build_sd35_controlnet(seed + 3, pooled_width=pooled, load_device=mm.get_torch_device()),)
        if family == FLUX_DEV:  # an XLabs Flux ControlNet (canny/depth): the image itself is its hint
            main = tiny.flux_from_diffusers(_load_tiny_dit_module().tiny_flux_transformer("dev", seed), "dev")
            return (tiny.build_flux_controlnet(main, union=False, seed=seed + 3, load_device=mm.get_torch_device()),)
        context = SDXL_CONTEXT if tiny.family(family) == "sdxl" else None
        return (tiny.build_controlnet(family, seed + 3, context_dim=context),)


class TinyT2IAdapter(TinyLoader):
    """Stands in for ControlNetLoader with a T2I-Adapter file: a tiny adapter for the _shaped tiny models."""

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    DESCRIPTION = "Test only: a tiny random T2I-Adapter (MultiCond workflow test)."

    def load(self, family: str, seed: int) -> tuple[Any]:
        return (_load_tiny_module().build_t2i_adapter(family, seed + 4),)


NODE_CLASS_MAPPINGS = {TINY_NODE: TinyCheckpoint, TINY_CONTROLNET: TinyControlNet, TINY_T2I: TinyT2IAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {TINY_NODE: "Tiny Checkpoint (MultiCond test)", TINY_CONTROLNET: "Tiny ControlNet (MultiCond test)",
                              TINY_T2I: "Tiny T2I-Adapter (MultiCond test)"}
