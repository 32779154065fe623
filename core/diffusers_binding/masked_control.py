"""A ControlNet that acts only inside a mask, on SD3/SD3.5 and Flux pipelines (localized control, dit.md §4.5).

`install_masked_controlnet(pipe, mask)` puts a forward hook on the pipeline's `SD3ControlNetModel` /
`FluxControlNetModel` (or their Multi- wrappers): every residual it returns, image tokens `[B, L, C]`, is
multiplied by the mask resized to the latent's token grid and flattened row-major (core `mask_tokens`, the
function the ComfyUI node uses), before the transformer adds it to its image tokens. An all-ones mask leaves
the residuals bit-identical, an all-zeros mask equals no control. Returns a handle whose `remove()` takes the
hook off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapter import mask_tokens
from .handle import ProcessorHandle
from .processor import call_argument

# SD3ControlNetModel.forward(hidden_states, controlnet_cond, ...); FluxControlNetModel takes img_ids by keyword.
HIDDEN = 0


@dataclass
class TokenMaskHook:
    """The ControlNet's forward hooks: the latent size from its input, then its residual lists masked."""

    mask: torch.Tensor
    mode: str = "nearest"
    feather: float = 0.0
    latent_size: tuple[int, int] = (0, 0)

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = call_argument(args, kwargs, HIDDEN, "hidden_states")
        if hidden.ndim == 4:  # SD3: the latent itself
            self.latent_size = tuple(hidden.shape[-2:])
            return
        ids = kwargs.get("img_ids")  # Flux: packed tokens, the grid read from the image ids (2x2 pixels per token)
        if ids is None:
            raise ValueError("the masked ControlNet needs Flux's img_ids to find the token grid (FluxControlNetPipeline "
                             "passes them)")
        ids = ids[0] if ids.ndim == 3 else ids
        self.latent_size = (2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1))

    def after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        masked = [self.masked(part) for part in (output if isinstance(output, tuple) else output.to_tuple())]
        if isinstance(output, tuple):
            return tuple(masked)
        return type(output)(*masked)

    def masked(self, residuals: Any) -> Any:
        if residuals is None:
            return None
        return mask_tokens(list(residuals), self.mask, self.latent_size, self.mode, self.feather)


def install_masked_controlnet(pipe_or_controlnet: Any, mask: torch.Tensor, mode: str = "nearest",
                              feather: float = 0.0) -> ProcessorHandle:
    """Mask the control of an SD3/SD3.5 or Flux ControlNet pipeline (or of the ControlNet model itself).

    `mask` is `(H, W)` or `(B, H, W)` in [0, 1], 1 where the control acts, at any size (resized to the token
    grid with `mode`, blurred by `feather` mask pixels first). One mask per image of a batch is repeated over
    the CFG halves.
    """
    controlnet = getattr(pipe_or_controlnet, "controlnet", pipe_or_controlnet)
    if not isinstance(controlnet, torch.nn.Module):
        raise TypeError(f"install_masked_controlnet needs an SD3/Flux ControlNet pipeline or model, got "
                        f"{type(pipe_or_controlnet).__name__}")
    hook = TokenMaskHook(mask.detach().float().cpu(), mode, feather)
    handle = ProcessorHandle(controlnet)
    handle.hooks.append(controlnet.register_forward_pre_hook(hook.before, with_kwargs=True))
    handle.hooks.append(controlnet.register_forward_hook(hook.after, with_kwargs=True))
    return handle
