"""StyleReference: a real image as the StyleAligned reference, through DDIM inversion.

The image is inverted once (StyleAligned's `inversion.py`, CFG 2) and, while sampling, the
reference row of the batch is pinned to the inverted trajectory. The original overwrites the
latent after each DDIM step; here the row is matched by timestep at every model call, so any
ComfyUI sampler and scheduler works, and with 50 DDIM-spaced steps the two coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.inversion import INVERSION_GUIDANCE, PIN_OFFSET, ddim_invert, ddim_timesteps, nearest_step, pinned_step
from .common import CATEGORY, HIDDEN, batch_layout, checked_label, model_layout, search_aliases, without_pack_patches
from .style import StylePatch

STYLE_REFERENCE = "MultiCond_StyleReference"
PIN_WRAPPER_KEY = "multicond.pin_reference"


@dataclass
class PinReference:
    """APPLY_MODEL wrapper: the reference row's input is the inverted latent for this timestep."""

    trajectory: torch.Tensor  # (steps + 1, 1, C, h, w), noisiest first, on the UNet's input scale
    timesteps: list[int]
    offset: int
    reference_index: int
    node: str = STYLE_REFERENCE  # the node's label in errors

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
            step = nearest_step(float(sampling.timestep(sigma)), self.timesteps)
            latent = self.trajectory[pinned_step(step, self.offset)][0].to(x.device, x.dtype)
            # The UNet sees x / sqrt(sigma^2 + 1) (ComfyUI's `calculate_input`): feed it the VP latent itself.
            x[row] = latent * (sigma.to(x.dtype) ** 2 + 1) ** 0.5
        return executor(x, t, *args, **kwargs)

    def _check_style_patches(self, transformer_options: dict) -> None:
        """The pinned image must be the one Shared Attention / AdaIN Style take style from."""
        slots = transformer_options.get("patches_replace", {}).get("attn1", {}).values()
        stages = [stage for patch in slots if isinstance(patch, StylePatch) for stage in (patch.share, patch.adain) if stage]
        if not stages:
            raise InputError(self.node, "model", "no Shared Attention or AdaIN Style on the sampled model takes style "
                             "from the pinned image", "Connect the model through Shared Attention and/or AdaIN Style "
                             "(before or after this node).")
        others = sorted({stage.reference_index for stage in stages} - {self.reference_index})
        if others:
            raise InputError(self.node, "reference_index", f"the image is pinned to row {self.reference_index}, but "
                             f"Shared Attention / AdaIN Style take style from row {others[0]}",
                             "Give Style Reference Image the same reference_index as Shared Attention and AdaIN Style.")


def invert(model: Any, latent: torch.Tensor, positive: Any, negative: Any, steps: int, cfg: float,
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


def check_against_latent(label: str, image: torch.Tensor, samples: torch.Tensor, reference_index: int) -> None:
    """What sampling would refuse after the inversion, refused before it: the image size and the reference row."""
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
            **search_aliases("style transfer", "reference image", "style image", "image prompt", "ddim inversion"),
            display_name="Style Reference Image (StyleAligned)",
            category=f"{CATEGORY}/style",
            description="Use a real image as the style reference: DDIM-inverts it and pins image reference_index of "
                        "the latent batch to the inverted trajectory while sampling. Works with any sampler. "
                        "Connect the model through Shared Attention and AdaIN Style (in any order).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the reference image."),
                io.Image.Input("image", tooltip="The reference image, at the latent batch's size (width and height x8)."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the reference image (used for the inversion)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt for the inversion (paper: empty)."),
                io.Int.Input("reference_index", default=0, min=0, max=63,
                             tooltip="The batch image pinned to the reference; use the same value in Shared Attention."),
                io.Int.Input("inversion_steps", default=50, min=2, max=1000,
                             tooltip="DDIM steps of the inversion (paper: 50). Any sampler can be used afterwards."),
                io.Float.Input("inversion_cfg", default=INVERSION_GUIDANCE, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale of the inversion (paper: 2)."),
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
        model_layout(model, label)
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(label, "image", f"expected one image, got a batch of shape {tuple(image.shape)}",
                             "Pass a single image (ImageFromBatch picks one).")
        if offset >= inversion_steps:
            raise InputError(label, "offset", f"{offset} is not below inversion_steps ({inversion_steps})",
                             "Set offset below inversion_steps (paper: 5 of 50).")
        if latent is not None:
            check_against_latent(label, image, latent["samples"], reference_index)
        encoded = vae.encode(image[..., :3])
        trajectory, timesteps = invert(model, encoded, positive, negative, inversion_steps, inversion_cfg, label)
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PIN_WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PIN_WRAPPER_KEY,
                                     PinReference(trajectory, timesteps, offset, reference_index, label))
        return io.NodeOutput(patched)
