"""StyleAligned with a diffusers pipeline: DDIM inversion of a reference image, pinned sampling.

`invert_image` encodes an image with the pipeline's VAE and inverts it with core `ddim_invert`
(noise predicted with CFG 2 on an [uncond, cond] batch, as StyleAligned's `inversion.py`);
`pin_reference` gives the starting latent and the `callback_on_step_end` that holds the reference
row on the inverted trajectory; `generate` runs a pipeline with the binding installed.

`load_checkpoint` reads a diffusers folder or a single-file SD1.x/SDXL checkpoint offline: the
component configs ship with the package (pipeline-configs/<family>/) and the CLIP tokenizer comes from
`--tokenizer`, a ComfyUI install around the checkpoint, or the local Hugging Face cache.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import InputError
from ..inversion import INVERSION_GUIDANCE, PIN_OFFSET, ddim_invert, pinned_step
from ..style import StyleAlignedArgs
from .style_aligned import install_style_aligned

StepCallback = Callable[[DiffusionPipeline, int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image (PIL, or HxWx3 uint8) as a (1, 3, H, W) float tensor with pixels in [-1, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    pixels = torch.from_numpy(np.array(array, dtype=np.float32)) / 255.0  # a copy: PIL arrays are read-only
    return (pixels * 2 - 1).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray) -> torch.Tensor:
    """The VAE latent of an image: `latent_dist.mean * scaling_factor`, encoded in float32."""
    vae = pipe.vae
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # SD VAEs overflow in float16; the original encodes in float32 too
    try:
        pixels = image_to_tensor(image).to(vae.device)
        latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    return latent


@torch.no_grad()
def cfg_unet_inputs(pipe: DiffusionPipeline, prompt: str, height: int, width: int) -> dict[str, Any]:
    """UNet keyword inputs for a batch [uncond, cond] of one image, as the pipeline builds them.

    SDXL: the empty negative prompt becomes zeros (`force_zeros_for_empty_prompt`) and the time ids
    are (height, width), (0, 0), (height, width), what the pipeline uses when sampling at that size
    (the original hard-codes 1024, its sampling size).
    """
    device = pipe.unet.device
    if isinstance(pipe, StableDiffusionXLPipeline):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=device)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)}
        return {"encoder_hidden_states": torch.cat([uncond, cond]), "added_cond_kwargs": added}
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    return {"encoder_hidden_states": torch.cat([uncond, cond])}


def _check_ddim(pipe: DiffusionPipeline) -> DDIMScheduler:
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(f"DDIM inversion needs the pipeline's scheduler to be DDIMScheduler, got "
                         f"{type(pipe.scheduler).__name__}; set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    return pipe.scheduler


@torch.no_grad()
def invert_latent(pipe: DiffusionPipeline, latent: torch.Tensor, prompt: str, steps: int = 50,
                  guidance_scale: float = INVERSION_GUIDANCE) -> torch.Tensor:
    """DDIM-invert a (1, C, h, w) latent; `zts[0]` is the noisiest, `zts[-1]` the latent itself.

    Uses the pipeline's scheduler timesteps for `steps`, so sampling with the same number of steps
    walks the same trajectory back.
    """
    scheduler = _check_ddim(pipe)
    scheduler.set_timesteps(steps)
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    inputs = cfg_unet_inputs(pipe, prompt, latent.shape[-2] * scale, latent.shape[-1] * scale)

    def predict_noise(z: torch.Tensor, t: int) -> torch.Tensor:
        batch = torch.cat([z, z]).to(unet.device, unet.dtype)
        uncond, cond = unet(batch, t, **inputs).sample.float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    timesteps = [int(t) for t in scheduler.timesteps]
    return ddim_invert(latent.float(), predict_noise, scheduler.alphas_cumprod, timesteps,
                       float(scheduler.final_alpha_cumprod))


def invert_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray, prompt: str, steps: int = 50,
                 guidance_scale: float = INVERSION_GUIDANCE) -> torch.Tensor:
    """Encode `image` with the VAE and DDIM-invert it (`invert_latent`); the trajectory `zts`."""
    return invert_latent(pipe, encode_image(pipe, image), prompt, steps, guidance_scale)


@dataclass(frozen=True)
class PinnedReference:
    """A reference row held on an inverted trajectory while the other rows are sampled."""

    zts: torch.Tensor
    offset: int = PIN_OFFSET
    row: int = 0

    @property
    def start(self) -> torch.Tensor:
        """The reference's starting latent, `zts[offset]`."""
        return self.zts[self.offset]

    def callback(self, pipe: DiffusionPipeline, step: int, timestep: Any,
                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`callback_on_step_end`: after step `step` the reference holds the input of step `step + 1`."""
        latents = tensors["latents"]
        latents[self.row] = self.zts[pinned_step(step + 1, self.offset)][0].to(latents.device, latents.dtype)
        return {"latents": latents}


def pin_reference(zts: torch.Tensor, offset: int = PIN_OFFSET, row: int = 0) -> PinnedReference:
    """The start latent and step callback of StyleAligned's `make_inversion_callback`."""
    steps = zts.shape[0] - 1
    if not 0 <= offset < steps:
        raise ValueError(f"the pin offset must be in 0..{steps - 1} for a {steps}-step trajectory, got {offset}")
    return PinnedReference(zts, offset, row)


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded `seed + row`: an image's noise does not depend on the batch."""
    return [torch.Generator("cpu").manual_seed(seed + row) for row in range(rows)]


def initial_latents(pipe: DiffusionPipeline, rows: int, height: int, width: int, seed: int,
                    reference: PinnedReference | None = None) -> torch.Tensor:
    """The starting noise of every row, the reference row replaced by its pinned start latent."""
    shape = (rows, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=row_generators(seed, rows), dtype=torch.float32)
    if reference is not None:
        if reference.start.shape[-2:] != shape[-2:]:
            raise ValueError(f"the reference latent is {tuple(reference.start.shape[-2:])} but the images are "
                             f"{shape[-2:]}; invert the reference image at the generation size")
        latents[reference.row] = reference.start[0].float() / pipe.scheduler.init_noise_sigma
    return latents.to(pipe.unet.device, pipe.unet.dtype)


def default_size(pipe: DiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate(pipe: DiffusionPipeline, prompts: Sequence[str], args: StyleAlignedArgs | None = StyleAlignedArgs(), *,
             steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
             width: int | None = None, reference: PinnedReference | None = None, output_type: str = "pil",
             **pipeline_kwargs: Any) -> Any:
    """Sample `prompts` as one batch, the first image being the style reference.

    `args=None` samples without StyleAligned. `reference` pins row 0 on an inverted trajectory
    (`pin_reference(invert_image(...))`). Each image's noise comes from `seed + index`. Returns
    the pipeline's `images`.
    """
    if guidance_scale <= 1 and args is not None:
        raise ValueError("StyleAligned here expects classifier-free guidance (guidance_scale > 1): the UNet batch "
                         "must be the [uncond, cond] chunks")
    if reference is not None:
        _check_ddim(pipe)
    height = height or default_size(pipe)
    width = width or default_size(pipe)
    latents = initial_latents(pipe, len(prompts), height, width, seed, reference)
    install = None if args is None else (lambda: install_style_aligned(pipe, args))
    return sample_batch(pipe, dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                                   height=height, width=width, latents=latents, output_type=output_type,
                                   **pipeline_kwargs), reference, install)


def sample_batch(pipe: DiffusionPipeline, call: dict[str, Any], reference: PinnedReference | None,
                 install: Callable[[], Any] | None) -> Any:
    """Call the pipeline with `call`, the reference row pinned by the step callback, inside `install()`'s handle
    (None: plainly); the pipeline's `images`."""
    if reference is not None:
        call = {**call, "callback_on_step_end": reference.callback, "callback_on_step_end_tensor_inputs": ["latents"]}
    if install is None:
        return pipe(**call).images
    with install():
        return pipe(**call).images


# ---------------------------------------------------------------- loading checkpoints offline

# pipeline-configs/<family>/: a diffusers model folder without weights (a hyphen: no setuptools package lookalike).
CONFIGS = Path(__file__).parent / "pipeline-configs"
LOADER = "load_checkpoint"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_LENGTH = 77  # CLIP's context; a bare vocab.json + merges.txt folder does not say it
COMFYUI_TOKENIZER = Path("comfy", "sd1_tokenizer")  # where a ComfyUI install keeps CLIP's vocabulary
# Hub repositories whose cached copy holds CLIP's tokenizer: (repo, folder in it); looked up without network.
HUB_TOKENIZERS: tuple[tuple[str, str], ...] = (
    ("openai/clip-vit-large-patch14", ""), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/"), ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"))
