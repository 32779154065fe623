"""Tiny random SD1.5- and SDXL-shaped ComfyUI models (real comfy classes, a few M parameters), and ComfyUI's Flux
from a diffusers Flux transformer's weights."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.supported_models


class TinySD15(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}


class TinySDXL(comfy.supported_models.SDXL):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


SD15_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_linear_in_transformer": False, "context_dim": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

SDXL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [0, 2, 3],
    "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 2, 2, 3, 3],
    "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


# The real block structure at 32 channels: SD1.5's four levels with two res blocks (attention on the first three),
# SDXL's three levels with two res blocks (attention depth 1 and 2): what T2I-Adapters and the guided layers expect.
SD15_SHAPED_CONFIG = {**SD15_CONFIG, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
                      "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                      "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}  # finest output block first
SDXL_SHAPED_CONFIG = {**SDXL_CONFIG, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                      "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]}
CONFIGS = {"sd15": (TinySD15, SD15_CONFIG), "sdxl": (TinySDXL, SDXL_CONFIG),
           "sd15_shaped": (TinySD15, SD15_SHAPED_CONFIG), "sdxl_shaped": (TinySDXL, SDXL_SHAPED_CONFIG)}


def family(kind: str) -> str:
    """The text-encoder family of a kind ("sd15_shaped" -> "sd15")."""
    return kind.removesuffix("_shaped")


def build(kind: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny random model of the real ComfyUI class."""
    config_class, unet_config = CONFIGS[kind]
    config = config_class(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def randomize(module: torch.nn.Module, seed: int) -> None:
    """comfy ops skip weight init (torch.empty), so every weight gets small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def conditioning(kind: str, seed: int, tokens: int = 77) -> list:
    generator = torch.Generator().manual_seed(seed)
    if family(kind) == "sd15":
        return [[torch.randn(1, tokens, 64, generator=generator), {}]]
    extra = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": 256, "height": 256,
             "crop_w": 0, "crop_h": 0, "target_width": 256, "target_height": 256}
    return [[torch.randn(1, tokens, 2048, generator=generator), extra]]


def sample(model, kind: str = "sd15", batch: int = 3, size: int = 16, steps: int = 3, cfg: float = 5.0,
           sampler: str = "euler", scheduler: str = "normal", seed: int = 42, positive=None, negative=None,
           latent: torch.Tensor | None = None, denoise: float = 1.0) -> torch.Tensor:
    """Sample inside inference_mode, as ComfyUI's executor does."""
    with torch.inference_mode():
        if latent is None:
            latent = torch.zeros(batch, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, seed)
        positive = positive if positive is not None else conditioning(kind, 1)
        negative = negative if negative is not None else conditioning(kind, 2)
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   denoise=denoise, seed=seed, disable_pbar=True).clone()


TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def build_vae(seed: int = 0):
    """A tiny random comfy.sd.VAE (AutoencoderKL, downscale 8, 4 latent channels)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"ddconfig": dict(TINY_VAE_DDCONFIG), "embed_dim": 4}
    model = AutoencoderKL(**params)
    randomize(model, seed)
    return comfy.sd.VAE(sd=model.state_dict(), config={"params": params}, dtype=torch.float32)


def build_controlnet(kind: str = "sd15", seed: int = 0, context_dim: int | None = None):
    """A tiny random comfy.controlnet.ControlNet matching the tiny UNet of `kind`."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    base = CONFIGS[kind][1]
    config = {k: v for k, v in base.items() if k not in ("out_channels", "transformer_depth_output")}
    if context_dim is not None:
        config["context_dim"] = context_dim
    heads = {"num_heads": 2} if family(kind) == "sd15" else {"num_head_channels": 16}
    model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **heads, **config)
    randomize(model, seed)
    return comfy.controlnet.ControlNet(model, load_device=mm.get_torch_device())


def build_t2i_adapter(kind: str = "sd15_shaped", seed: int = 0):
    """A tiny random comfy T2IAdapter (the full adapter at 32 channels) for the SD1.5- or SDXL-shaped tiny UNet."""
    import comfy.controlnet
    import comfy.t2i_adapter.adapter

    xl = family(kind) == "sdxl"
    model = comfy.t2i_adapter.adapter.Adapter(cin=3 * (16 if xl else 8) ** 2, channels=[32, 64, 128, 128], nums_rb=2,
                                              ksize=1, sk=True, use_conv=False, xl=xl)
    randomize(model, seed)
    return comfy.controlnet.T2IAdapter(model, model.input_channels, 8, "nearest-exact")


