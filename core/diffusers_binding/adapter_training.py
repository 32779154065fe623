"""Train a localized (masked-feature) T2I-Adapter on a frozen diffusers UNet, the paper's way.

One training update: images of an image folder → VAE latents z0; condition = the 1-channel Canny
(100, 200) edge map of each image (repeated for an adapter with 3 input channels); one random box
mask per sample; 50% empty prompts; cubic timesteps; the adapter's
features multiplied by the mask (`core.adapter.mask_features`) go into the frozen UNet as
`down_intrablock_additional_residuals`; the loss is `core.adapter.localized_loss`. Only the adapter
is optimised (AdamW, linear LR with warm-up, grad clip 1.0). Runs through Hugging Face Accelerate,
so `accelerate launch` spreads it over processes (each takes its share of every batch).

Every random draw of update u comes from a generator seeded by (seed, u, micro-batch, process), so
a run resumed from a checkpoint continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline, T2IAdapter
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..adapter import (BOX_MIN_AREA, CONDITION_CHANNELS, EDGE_METHODS, TRAIN_STEPS, canny_edges, cubic_timesteps,
                       expand_condition, localized_loss, mask_features, random_box_mask)
from ..errors import InputError
from .tiny import TINY_IMAGE_SIZE, load_pipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS = "checkpoints"
PAPER_SIZE = 512
COMMAND = "train-adapter"


@dataclass
class AdapterTrainSettings:
    """The paper's values where it has them (lr 8e-5, λ 1e-3 constant, AdamW, 500 warm-up steps)."""

    images: Path
    out: Path
    checkpoint: str | None = None          # None: the tiny random pipeline
    family: str = "sd1"
    steps: int = 50000                     # optimizer updates (the original's stop_after_step counts batches)
    batch_size: int = 8
    grad_accumulation: int = 2
    lr: float = 8e-5
    warmup: int = 500
    edge_weight: float = 1e-3
    edge_method: str = "constant"
    size: int | None = None                # None: 512, or 64 for the tiny model
    empty_prompt_rate: float = 0.5
    checkpoint_every: int = 1000
    resume: str | None = None              # a checkpoint folder, or "latest" (the newest under out/checkpoints)
    seed: int = 0
    device: str | None = None              # None: accelerate's choice (a GPU if there is one); "cpu" forces it
    init_adapter: str | None = None        # start from these adapter weights (our file or a diffusers folder)
    adam: dict[str, Any] = field(default_factory=lambda: {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8})


@dataclass
class TrainResult:
    steps: int                          # optimizer updates done in total (resumed ones included)
    start_step: int                     # where this run started (0, or the resumed checkpoint's step)
    losses: list[float]                 # this run's per-update loss (mean over micro-batches)
    adapter_path: Path
    checkpoints: list[Path]


# ---------------------------------------------------------------- data

@dataclass
class Sample:
    image: Path
    caption: str


def find_samples(folder: Path) -> list[Sample]:
    """Images of `folder` (sorted by name) that PIL can open, each with the text of its same-name .txt (or "")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(COMMAND, "--images", f"{folder} is not a folder",
                         "Give a folder of images (.png/.jpg/...) with a same-name .txt caption beside each.")
    samples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # noqa: BLE001 - any unreadable file is skipped
            continue
        caption = path.with_suffix(".txt")
        samples.append(Sample(path, caption.read_text(encoding="utf-8").strip() if caption.exists() else ""))
    if not samples:
        raise InputError(COMMAND, "--images", f"{folder} has no usable images ({', '.join(IMAGE_SUFFIXES)})",
                         "Put the training images there, each with its caption in a same-name .txt file "
                         "(e.g. cat.png and cat.txt).")
    return samples


def load_example(sample: Sample, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image in -1..1, (3, size, size); Canny edge map in 0..1, (1, size, size)).

    The image is squashed to size×size (bilinear), as the original's T.Resize((s, s)); the Canny
    condition is computed on the resized image (the original resizes a precomputed one). One channel,
    as the original's ToTensor of its 'L' canny.png (data/transforms.py:89).
    """
    rgb = np.asarray(Image.open(sample.image).convert("RGB").resize((size, size), Image.BILINEAR))
    edges = canny_edges(rgb)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    condition = torch.from_numpy(edges).float().div(255.0)[None]
    return image, condition


