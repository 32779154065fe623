"""StyleReference: a real image as the StyleAligned reference, through DDIM or flow inversion.

The image is inverted once (UNets: StyleAligned's `inversion.py`, CFG 2; flow models, SD3/SD3.5 and
Flux.1: plain Euler up the flow ODE, dit.md §3.5) and, while sampling, the reference row of the
batch is pinned to the inverted trajectory. The original overwrites the latent after each DDIM step;
here the row is matched by timestep (flow models: by σ) at every model call, so any ComfyUI sampler
and scheduler works, and with 50 DDIM-spaced steps the two coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.inversion import (INVERSION_GUIDANCE, PIN_OFFSET, ddim_invert, ddim_timesteps, flow_inversion_sigmas,
                              flow_invert, nearest_step, pinned_step)
from .common import (CATEGORY, HIDDEN, batch_layout, checked_label, effective_override, is_pack_patch,
                     search_aliases, without_pack_patches)
from .style import StylePatch

STYLE_REFERENCE = "MultiCond_StyleReference"
PIN_WRAPPER_KEY = "multicond.pin_reference"


@dataclass
class PinReference:
    """APPLY_MODEL wrapper: the reference row's input is the inverted latent for this timestep."""

    trajectory: torch.Tensor  # (steps + 1, 1, C, h, w), noisiest first, on the model's input scale
    timesteps: list[int]  # DDIM's, noisiest first; empty on a flow model
    offset: int
    reference_index: int
    node: str = STYLE_REFERENCE  # the node's label in errors
    sigmas: list[float] | None = None  # a flow model's inversion sigmas, noisiest first: rows are matched by σ

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        transformer_options = args[3] if len(args) > 3 else kwargs["transformer_options"]
        self._check_style_patches(transformer_options)
        layout = batch_layout(transformer_options["cond_or_uncond"], x.shape[0], self.reference_index, self.node)
        if tuple(self.trajectory.shape[-2:]) != tuple(x.shape[-2:]):
            height, width = (8 * s for s in self.trajectory.shape[-2:])
            raise InputError(self.node, "image", f"the reference image is {width}x{height} px but the latent "
                             f"batch is {8 * x.shape[-1]}x{8 * x.shape[-2]} px",
                             "Scale the image (ImageScale) to the latent's size, or the latent to the image's.")
        sampling = executor.class_obj.model_sampling
        x = x.clone()
        for row in layout.reference_rows:
            sigma = t[row]
            if self.sigmas is not None:
                # A flow model takes x_σ itself (CONST's `calculate_input` is the identity): no rescaling.
                x[row] = self._latent(nearest_step(float(sigma), self.sigmas)).to(x.device, x.dtype)
                continue
            latent = self._latent(nearest_step(float(sampling.timestep(sigma)), self.timesteps)).to(x.device, x.dtype)
            # The UNet sees x / sqrt(sigma^2 + 1) (ComfyUI's `calculate_input`): feed it the VP latent itself.
            x[row] = latent * (sigma.to(x.dtype) ** 2 + 1) ** 0.5
        return executor(x, t, *args, **kwargs)

    def _latent(self, step: int) -> torch.Tensor:
        return self.trajectory[pinned_step(step, self.offset)][0]

    def _check_style_patches(self, transformer_options: dict) -> None:
        """The pinned image must be the one Shared Attention / AdaIN Style take style from."""
        stages = style_stages(transformer_options)
        if not stages:
            raise InputError(self.node, "model", "no Shared Attention or AdaIN Style on the sampled model takes style "
                             "from the pinned image", "Connect the model through Shared Attention and/or AdaIN Style "
                             "(before or after this node).")
        others = sorted({stage.reference_index for stage in stages} - {self.reference_index})
        if others:
            raise InputError(self.node, "reference_index", f"the image is pinned to row {self.reference_index}, but "
                             f"Shared Attention / AdaIN Style take style from row {others[0]}",
                             "Give Style Reference Image the same reference_index as Shared Attention and AdaIN Style.")


def style_stages(transformer_options: dict) -> list[Any]:
    """The Shared Attention / AdaIN Style stages of a call: UNet attn1 patches and the DiT attention override.

    The override chain is walked through the pack's patches (each keeps what it replaced in `inner`);
    any of them with `share`/`adain` stages counts, so every DiT family's style patch is found.
    """
    slots = transformer_options.get("patches_replace", {}).get("attn1", {}).values()
    patches = [patch for patch in slots if isinstance(patch, StylePatch)]
    override = effective_override(transformer_options)  # a later node's override may still be put beneath the pack's
    while override is not None and is_pack_patch(override):
        patches.append(override)
        override = getattr(override, "inner", None)
    return [stage for patch in patches for stage in (getattr(patch, "share", None), getattr(patch, "adain", None))
            if stage is not None]