def flux_from_diffusers(source: torch.nn.Module, variant: str = "dev") -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI Flux-dev or -schnell model with a diffusers `FluxTransformer2DModel`'s weights, built directly:
    detection fixes Flux's real head count and rotary axes, so tiny weights are not detected (dit.md §5.2)."""
    import comfy.ldm.flux.model
    import comfy.model_detection

    # convert_diffusers_mmdit pops the keys it maps and swaps tensors in place: it gets clones (dit.md §5.4).
    clones = {key: value.clone() for key, value in source.state_dict().items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(clones, "")
    config = source.config
    unet_config = {"image_model": "flux", "in_channels": config.in_channels // 4,
                   "out_channels": config.out_channels // 4,
                   "vec_in_dim": config.pooled_projection_dim, "context_in_dim": config.joint_attention_dim,
                   "hidden_size": config.num_attention_heads * config.attention_head_dim, "mlp_ratio": 4.0,
                   "num_heads": config.num_attention_heads, "depth": config.num_layers,
                   "depth_single_blocks": config.num_single_layers, "axes_dim": list(config.axes_dims_rope),
                   "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": config.guidance_embeds}
    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:  # newer hosts require it
        unet_config["txt_ids_dims"] = []
    family = comfy.supported_models.Flux if variant == "dev" else comfy.supported_models.FluxSchnell
    model_config = family(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    expected = set(model.diffusion_model.state_dict())
    assert set(converted) == expected, f"unmapped Flux weights: {sorted(expected ^ set(converted))[:4]}"
    model.load_model_weights(converted, "")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def build_sd35_controlnet(seed: int = 0, pooled_width: int = 32, load_device: torch.device | None = None):
    """A tiny random SD3.5 (blur/canny/depth-style) ControlNet, as the host's `load_controlnet_sd35` makes it: a
    `ControlNetSD35` around a one-block `ControlNetEmbedder` repeated over the two joint blocks of the tiny SD3.5
    (hidden 2 heads x 64); its hint is the VAE-encoded image. `pooled_width` is the main model's (the real loader
    fixes 2048)."""
    import comfy.cldm.dit_embedder
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ops

    cpu = torch.device("cpu")
    model = comfy.cldm.dit_embedder.ControlNetEmbedder(
        img_size=None, patch_size=2, in_chans=16, num_layers=1, main_model_double=2, double_y_emb=False,
        attention_head_dim=64, num_attention_heads=2, adm_in_channels=pooled_width, device=cpu,
        dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    randomize(model, seed)
    return comfy.controlnet.ControlNetSD35(model, compression_ratio=1, latent_format=comfy.latent_formats.SD3(),
                                           load_device=load_device or cpu)


def build_flux_controlnet(main: comfy.model_patcher.ModelPatcher, union: bool = False, seed: int = 0,
                          load_device: torch.device | None = None):
    """A tiny random Flux ControlNet of one block for the Flux `main` (its sizes), as the host's loaders make them:
    XLabs (`union` False: image hint, double blocks only) or InstantX/Union (latent hint, a union type set)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.ops

    cpu, ops = torch.device("cpu"), comfy.ops.disable_weight_init
    device = load_device or cpu
    config = {k: v for k, v in main.model.model_config.unet_config.items()
              if k not in ("dtype", "device", "operations")}
    config.update(depth=1, depth_single_blocks=1 if union else 0)
    if not union:
        model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=ops, device=cpu, dtype=torch.float32, **config)
        randomize(model, seed)
        return comfy.controlnet.ControlNet(model, load_device=device, extra_conds=["y", "guidance"])
    model = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, num_union_modes=10, control_latent_channels=16,
                                                     operations=ops, device=cpu, dtype=torch.float32, **config)
    randomize(model, seed)
    control = comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                          load_device=device, extra_conds=["y", "guidance"])
    control.set_extra_arg("control_type", [1])  # what Set Union ControlNet Type does ("depth")
    return control