def epoch_order(count: int, epoch: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def batch_indices(count: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """The dataset indices of global micro-batch `micro_step`: reshuffled each epoch, wrapping around."""
    start = micro_step * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        indices.append(epoch_order(count, epoch, seed)[offset])
    return indices


# ---------------------------------------------------------------- model

def adapter_for_unet(unet: torch.nn.Module, family: str, in_channels: int = 1) -> T2IAdapter:
    """A fresh T2IAdapter whose features fit the UNet's down blocks.

    sd1: `full_adapter` (pixel unshuffle 8, one feature per down block, channels = the UNet's
    block_out_channels: 320, 640, 1280, 1280 for SD1.5 as TencentARC's canny adapter).
    sdxl: `full_adapter_xl` (unshuffle 16, the last level repeated for the mid block:
    320, 640, 1280, 1280 for SDXL). Two res blocks per level, as the released adapters.
    `in_channels` 1: the edge map, as the original's canny adapter (config/model/adapter_canny.yaml:9).
    """
    channels = list(unet.config.block_out_channels)
    if family == "sdxl":
        return T2IAdapter(in_channels=in_channels, channels=channels + channels[-1:], num_res_blocks=2,
                          downscale_factor=16, adapter_type="full_adapter_xl")
    return T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=2, downscale_factor=8,
                      adapter_type="full_adapter")


def adapter_in_channels(adapter: T2IAdapter) -> int:
    """The condition channels the adapter's weights take: its first convolution's inputs / unshuffle factor²."""
    inner = adapter.adapter
    first = inner.conv_in if hasattr(inner, "conv_in") else inner.body[0].in_conv  # full(_xl) / light adapters
    return first.in_channels // inner.unshuffle.downscale_factor ** 2


def condition_channels(adapter: T2IAdapter) -> int:
    """`adapter_in_channels`, checked to be a canny adapter's: 1 (the edge map) or 3 (it repeated)."""
    channels = adapter_in_channels(adapter)
    if channels not in CONDITION_CHANNELS:
        raise InputError(COMMAND, "--init-adapter", f"the adapter takes {channels} input channels",
                         "Give a canny T2I-Adapter: 1 input channel (the edge map, as the original's) or 3 "
                         "(the edge map repeated as RGB), or leave --init-adapter out to start a 1-channel one.")
    return channels


def size_multiple(adapter: T2IAdapter) -> int:
    """The image side must be a multiple of this for the adapter's feature sizes to be whole."""
    downs = len(adapter.config.channels) - 1 if adapter.config.adapter_type == "full_adapter" else 1
    return adapter.config.downscale_factor * 2 ** downs


def save_adapter(adapter: T2IAdapter, folder: Path) -> Path:
    """`adapter.safetensors` (the diffusers T2IAdapter state dict: `adapter.conv_in.weight`,
    `adapter.body.0.resnets.0.block1.weight`, ...: ComfyUI's `load_controlnet` reads it) and
    `adapter_config.json` (the T2IAdapter config, for `load_adapter`)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to("cpu").contiguous() for key, value in adapter.state_dict().items()}
    path = folder / ADAPTER_FILE
    save_file(state, str(path), metadata={"format": "pt", "model": "T2IAdapter (diffusers)"})
    config = {key: (list(value) if isinstance(value, tuple) else value) for key, value in adapter.config.items()
              if not key.startswith("_")}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def load_adapter(path: str | Path) -> T2IAdapter:
    """A T2IAdapter from `save_adapter`'s folder or file (with adapter_config.json beside it), or a diffusers folder."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if (folder / ADAPTER_CONFIG).exists():
        adapter = T2IAdapter(**json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")))
        adapter.load_state_dict(load_file(str(path if path.is_file() else folder / ADAPTER_FILE)))
        return adapter
    return T2IAdapter.from_pretrained(str(path))


def encode_batch(pipe, prompts: list[str], size: int) -> dict[str, Any]:
    """UNet text inputs for the prompts (no CFG): SD1's hidden states; SDXL's also pooled embeds and time ids."""
    device = pipe.unet.device
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=device)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


# ---------------------------------------------------------------- checkpoints

def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    folders = [p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer.json").exists()] \
        if (out / CHECKPOINTS).is_dir() else []
    return max(folders, key=lambda p: int(re.sub(r"\D", "", p.name)), default=None)


def _resume_folder(settings: AdapterTrainSettings) -> Path | None:
    if settings.resume is None:
        return None
    folder = latest_checkpoint(settings.out) if settings.resume == "latest" else Path(settings.resume)
    if folder is None or not (folder / "trainer.json").exists():
        where = f"{settings.out / CHECKPOINTS}" if settings.resume == "latest" else settings.resume
        raise InputError(COMMAND, "--resume", f"no checkpoint in {where}",
                         "Give a checkpoint folder (out/checkpoints/step-...), or leave --resume out to start anew.")
    return folder


# ---------------------------------------------------------------- training

def _check(settings: AdapterTrainSettings) -> None:
    if settings.edge_method not in EDGE_METHODS:
        raise InputError(COMMAND, "--edge-method", f"unknown method {settings.edge_method!r}", f"Use one of {EDGE_METHODS}.")
    for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every"):
        if getattr(settings, name) < 1:
            raise InputError(COMMAND, "--" + name.replace("_", "-"), f"must be >= 1, got {getattr(settings, name)}",
                             "Give a positive integer.")
    if settings.lr <= 0 or settings.warmup < 0 or settings.edge_weight < 0:
        raise InputError(COMMAND, "--lr/--warmup/--edge-weight", "must be > 0, >= 0 and >= 0", "Fix the value.")
    if not 0.0 <= settings.empty_prompt_rate <= 1.0:
        raise InputError(COMMAND, "--empty-prompts", "must be a fraction in 0..1", "Give e.g. 0.5 (the paper's).")


def _micro_batch(samples: list[Sample], settings: AdapterTrainSettings, size: int, micro_step: int, process: int,
                 processes: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Generator]:
    """This process's share of global micro-batch `micro_step`, and the generator for its random draws."""
    indices = batch_indices(len(samples), settings.batch_size * processes, micro_step, settings.seed)
    mine = indices[process::processes]
    generator = torch.Generator().manual_seed((settings.seed * 1_000_003 + micro_step) * 1_009 + process)
    images, conditions = zip(*(load_example(samples[i], size) for i in mine))
    empty = torch.rand(len(mine), generator=generator) < settings.empty_prompt_rate
    prompts = ["" if drop else samples[i].caption for i, drop in zip(mine, empty.tolist())]
    return torch.stack(images), torch.stack(conditions), prompts, generator


def train_adapter(settings: AdapterTrainSettings, pipe=None) -> TrainResult:
    """Train (or resume training) an adapter; writes checkpoints and `out/adapter.safetensors`.

    `pipe`: an already loaded SD1/SDXL pipeline (default: `load_pipeline(settings.checkpoint, family)`).
    """
    from accelerate import Accelerator  # imported here: only training needs it
    from diffusers.optimization import get_scheduler

    _check(settings)
    samples = find_samples(settings.images)
    resume = _resume_folder(settings)
    accelerator = Accelerator(cpu=settings.device == "cpu")
    device = accelerator.device
    if pipe is None:
        pipe = load_pipeline(settings.checkpoint, settings.family, str(device), torch.float32, settings.seed)
    pipe.to(device)
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise InputError(COMMAND, "--checkpoint", f"the model predicts {pipe.scheduler.config.prediction_type}",
                         "The paper's loss is for epsilon-prediction models (SD1.x, SD2 base, SDXL); use one of those.")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device, torch.float32)
    train_steps = len(alphas_cumprod) if len(alphas_cumprod) else TRAIN_STEPS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        adapter = load_adapter(settings.init_adapter) if settings.init_adapter else adapter_for_unet(pipe.unet, settings.family)
    in_channels = condition_channels(adapter)  # from the adapter's own weights: a 3-channel one gets the map repeated
    size = settings.size or (TINY_IMAGE_SIZE if settings.checkpoint is None else PAPER_SIZE)
    multiple = size_multiple(adapter)
    if size % multiple:
        raise InputError(COMMAND, "--size", f"{size} is not a multiple of {multiple}",
                         f"The adapter's features need whole sizes: give a multiple of {multiple}, e.g. "
                         f"{max(multiple, round(size / multiple) * multiple)}.")
    min_area = max(1, round(BOX_MIN_AREA * size * size / PAPER_SIZE ** 2))  # 10000 px² at 512, same share of the image
    adapter.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, **settings.adam)
    # Not given to accelerator.prepare: its scheduler wrapper would step once per process.
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=settings.warmup,
                                 num_training_steps=settings.steps)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)

    start = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        start = json.loads((resume / "trainer.json").read_text(encoding="utf-8"))["step"]
    settings.out.mkdir(parents=True, exist_ok=True)
    vae_scale = pipe.vae.config.scaling_factor
    losses, checkpoints = [], []
    bar = tqdm(total=settings.steps, initial=start, desc="train-adapter", disable=not accelerator.is_main_process)
    for step in range(start, settings.steps):
        total = 0.0
        for micro in range(settings.grad_accumulation):
            micro_step = step * settings.grad_accumulation + micro
            images, conditions, prompts, generator = _micro_batch(
                samples, settings, size, micro_step, accelerator.process_index, accelerator.num_processes)
            batch = images.shape[0]
            masks = torch.stack([random_box_mask(size, size, min_area, generator) for _ in range(batch)]).to(device)
            t = cubic_timesteps(batch, generator, train_steps).to(device)
            with torch.no_grad():
                z0 = _encode(pipe, images.to(device), generator) * vae_scale
                text = encode_batch(pipe, prompts, size)
            noise = torch.randn(z0.shape, generator=generator).to(device)
            alpha_bar = alphas_cumprod[t]
            a = alpha_bar.view(-1, 1, 1, 1)
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
            sync = micro == settings.grad_accumulation - 1
            with nullcontext() if sync else accelerator.no_sync(adapter):
                features = mask_features(adapter(expand_condition(conditions, in_channels).to(device)), masks)
                eps = pipe.unet(z_t, t, down_intrablock_additional_residuals=list(features), **text).sample
                mask_latent = F.interpolate(masks, size=z0.shape[-2:], mode="nearest")
                loss, parts = localized_loss(eps, noise, z_t, z0, alpha_bar, t, mask_latent, settings.edge_weight,
                                             settings.edge_method)
                accelerator.backward(loss / settings.grad_accumulation)
            total += loss.item() / settings.grad_accumulation
        accelerator.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
        if not math.isfinite(total):
            raise FloatingPointError(f"train-adapter: the loss became {total} at step {step + 1}; lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", simple=f"{parts['simple'].item():.4f}",
                        edge=f"{parts['edge'].item():.2e}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            folder = checkpoint_dir(settings.out, step + 1)
            accelerator.save_state(str(folder))
            if accelerator.is_main_process:
                record = {"step": step + 1, "settings": _jsonable(settings)}
                (folder / "trainer.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
            checkpoints.append(folder)
    bar.close()
    accelerator.wait_for_everyone()
    path = settings.out / ADAPTER_FILE
    if accelerator.is_main_process:
        path = save_adapter(accelerator.unwrap_model(adapter), settings.out)
    return TrainResult(settings.steps, start, losses, path, checkpoints)


def _encode(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE posterior, its noise drawn from `generator` (on the CPU, for reproducibility)."""
    dist = pipe.vae.encode(images).latent_dist
    return dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)


def _jsonable(settings: AdapterTrainSettings) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in dataclasses.asdict(settings).items()}