def is_flow(model: Any) -> bool:
    """A flow-matching model (SD3/SD3.5, Flux): ComfyUI gives it CONST sampling (dit.md §6)."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def invert(model: Any, latent: torch.Tensor, positive: Any, negative: Any, steps: int, cfg: float,
           label: str = STYLE_REFERENCE) -> tuple[torch.Tensor, list[int] | list[float]]:
    """Invert a VAE latent with the model's own CFG: DDIM on a UNet (keys: timesteps), Euler on a flow model
    (keys: sigmas). The trajectory is on the model's input scale, noisiest first.
    """
    if is_flow(model):
        return invert_flow(model, latent, positive, negative, steps, cfg, label)
    return invert_ddim(model, latent, positive, negative, steps, cfg, label)


def invert_ddim(model: Any, latent: torch.Tensor, positive: Any, negative: Any, steps: int, cfg: float,
                label: str = STYLE_REFERENCE) -> tuple[torch.Tensor, list[int]]:
    """DDIM-invert a VAE latent with the model's own CFG; returns the trajectory on the UNet input scale.

    Minutes on a CPU at the paper's 50 steps: a bar in the UI (ComfyUI's ProgressBar) and in the terminal.
    """
    sampling = model.get_model_object("model_sampling")
    alphas_cumprod = 1.0 / (1.0 + sampling.sigmas.float().cpu() ** 2)
    timesteps = ddim_timesteps(steps, train_steps=len(alphas_cumprod))
    result: dict[str, torch.Tensor] = {}
    ui_bar = comfy.utils.ProgressBar(len(timesteps))
    terminal_bar = tqdm(total=len(timesteps), desc=f"{label}: DDIM inversion", unit="step")

    def inversion_sampler(model_fn: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, callback: Any = None,
                          disable: Any = None) -> torch.Tensor:
        ones = x.new_ones([x.shape[0]])

        def predict_noise(z: torch.Tensor, timestep: int) -> torch.Tensor:
            sigma = sampling.sigma(torch.tensor(float(timestep))).to(x.device, x.dtype)
            scaled = z * (sigma ** 2 + 1) ** 0.5
            noise = (scaled - model_fn(scaled, sigma * ones, **extra_args)) / sigma
            ui_bar.update(1)
            terminal_bar.update(1)
            return noise

        result["trajectory"] = ddim_invert(x, predict_noise, alphas_cumprod, timesteps)
        return x

    sigmas = torch.stack([sampling.sigma(torch.tensor(float(t))) for t in reversed(timesteps)]).float()
    # The original inverts with the plain pipeline: no style, blend, guidance or pin of this pack takes part.
    try:
        comfy.sample.sample_custom(without_pack_patches(model), torch.zeros_like(latent), cfg,
                                   comfy.samplers.KSAMPLER(inversion_sampler), sigmas, positive, negative, latent,
                                   disable_pbar=True, seed=0)
    finally:
        terminal_bar.close()
    return result["trajectory"].cpu(), timesteps


def invert_flow(model: Any, latent: torch.Tensor, positive: Any, negative: Any, steps: int, cfg: float,
                label: str = STYLE_REFERENCE) -> tuple[torch.Tensor, list[float]]:
    """Euler-invert a VAE latent up the flow ODE with the model's own CFG; returns the trajectory (x_σ as the
    model takes it) and its sigmas, noisiest first.

    The schedule is ComfyUI's "normal" one for the model over `steps + 1` sigmas, from σ_max down to the
    smallest positive σ; σ_max (1) is clamped just below 1 (`flow_inversion_sigmas`).
    """
    sampling = model.get_model_object("model_sampling")
    sigmas = flow_inversion_sigmas(comfy.samplers.calculate_sigmas(sampling, "normal", steps + 1).tolist())
    result: dict[str, torch.Tensor] = {}
    ui_bar = comfy.utils.ProgressBar(len(sigmas) - 1)
    terminal_bar = tqdm(total=len(sigmas) - 1, desc=f"{label}: flow inversion", unit="step")

    def inversion_sampler(model_fn: Any, x: torch.Tensor, sampler_sigmas: torch.Tensor, extra_args: dict,
                          callback: Any = None, disable: Any = None) -> torch.Tensor:
        ones = x.new_ones([x.shape[0]])

        def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
            denoised = model_fn(z, sigma * ones, **extra_args)
            ui_bar.update(1)
            terminal_bar.update(1)
            return (z - denoised) / sigma  # CONST: denoised = x − σ·v

        # CONST's noise scaling started the sampler at (1 − σ_first)·latent (zero noise): undo it.
        clean = x / (1.0 - sampler_sigmas[0].to(x.dtype))
        result["trajectory"] = flow_invert(clean, velocity, sigmas)
        return x

    # Ascending, as the inversion runs: the sampler's closing x / (1 − σ_last) stays finite below 1.
    sampler_sigmas = torch.tensor(sigmas[::-1], dtype=torch.float32)
    try:
        comfy.sample.sample_custom(without_pack_patches(model), torch.zeros_like(latent), cfg,
                                   comfy.samplers.KSAMPLER(inversion_sampler), sampler_sigmas, positive, negative,
                                   latent, disable_pbar=True, seed=0)
    finally:
        terminal_bar.close()
    return result["trajectory"].cpu(), sigmas


def latent_channels(model: Any) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def check_channels(label: str, name: str, samples: torch.Tensor, model: Any) -> None:
    """A latent of another family (4 channels on SD3's 16) is refused by name, not by a shape error mid-sampling."""
    expected = latent_channels(model)
    if samples.shape[1] != expected:
        what = "the VAE encodes" if name == "vae" else "the latent has"
        raise InputError(label, name, f"{what} {samples.shape[1]} latent channels but the model takes {expected}",
                         "Use the VAE and the latent of the model's family (SD3/SD3.5 and Flux: 16 channels).")


def check_against_latent(label: str, image: torch.Tensor, samples: torch.Tensor, reference_index: int) -> None:
    """What sampling would refuse after the inversion, refused before it: the image size and the reference row.

    Every supported family's VAE scales by 8 (SD1.x/SDXL with 4 latent channels, SD3/SD3.5 and Flux with 16).
    """
    height, width = image.shape[1:3]
    if (height, width) != (8 * samples.shape[-2], 8 * samples.shape[-1]):
        raise InputError(label, "image", f"the reference image is {width}x{height} px but the latent is "
                         f"{8 * samples.shape[-1]}x{8 * samples.shape[-2]} px",
                         "Scale the image (ImageScale) to the latent's size, or the latent to the image's.")
    if reference_index >= samples.shape[0]:
        raise InputError(label, "reference_index", f"{reference_index} is not an image of the latent batch of "
                         f"{samples.shape[0]}", f"Use an index below {samples.shape[0]}, or a larger batch.")


class StyleReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=STYLE_REFERENCE,
            **search_aliases("style transfer", "reference image", "style image", "image prompt", "ddim inversion",
                             "flow inversion"),
            display_name="Style Reference Image (StyleAligned)",
            category=f"{CATEGORY}/style",
            description="Use a real image as the style reference: inverts it (DDIM on SD1.x/SDXL, Euler up the flow "
                        "ODE on SD3/SD3.5 and Flux.1) and pins image reference_index of the latent batch to the "
                        "inverted trajectory while sampling. Works with any sampler. Connect the model through Shared "
                        "Attention and AdaIN Style (in any order).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 model."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the reference image."),
                io.Image.Input("image", tooltip="The reference image, at the latent batch's size (width and height x8)."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the reference image (used for the inversion)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt for the inversion (paper: empty)."),
                io.Int.Input("reference_index", default=0, min=0, max=63,
                             tooltip="The batch image pinned to the reference; use the same value in Shared Attention."),
                io.Int.Input("inversion_steps", default=50, min=2, max=1000,
                             tooltip="Steps of the inversion (paper: 50; DDIM on UNets, Euler on flow models). Any "
                                     "sampler can be used afterwards."),
                io.Float.Input("inversion_cfg", default=INVERSION_GUIDANCE, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale of the inversion (paper: 2, on UNets). On SD3/SD3.5 "
                                       "1 is usual: plain Euler inversion drifts more with guidance. Flux.1: 1 "
                                       "(dev keeps its distilled guidance from the positive prompt)."),
                io.Int.Input("offset", default=PIN_OFFSET, min=0, max=999,
                             tooltip="The reference starts this many inversion steps below pure noise (paper: 5)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the latent batch you will sample (e.g. Empty Latent Image). "
                                        "Connected, its size and batch are checked before the inversion starts."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the reference row pinned to the inverted image.")],
        )

    @classmethod
    def execute(cls, model: Any, vae: Any, image: torch.Tensor, positive: Any, negative: Any, reference_index: int,
                inversion_steps: int, inversion_cfg: float, offset: int, latent: dict | None = None) -> io.NodeOutput:
        label = checked_label(cls, locals())
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(label, "image", f"expected one image, got a batch of shape {tuple(image.shape)}",
                             "Pass a single image (ImageFromBatch picks one).")
        if offset >= inversion_steps:
            raise InputError(label, "offset", f"{offset} is not below inversion_steps ({inversion_steps})",
                             "Set offset below inversion_steps (paper: 5 of 50).")
        if latent is not None:
            check_channels(label, "latent", latent["samples"], model)
            check_against_latent(label, image, latent["samples"], reference_index)
        encoded = vae.encode(image[..., :3])
        check_channels(label, "vae", encoded, model)
        trajectory, keys = invert(model, encoded, positive, negative, inversion_steps, inversion_cfg, label)
        flow = is_flow(model)
        pin = PinReference(trajectory, [] if flow else keys, offset, reference_index, label, keys if flow else None)
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PIN_WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PIN_WRAPPER_KEY, pin)
        return io.NodeOutput(patched)
