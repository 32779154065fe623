"""BatchPrompts: one prompt per image of the latent batch (StyleAligned's sets of prompts).

ComfyUI gives row i of the latent batch row i of a conditioning whose batch equals the latent's
(`CONDCrossAttn.process_cond` -> `repeat_to_batch_size`), and SDXL's `encode_adm` takes a batched
`pooled_output`, so a CONDITIONING with one row per image is all per-image prompts need.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from comfy_api.latest import io

from ..core.errors import InputError
from .common import CATEGORY, HIDDEN, checked_label, search_aliases

BATCH_PROMPTS = "MultiCond_BatchPrompts"
MAX_BATCH = 4096  # as EmptyLatentImage
MAX_TOKEN_REPEAT = 4  # a padded sequence may be at most this many times the longest prompt's


def prompt_lines(prompts: str, style: str) -> list[str]:
    """The non-blank lines, each with the style appended as the paper writes it: "{prompt}, {style}"."""
    style = style.strip()
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise InputError(BATCH_PROMPTS, "prompts", "there is no non-empty line",
                         "Write one prompt per line; line 1 is the style reference image's prompt.")
    return [f"{line}, {style}" if style else line for line in lines]


def fill_batch(lines: list[str], batch_size: int) -> list[str]:
    """One prompt per image: the lines as they are (0), or repeated cyclically to batch_size."""
    if batch_size == 0:
        return lines
    if batch_size < len(lines):
        raise InputError(BATCH_PROMPTS, "batch_size", f"{batch_size} images cannot take the {len(lines)} prompts "
                         f"(lines after {batch_size} would be dropped)",
                         f"Set batch_size to 0 (one image per line) or to {len(lines)} or more, or remove lines.")
    return [lines[i % len(lines)] for i in range(batch_size)]


def encode(clip: Any, prompt: str) -> dict[str, Any]:
    """What CLIPTextEncode computes for one prompt: {"cond", "pooled_output", extra keys}."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)


def stack_tokens(conds: list[torch.Tensor]) -> torch.Tensor:
    # Repeating a whole token sequence k times leaves cross-attention unchanged (each key's weight
    # splits k ways over identical values), so padding to the LCM length, as CONDCrossAttn.concat does, is exact.
    longest = max(c.shape[1] for c in conds)
    length = math.lcm(*(c.shape[1] for c in conds))
    if length > MAX_TOKEN_REPEAT * longest:
        lengths = sorted({c.shape[1] for c in conds})
        raise InputError(BATCH_PROMPTS, "prompts", f"prompts of {lengths} tokens pad to {length} tokens each",
                         "Give the prompts similar lengths (e.g. all within 75 tokens) so their token counts match.")
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def stack_extra(key: str, values: list[Any]) -> Any:
    """A per-prompt extra output as one batch: tensors concatenated, anything else (hooks) from prompt 1."""
    if not all(isinstance(v, torch.Tensor) for v in values):
        return values[0]
    if len({tuple(v.shape) for v in values}) > 1:
        raise InputError(BATCH_PROMPTS, "prompts", f"the text encoder's '{key}' differs in shape between prompts",
                         "Give the prompts the same token length (e.g. all within 75 tokens).")
    return torch.cat(values)


def batch_conditioning(clip: Any, prompts: list[str]) -> list:
    """A one-entry CONDITIONING whose row i is the encoding of prompts[i] (each distinct prompt encoded once)."""
    encoded = {prompt: encode(clip, prompt) for prompt in dict.fromkeys(prompts)}
    rows = [encoded[prompt] for prompt in prompts]
    cond = stack_tokens([row["cond"] for row in rows])
    extra = {key: stack_extra(key, [row[key] for row in rows]) for key in rows[0] if key != "cond"}
    return [[cond, extra]]


class BatchPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=BATCH_PROMPTS,
            **search_aliases("prompt list", "multiple prompts", "prompt batch", "one prompt per image"),
            display_name="Batch Prompts (one per image)",
            category=f"{CATEGORY}/style",
            description="One prompt per image of the latent batch, as StyleAligned's sets of prompts: line 1 is "
                        "image 0, the style reference; image i takes line i, with the style appended to every line. "
                        "The latent batch_size the KSampler samples (EmptyLatentImage) must equal the number of "
                        "images: a larger batch repeats the prompts cyclically, a smaller one drops the last ones.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP model used for encoding the prompts (SD1.x, SDXL, ...)."),
                io.String.Input("prompts", multiline=True, dynamic_prompts=True,
                                default="a toy train\na toy airplane\na toy bicycle\na toy car",
                                tooltip="One prompt per line, one line per image; blank lines are ignored. "
                                        "Line 1 is the reference image's prompt (image 0)."),
                io.Int.Input("batch_size", default=0, min=0, max=MAX_BATCH,
                             tooltip="Number of images: 0 = one per line; more repeats the lines cyclically. "
                                     "Must equal the latent batch_size."),
                io.String.Input("style", optional=True, default="", multiline=False, dynamic_prompts=True,
                                tooltip="Appended to every line as \"{prompt}, {style}\" (the paper's "
                                        "convention); empty: the lines as written."),
            ],
            outputs=[io.Conditioning.Output(tooltip="One conditioning row per image: row i is line i encoded "
                                                    "alone, pooled output batched alike.")],
        )

    @classmethod
    def execute(cls, clip: Any, prompts: str, batch_size: int, style: str = "") -> io.NodeOutput:
        label = checked_label(cls, locals())
        if clip is None:
            raise InputError(label, "clip", "no CLIP model", "Connect a CLIP (the checkpoint may have none).")
        return io.NodeOutput(batch_conditioning(clip, fill_batch(prompt_lines(prompts, style), batch_size)))