SDXL_PAD_TOKEN = "!"  # OpenCLIP pads with token 0, "!": SDXL base's tokenizer_2 does too
# A key that only this kind of original-layout (LDM) checkpoint holds, tried in order.
KIND_KEYS: tuple[tuple[str, str], ...] = (
    ("SDXL", "conditioner.embedders.1.model.positional_embedding"),
    ("SDXL refiner", "conditioner.embedders.0.model.positional_embedding"),
    ("SD2", "cond_stage_model.model.token_embedding.weight"),
    ("SD1", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"),
)
KIND_FAMILY = {"SD1": "sd1", "SDXL": "sdxl"}
# DiT single files (all-in-one or transformer-only): recognised, to say that their diffusers folder loads.
DIT_KEY_ENDINGS: tuple[tuple[str, str], ...] = (("SD3/SD3.5", "joint_blocks.0.x_block.attn.qkv.weight"),
                                                ("Flux.1", "double_blocks.0.img_attn.qkv.weight"))
# A diffusers folder's pipeline class → --family.
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd1", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLOW_FAMILIES = ("sd3", "flux")
UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
LATENT_CHANNELS = 4

Shapes = Mapping[str, Sequence[int]]


def checkpoint_kind(shapes: Shapes) -> str:
    """The model an original-layout checkpoint holds, from its keys: SD1, SDXL, SD2, SDXL refiner, ... or unknown."""
    conv_in = shapes.get(UNET_INPUT)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != LATENT_CHANNELS:
        return f"{conv_in[1]}-channel (inpainting or other) UNet"
    found = next((kind for kind, key in KIND_KEYS if key in shapes), None)
    if found is not None:
        return found
    return next((kind for kind, ending in DIT_KEY_ENDINGS if any(key.endswith(ending) for key in shapes)), "unknown")


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a .safetensors file (its header only) or a .ckpt/.pt file (memory-mapped if it can)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on odd pickles: the file is read again by the real load
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def readable_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """`checkpoint_shapes`, any failure to parse the file reported as one `InputError`."""
    try:
        return checkpoint_shapes(path)
    except Exception as error:  # noqa: BLE001 - whatever the parser trips on, the file is not a readable checkpoint
        raise InputError(LOADER, "--checkpoint", f"{path}: cannot read it as a checkpoint ({_first_line(error)})",
                         "Give an SD1.x or SDXL .safetensors/.ckpt file, or a diffusers model folder") from error


def tokenizer_folder(path: Path) -> Path | None:
    """`path`, or its tokenizer/ subfolder (a diffusers model), when it holds CLIP's vocab.json and merges.txt."""
    for folder in (path, path / "tokenizer"):
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None


def comfyui_tokenizer(checkpoint: Path) -> Path | None:
    """ComfyUI's copy of CLIP's vocabulary, when the checkpoint lies inside a ComfyUI install (models/checkpoints/)."""
    for folder in checkpoint.resolve().parents:
        found = tokenizer_folder(folder / COMFYUI_TOKENIZER)
        if found is not None:
            return found
    return None


def cached_tokenizer() -> Path | None:
    """A CLIP tokenizer in the local Hugging Face cache, looked up without network."""
    from huggingface_hub import try_to_load_from_cache

    for repo, folder in HUB_TOKENIZERS:
        files = [try_to_load_from_cache(repo, folder + name) for name in TOKENIZER_FILES]
        if all(isinstance(file, str) for file in files) and len({Path(file).parent for file in files}) == 1:
            return Path(files[0]).parent
    return None


def find_tokenizer(checkpoint: Path, explicit: Path | None = None) -> Path:
    """The folder of CLIP's tokenizer files: `explicit`, else a ComfyUI install around `checkpoint`, else the cache."""
    fix = "Pass --tokenizer DIR, a folder with CLIP's vocab.json and merges.txt (e.g. ComfyUI/comfy/sd1_tokenizer)"
    if explicit is not None:
        found = tokenizer_folder(explicit)
        if found is None:
            raise InputError(LOADER, "--tokenizer", f"{explicit}: no vocab.json and merges.txt in it", fix)
        return found
    found = comfyui_tokenizer(checkpoint) or cached_tokenizer()
    if found is None:
        raise InputError(LOADER, "--tokenizer", f"not given, and no CLIP tokenizer found offline for {checkpoint}", fix)
    return found


def family_configs(family: str, root: Path | None = None) -> Path:
    """The shipped diffusers-layout configs (model_index.json, unet/, vae/, text_encoder/, ...) of a family."""
    return (root or CONFIGS) / family


def single_file_family(path: Path, family: str) -> str:
    """`family` after checking the file holds that kind of model (a one-line `InputError` if not)."""
    kind = checkpoint_kind(readable_shapes(path))
    found = KIND_FAMILY.get(kind)
    if kind in dict(DIT_KEY_ENDINGS):
        raise InputError(LOADER, "--checkpoint", f"{path} holds an {kind} model as a single file",
                         "For SD3/SD3.5 and Flux.1 give the diffusers model folder (the one with model_index.json)")
    if found is None:
        raise InputError(LOADER, "--checkpoint", f"{path}: not an SD1.x or SDXL base checkpoint (its keys say: {kind})",
                         "Single files load for those two; for another model give its diffusers folder")
    if found != family:
        raise InputError(LOADER, "--family", f"{family}, but {path} holds an {kind} model", f"Add --family {found}")
    return found


def load_single_file(path: Path, family: str, dtype: torch.dtype = torch.float32, tokenizer: Path | None = None,
                     configs: Path | None = None) -> DiffusionPipeline:
    """An SD1.x/SDXL pipeline from an original-layout single file, without network.

    The component configs come from `configs` (default: the shipped `family_configs(family)`), the
    tokenizer from `find_tokenizer(path, tokenizer)`.
    """
    from transformers import CLIPTokenizer

    family = single_file_family(path, family)
    folder = find_tokenizer(path, tokenizer)
    components: dict[str, Any] = {"tokenizer": CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_LENGTH)}
    if family == "sdxl":
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_LENGTH,
                                                                  pad_token=SDXL_PAD_TOKEN)
        cls, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    config = family_configs(family) if configs is None else configs
    # float32 is what the components are built in; naming it anyway makes diffusers warn about a cast.
    precision = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, **precision, **components,
                                    **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(LOADER, "--checkpoint", f"{path}: cannot load it as {family} ({_first_line(error)})",
                         "Give an unmodified SD1.x or SDXL base checkpoint, or its diffusers folder") from error


