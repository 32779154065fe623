"""Tiny random SD1.5-, SDXL-, SD3.5- and Flux-shaped diffusers pipelines, and a loader for real checkpoints.

The tiny pipelines are built from configs (no download, a few M parameters) with the real
diffusers/transformers classes (UNets with the SD DDIM scheduler; the DiTs of `tiny_dit` with their
flow-matching Euler schedulers, CLIP and a byte-level T5), so a full sampling loop runs in seconds on a
CPU. Their weights are random: they exercise the code paths, their images are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from . import tiny_dit
from .pipeline import load_checkpoint

Family = Literal["sd1", "sdxl", "sd3", "flux"]
FAMILIES: tuple[str, ...] = ("sd1", "sdxl")  # UNets: every command takes them
DIT_FAMILIES: tuple[str, ...] = ("sd3", "flux")  # SD3/SD3.5 and Flux.1: the commands that support DiTs take them
TINY_T5_TOKENS = 64  # the tiny DiTs' T5 sequence, characters (the real pipelines pad to 256 and 512 pieces)

TINY_IMAGE_SIZE = 64  # pixels; the tiny VAE downsamples by 8 as SD's does, so latents are 8x8
TOKENS = 77
TEXT_WIDTH = 32
ADD_TIME_WIDTH = 8


def sd_scheduler() -> DDIMScheduler:
    """The DDIM scheduler StableDiffusion and the StyleAligned notebooks use."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return [table[b] for b in range(256)]


def tiny_tokenizer(max_length: int = TOKENS) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges): every word becomes its characters.

    The end-of-text token gets the largest id so CLIP's pooled output (taken at the first
    end-of-text position) is right under both of transformers' conventions.
    """
    chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer whose pieces are single characters (pad, end-of-text and unknown first, as T5's ids 0-2)."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    return T5TokenizerFast(vocab=[(piece, 0.0) for piece in pieces], extra_ids=0)


def tiny_t5(tokenizer: T5TokenizerFast, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                                   num_heads=2, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id))


def _text_config(tokenizer: CLIPTokenizer, projection_dim: int = TEXT_WIDTH,
                 width: int = TEXT_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=projection_dim,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 0.18215,
             shift_factor: float | None = None) -> AutoencoderKL:
    """Four levels, as SD's VAE: 8x downsampling; 4 latent channels and SD's scaling unless told otherwise."""
    flow = shift_factor is not None  # SD3's and Flux's VAEs have no quant convolutions
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                         sample_size=TINY_IMAGE_SIZE, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=not flow, use_post_quant_conv=not flow)


def tiny_sd1_unet() -> UNet2DConditionModel:
    """SD1.5's pattern (cross-attention at every level but the deepest, 2 res blocks, 8 heads), narrow."""
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8, cross_attention_dim=TEXT_WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def tiny_sd1_four_level_unet() -> UNet2DConditionModel:
    """SD1.5's full block structure (four levels, cross-attention on the first three) at widths 32-128:
    its guided decoder layers sit at 1/4 and 1/2 of the latent, and a four-level T2I-Adapter fits it."""
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128), norm_num_groups=8, attention_head_dim=8, cross_attention_dim=TEXT_WIDTH,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's pattern (no attention at the first level, deeper transformers below, text_time
    conditioning, linear projections), narrow and shallow."""
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 3), cross_attention_dim=2 * TEXT_WIDTH, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_WIDTH,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * ADD_TIME_WIDTH,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_unet(family: Family, seed: int = 0) -> UNet2DConditionModel:
    """A tiny random UNet of the family, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sd1_unet() if family == "sd1" else tiny_sdxl_unet()
    return unet.eval()


def tiny_pipeline(family: Family = "sd1", seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A tiny random pipeline of the family (random weights: its images are noise)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sd1_unet() if family == "sd1" else tiny_sdxl_unet()
        vae = tiny_vae()
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        if family == "sd1":
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet,
                                             scheduler=sd_scheduler(), force_zeros_for_empty_prompt=True,
                                             add_watermarker=False)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The real VAEs' latent scaling and the schedulers' shifts (SD3.5's and Flux.1-dev's configs).
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_SCHEDULER = {"shift": 3.0}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_dit_pipeline(family: Family = "sd3", seed: int = 0) -> StableDiffusion3Pipeline | FluxPipeline:
    """A tiny random SD3.5-Medium-like pipeline (qk-norm, the MMDiT-X block; CLIP-L, CLIP-G and T5) or
    Flux.1-dev-like one (CLIP-L and T5, guidance embedding), with the real flow-matching schedulers."""
    if family not in DIT_FAMILIES:
        raise ValueError(f"DiT family must be one of {DIT_FAMILIES}, got {family!r}")
    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd3":
            transformer = tiny_dit.tiny_sd3_transformer("sd35m", seed)
            half = tiny_dit.CONTEXT_WIDTH // 2  # SD3 concatenates CLIP-L and CLIP-G features up to T5's width
            pooled = tiny_dit.POOLED_WIDTH // 2  # and their pooled projections
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                vae=tiny_vae(tiny_dit.LATENT_CHANNELS, **SD3_VAE),
                text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, pooled, half)), tokenizer=tokenizer,
                text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, pooled, half)),
                tokenizer_2=tiny_tokenizer(), text_encoder_3=tiny_t5(t5_tokenizer, tiny_dit.CONTEXT_WIDTH),
                tokenizer_3=t5_tokenizer)
        else:
            transformer = tiny_dit.tiny_flux_transformer("dev", seed)
            pipe = FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                vae=tiny_vae(tiny_dit.FLUX_PACKED_CHANNELS // 4, **FLUX_VAE),
                text_encoder=CLIPTextModel(_text_config(tokenizer, width=tiny_dit.FLUX_POOLED_WIDTH)),
                tokenizer=tokenizer, text_encoder_2=tiny_t5(t5_tokenizer, tiny_dit.FLUX_CONTEXT_WIDTH),
                tokenizer_2=t5_tokenizer, transformer=transformer)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(checkpoint: str | None, family: Family = "sd1", device: str = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> DiffusionPipeline:
    """A real pipeline from a diffusers folder or a single-file checkpoint, loaded offline (`pipeline.load_checkpoint`),
    or the tiny one when `checkpoint` is None; the scheduler is the SD DDIM scheduler StyleAligned uses."""
    if checkpoint is None:
        return tiny_pipeline(family, seed).to(device)
    return load_checkpoint(checkpoint, family, device, dtype)