def folder_family(path: Path) -> str:
    """sd1, sdxl, sd3 or flux from a diffusers model folder's model_index.json (a one-line `InputError` if it has
    none, or another pipeline's)."""
    try:
        name = json.loads((path / "model_index.json").read_text("utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise InputError(LOADER, "--checkpoint", f"{path}: not a diffusers model folder ({_first_line(error)})",
                         "Give the folder that holds model_index.json, or a .safetensors/.ckpt file") from error
    if name not in PIPELINE_FAMILY:
        raise InputError(LOADER, "--checkpoint", f"{path} holds a {name}",
                         "Give an SD1.x/SD2, SDXL, SD3/SD3.5 or Flux.1 text-to-image model")
    return PIPELINE_FAMILY[name]


def load_checkpoint(checkpoint: str | Path, family: str = "sd1", device: str = "cpu",
                    dtype: torch.dtype = torch.float32, tokenizer: Path | None = None,
                    configs: Path | None = None) -> DiffusionPipeline:
    """A pipeline from a diffusers folder or a single file, offline, with the DDIM scheduler StyleAligned uses
    (SD3/SD3.5 and Flux, diffusers folders only: their own flow-matching scheduler).

    Problems with the input (a missing or unreadable file, another model family, no tokenizer) raise
    `InputError` with a one-line message naming the flag and the fix.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(LOADER, "--checkpoint", f"{path}: no such file or folder",
                         "Give a .safetensors/.ckpt file or a diffusers model folder (relative to the current folder)")
    if path.is_dir():
        found = folder_family(path)
        if found != family:
            raise InputError(LOADER, "--family", f"{family}, but {path} holds an {found} model",
                             f"Add --family {found}")
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    else:
        pipe = load_single_file(path, family, dtype, tokenizer, configs)
    if family in FLOW_FAMILIES:
        return pipe.to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    return pipe.to(device)
