"""Command line of the diffusers binding: `python -m multicond <command> ...`.

Commands: `style-aligned` (a batch of images sharing the first one's style, optionally from a
real reference image through DDIM inversion), `dual-style` (two prompts in one image, blended by a
spatial profile or a mask), `spatial` (InfSplign: objects where the prompt's relation puts them,
e.g. "a cat to the left of a dog"), `analyze` (a Conditional Balance grading from a StyleAligned
image series; shards across processes under `accelerate launch`), `train-adapter` (a localized,
masked-feature T2I-Adapter) and `score-local` (LF-MSE and DiffCC). Without `--checkpoint` a tiny random
model is used: it shows the pipeline runs end to end, its images are noise.

Only the standard library is imported here: `--help` and flag errors answer in a fraction of a
second, and each command imports torch, diffusers and the method code when it runs. Relative
paths are the caller's (the current directory), outputs default to `outputs/<command>/` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ..errors import InputError
    from ..spatial import SpatialSettings
    from ..style import StyleAlignedArgs
    from .analysis import Series
    from .dual_style import Weights
    from .spatial import SpatialResult

Command = Callable[[argparse.Namespace], int]

PROG_VARIABLE = "MULTICOND_PROG"  # scripts/run.sh sets it, so usage lines show the command the user typed
DEFAULT_PROG = "python -m multicond"

RANDOM_WEIGHTS_NOTICE = ("No --checkpoint given: using a tiny model with RANDOM weights. It shows that the "
                         "pipeline runs end to end; the images are noise.")

# ---------------------------------------------------------------- help-time facts
# Mirrors of library values, here because importing the library (torch, diffusers) takes seconds and
# --help must not; tests/test_cli.py checks each against its source.
FAMILIES: tuple[str, ...] = ("sd1", "sdxl")  # tiny.FAMILIES
DIT_FAMILIES: tuple[str, ...] = ("sd3", "flux")  # tiny.DIT_FAMILIES
TINY_T5_TOKENS = 64  # tiny.TINY_T5_TOKENS
FLUX_SCORE_SCALE = 1.1  # joint_style_flux.ALIGNEDGEN_SCORE_SCALE
TINY_IMAGE_SIZE = 64  # tiny.TINY_IMAGE_SIZE
INVERSION_GUIDANCE = 2.0  # core.inversion.INVERSION_GUIDANCE
PIN_OFFSET = 5  # core.inversion.PIN_OFFSET
STYLE_ALIGNED_DEFAULTS: dict[str, bool | float] = {  # core.style.StyleAlignedArgs()
    "share_group_norm": True, "share_layer_norm": True, "share_attention": True, "adain_queries": True,
    "adain_keys": True, "adain_values": False, "full_attention_share": False, "shared_score_scale": 1.0,
    "shared_score_shift": 0.0, "only_self_level": 0.0}
SHAPES: tuple[str, ...] = ("sigmoid", "linear", "cosine")  # core.blend.SHAPES
DIRECTIONS: tuple[str, ...] = ("left to right", "top to bottom", "right to left", "bottom to top")  # core.blend
EPSILON_SHARPNESS = 20.0  # core.blend.EPSILON_SHARPNESS
CROSS_ATTENTION_SHARPNESS = 30.0  # core.blend.CROSS_ATTENTION_SHARPNESS
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to")  # core.spatial.RELATIONS
PHI_NAMES: tuple[str, ...] = ("gelu", "sigmoid", "relu", "leaky_relu", "squared_relu", "selu", "softplus", "silu",
                              "hardtanh", "linear", "rrelu", "celu", "logrelu", "elu", "softsign")  # core.spatial.PHI
SPATIAL_DEFAULTS: dict[str, str | float] = {  # core.spatial.SpatialSettings()
    "relation": "left of", "phi": "gelu", "alpha": 0.75, "margin": 0.25, "lambda_spatial": 1.0,
    "lambda_presence": 1.0, "lambda_balance": 1.0, "weight": 1000.0}

# The switches of StyleAlignedArgs, each with what it does.
STYLE_ALIGNED_SWITCHES: dict[str, str] = {
    "share_group_norm": "normalise each image's GroupNorm features with statistics joint with the reference's",
    "share_layer_norm": "the original's LayerNorm switch, kept for parity; a no-op (LayerNorm is per token)",
    "share_attention": "let every image's self-attention also attend to the reference's keys and values",
    "adain_queries": "AdaIN: give the queries the reference's per-channel token mean and std",
    "adain_keys": "AdaIN: give the keys the reference's per-channel token mean and std",
    "adain_values": "AdaIN: give the values the reference's per-channel token mean and std",
    "full_attention_share": "every image attends to every image's keys and values, without AdaIN (the original's "
                            "full share)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default at the end of its help, unless its text already says it; "(required)" for the others."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        return text if "default" in text.lower() else super()._get_help_string(action)


def program() -> str:
    """How the user called us: scripts/run.sh exports its own path, plain `python -m multicond` otherwise."""
    return os.environ.get(PROG_VARIABLE) or DEFAULT_PROG


# ---------------------------------------------------------------- shared flags and helpers

def add_model_flags(parser: argparse.ArgumentParser, dits: bool = False) -> None:
    """--checkpoint, --family and --tokenizer: which model, and where a single file's tokenizer is.

    `dits`: the command also runs SD3/SD3.5 and Flux.1 (diffusers folders; tiny random DiTs without a checkpoint).
    """
    dit_text = ("; SD3/SD3.5 and Flux.1 as diffusers folders" if dits else "")
    parser.add_argument("--checkpoint",
                        help=f"a diffusers model folder or an SD1.x/SDXL .safetensors/.ckpt file{dit_text}, loaded "
                             "offline (default: a tiny model with random weights: it runs the pipeline, its images "
                             "are noise)")
    families = FAMILIES + DIT_FAMILIES if dits else FAMILIES
    parser.add_argument("--family", choices=families, default="sd1",
                        help="model family: sd1 (SD1.x/2.x) or sdxl" + (", sd3 (SD3/SD3.5) or flux (Flux.1 dev, "
                                                                         "schnell)" if dits else "")
                             + "; must match --checkpoint")
    parser.add_argument("--tokenizer", type=Path,
                        help="folder with CLIP's vocab.json and merges.txt, for a single-file --checkpoint (default: "
                             "ComfyUI's comfy/sd1_tokenizer when the checkpoint is inside a ComfyUI install, else "
                             "the local Hugging Face cache; nothing is downloaded)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--steps and --cfg, unset meaning the family's (`family_defaults`)."""
    parser.add_argument("--steps", type=int, help=f"sampler steps (default: {DEFAULT_STEPS['sd1']} DDIM steps; "
                                                  f"{DEFAULT_STEPS['sd3']} Euler steps on SD3 and Flux)")
    parser.add_argument("--cfg", type=float,
                        help=f"classifier-free guidance scale, > 1 on UNets (default: {DEFAULT_CFG['sd1']:g}; SD3 "
                             f"{DEFAULT_CFG['sd3']:g}; Flux-dev: its distilled guidance, {DEFAULT_CFG['flux']:g})")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N ...; auto: a CUDA GPU when there is one, else cpu")


def add_out_flag(parser: argparse.ArgumentParser, command: str, what: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("outputs", command),
                        help=f"folder for {what}, relative to the current directory")


def resolve_device(name: str) -> str:
    """`auto`: a CUDA GPU when there is one, else the CPU; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(ns: argparse.Namespace, message: str) -> NoReturn:
    """A usage error of the command (`usage: ...` and `error: message`, exit status 2)."""
    parser: argparse.ArgumentParser = ns.parser
    parser.error(message)


def input_error_message(error: InputError) -> str:
    """A loader's `InputError` as one line: the flag, what is wrong with it, the fix."""
    return f"{error.input_name} {error.problem}. {error.fix}"


def check_checkpoint(ns: argparse.Namespace) -> None:
    """Fail before any heavy import when --checkpoint or --tokenizer names nothing."""
    if ns.checkpoint is not None and not Path(ns.checkpoint).exists():
        fail(ns, f"--checkpoint {ns.checkpoint}: no such file or folder (in {Path.cwd()})")
    if ns.checkpoint is not None and ns.tokenizer is not None and not ns.tokenizer.is_dir():
        fail(ns, f"--tokenizer {ns.tokenizer}: no such folder (in {Path.cwd()})")


def read_image(ns: argparse.Namespace, flag: str, path: Path) -> Image.Image:
    """An image file read in full, or a usage error naming the flag when it is missing or unreadable."""
    from PIL import Image

    if not path.is_file():
        fail(ns, f"{flag} {path}: no such file (in {Path.cwd()})")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        fail(ns, f"{flag} {path}: cannot read it as an image ({error}); give a PNG or JPEG")


def load_model(ns: argparse.Namespace, device: str, seed: int) -> DiffusionPipeline:
    """The tiny random pipeline without --checkpoint, else the checkpoint (its input problems are usage errors)."""
    import torch

    from ..errors import InputError
    from .pipeline import load_checkpoint
    from .tiny import tiny_pipeline

    if ns.checkpoint is None:
        if ns.family in DIT_FAMILIES:
            from .tiny import tiny_dit_pipeline

            return tiny_dit_pipeline(ns.family, seed).to(device)
        return tiny_pipeline(ns.family, seed).to(device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return load_checkpoint(ns.checkpoint, ns.family, device, dtype, ns.tokenizer)
    except InputError as error:
        fail(ns, input_error_message(error))


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` CPU threads (None: unchanged), then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_threads(ns: argparse.Namespace, device: str) -> int | None:
    """One thread for the tiny model on the CPU: its ops are so small that more threads only add synchronisation."""
    return 1 if ns.checkpoint is None and device == "cpu" else None


TORCHVISION_NOTICE = "requires torchvision (not installed)"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_NOTICE not in record.getMessage()


def quiet_torchvision_notice() -> None:
    """Drop transformers' notice that its image processors fall back to PIL without torchvision.

    diffusers' import touches those processors, so it printed on every run; no command here uses
    them. Only that message is dropped: every other warning and error of transformers still shows.
    """
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionNotice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionNotice())


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "image"


# ---------------------------------------------------------------- style-aligned

# Per family: the pipelines' defaults (SD3: StableDiffusion3Pipeline's 28 steps, CB35's count, and CFG 7;
# Flux-dev: FluxPipeline's 28 steps and distilled guidance 3.5).
DEFAULT_STEPS = {"sd1": 50, "sdxl": 50, "sd3": 28, "flux": 28}
DEFAULT_CFG = {"sd1": 7.5, "sdxl": 7.5, "sd3": 7.0, "flux": 3.5}

# The StyleAligned SDXL demo's example set.
PAPER_PROMPTS = ("a toy train", "a toy airplane", "a toy bicycle", "a toy car")
PAPER_STYLE = "macro photo. 3d game asset"


def _add_style_aligned_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `StyleAlignedArgs` field, defaulting to the paper's values."""
    defaults = STYLE_ALIGNED_DEFAULTS
    group = parser.add_argument_group("StyleAligned settings (defaults: the paper's)")
    for name, meaning in STYLE_ALIGNED_SWITCHES.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                           default=defaults[name], help=meaning)
    group.add_argument("--score-scale", dest="shared_score_scale", type=float,
                       help=f"multiply the reference keys seen by the other images (default: "
                            f"{defaults['shared_score_scale']:g}; {FLUX_SCORE_SCALE:g} on Flux, AlignedGen's)")
    group.add_argument("--score-shift", dest="shared_score_shift", type=float,
                       default=defaults["shared_score_shift"],
                       help="add to the logits of the reference keys; log 2 = 0.693 doubles their weight")
    group.add_argument("--only-self-level", dest="only_self_level", type=float, default=defaults["only_self_level"],
                       help="fraction of self-attention layers left unshared, evenly spaced")
    group.add_argument("--blocks",
                       help="SD3/Flux: the attention blocks that share, e.g. 'joint.10, joint.12' or 'double.3, "
                            "single' (default: every joint block on SD3, the single-stream blocks on Flux as "
                            "AlignedGen; --only-self-level thins SD3's)")
    group.add_argument("--plain", action="store_true", help="sample without StyleAligned, for comparison")


def _add_style_aligned_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("style-aligned", usage="%(prog)s [options]",
                                 help="a batch of images in the style of the first one (StyleAligned)",
                                 formatter_class=HelpFormatter,
                                 description="Generate one image per prompt; every image takes the style of the "
                                             "reference (the first prompt, or --reference-image).")
    parser.add_argument("--prompts", nargs="+", default=list(PAPER_PROMPTS),
                        help="one image per prompt; without --reference-image the first is the style reference "
                             f"(default: the paper's toy set: {', '.join(PAPER_PROMPTS)})")
    parser.add_argument("--style", default=PAPER_STYLE,
                        help="appended to every prompt as 'PROMPT, STYLE'; --style '' leaves the prompts as they are "
                             "(default: '%(default)s')")
    parser.add_argument("--reference-image", type=Path,
                        help="a real image to take the style from, by DDIM inversion (default: none; the first "
                             "prompt's image is the reference)")
    parser.add_argument("--reference-prompt",
                        help="describes --reference-image; not styled (default: none; required with --reference-image)")
    add_model_flags(parser, dits=True)
    add_sampling_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="image i gets the noise of seed + i")
    parser.add_argument("--size", type=int,
                        help=f"image side in pixels, a multiple of 8 (default: the model's, 512 for SD1.5 and 1024 "
                             f"for SDXL; {TINY_IMAGE_SIZE} for the tiny model)")
    add_out_flag(parser, "style-aligned", "the PNGs")
    add_device_flag(parser)
    parser.add_argument("--inversion-cfg", type=float, default=INVERSION_GUIDANCE,
                        help="CFG of the inversion (DDIM on UNets, Euler on SD3; Flux inverts at --cfg, its "
                             "distilled guidance, having no uncond)")
    parser.add_argument("--pin-offset", type=int, default=PIN_OFFSET,
                        help="the reference starts this many inversion steps below the noisiest latent")
    _add_style_aligned_flags(parser)
    parser.set_defaults(run=run_style_aligned, parser=parser)


def style_aligned_args(ns: argparse.Namespace) -> StyleAlignedArgs:
    """The flags as `StyleAlignedArgs`; an unset --score-scale is the family's (Flux: AlignedGen's 1.1)."""
    from ..style import StyleAlignedArgs

    values = {name: getattr(ns, name) for name in StyleAlignedArgs.__dataclass_fields__}
    if values["shared_score_scale"] is None:
        values["shared_score_scale"] = FLUX_SCORE_SCALE if ns.family == "flux" else \
            STYLE_ALIGNED_DEFAULTS["shared_score_scale"]
    return StyleAlignedArgs(**values)


def family_defaults(ns: argparse.Namespace) -> None:
    """Unset --steps and --cfg take the family's values."""
    if ns.steps is None:
        ns.steps = DEFAULT_STEPS[ns.family]
    if ns.cfg is None:
        ns.cfg = DEFAULT_CFG[ns.family]


def styled(prompt: str, style: str) -> str:
    return f"{prompt}, {style}" if style else prompt


def style_line(style: str) -> str:
    """What --style does to the prompts, printed so the appended text is never a surprise."""
    if not style:
        return "style: none (--style ''): the prompts are used as given"
    return f"style: {style!r} appended to every prompt (--style '' for none)"


def _validate(ns: argparse.Namespace) -> None:
    family_defaults(ns)
    dit = ns.family in DIT_FAMILIES
    if ns.reference_image is not None and not ns.reference_prompt:
        fail(ns, "--reference-image needs --reference-prompt, a description of that image")
    if ns.cfg <= 1 and not dit:
        fail(ns, "--cfg must be > 1: StyleAligned shares within the [uncond, cond] halves of a CFG batch")
    if ns.cfg <= 0:
        fail(ns, "--cfg must be > 0")
    if ns.blocks is not None and not dit:
        fail(ns, "--blocks picks SD3/Flux attention blocks; on UNets thin the layers with --only-self-level")
    if ns.family == "flux" and ns.only_self_level:
        fail(ns, "--only-self-level does not pick Flux layers; name them with --blocks, e.g. --blocks 'single'")
    if dit and ns.full_attention_share:
        fail(ns, "--full-attention-share has no joint-attention form on SD3/Flux; use --share-attention")
    if ns.steps < 1 or (ns.reference_image is not None and not 0 <= ns.pin_offset < ns.steps):
        fail(ns, "--steps must be >= 1, and --pin-offset in 0..steps-1 with --reference-image")
    if ns.size is not None and ns.size % 8:
        fail(ns, "--size must be a multiple of 8")
    if ns.family == "flux" and ns.size is not None and ns.size % 16:
        fail(ns, "--size must be a multiple of 16 on Flux (it packs 2x2 latent pixels into a token)")
    check_checkpoint(ns)


def run_style_aligned(ns: argparse.Namespace) -> int:
    _validate(ns)
    reference = None if ns.reference_image is None else read_image(ns, "--reference-image", ns.reference_image)
    print(style_line(ns.style))
    if ns.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
    device = resolve_device(ns.device)
    with _cpu_threads(tiny_threads(ns, device)):
        return _style_aligned(ns, device, reference)


def _reference_image(image: Image.Image, side: int) -> Image.Image:
    from PIL import Image

    return image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)


def _style_aligned(ns: argparse.Namespace, device: str, reference_image: Image.Image | None) -> int:
    pipe = load_model(ns, device, ns.seed)
    if ns.family in DIT_FAMILIES:
        prompts, images = _style_aligned_flow(ns, pipe, reference_image)
    else:
        prompts, images = _style_aligned_unet(ns, pipe, reference_image)
    ns.out.mkdir(parents=True, exist_ok=True)
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        role = "reference-" if index == 0 else ""
        path = ns.out / f"{index:02d}-{role}{slug(prompt)}.png"
        image.save(path)
        print(path)
    return 0


def _style_aligned_unet(ns: argparse.Namespace, pipe: DiffusionPipeline,
                        reference_image: Image.Image | None) -> tuple[list[str], list[Image.Image]]:
    from .pipeline import generate, invert_image, pin_reference
    from .style_aligned import shared_layers

    size = ns.size or (TINY_IMAGE_SIZE if ns.checkpoint is None else None)
    args = None if ns.plain else style_aligned_args(ns)
    prompts = [styled(p, ns.style) for p in ns.prompts]
    reference = None
    if reference_image is not None:
        side = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        zts = invert_image(pipe, _reference_image(reference_image, side), ns.reference_prompt, ns.steps,
                           ns.inversion_cfg)
        reference = pin_reference(zts, ns.pin_offset)
        prompts = [ns.reference_prompt] + prompts
    if args is not None:
        print(f"StyleAligned on {len(shared_layers(pipe.unet, args.only_self_level))} of "
              f"{len(shared_layers(pipe.unet, 0.0))} self-attention layers; reference: {prompts[0]!r}")
    return prompts, generate(pipe, prompts, args, steps=ns.steps, guidance_scale=ns.cfg, seed=ns.seed, height=size,
                             width=size, reference=reference)


def _style_aligned_flow(ns: argparse.Namespace, pipe: DiffusionPipeline,
                        reference_image: Image.Image | None) -> tuple[list[str], list[Image.Image]]:
    """SD3/SD3.5 and Flux: the joint-attention StyleAligned, a reference image inverted by Euler up the flow ODE."""
    from ..errors import InputError
    from .flow_pipeline import default_flow_size, generate_flow, invert_flow_image, pin_flow_reference

    size = ns.size or (TINY_IMAGE_SIZE if ns.checkpoint is None else default_flow_size(pipe))
    text = {"max_sequence_length": TINY_T5_TOKENS} if ns.checkpoint is None else {}  # the tiny T5's length
    prompts = [styled(p, ns.style) for p in ns.prompts]
    args = None if ns.plain else style_aligned_args(ns)
    try:
        layers, total = _flow_layers(pipe, ns.blocks, args)
    except InputError as error:
        fail(ns, input_error_message(error))
    reference = None
    if reference_image is not None:
        guidance = ns.cfg if ns.family == "flux" else ns.inversion_cfg
        zts = invert_flow_image(pipe, _reference_image(reference_image, size), ns.reference_prompt, ns.steps,
                                guidance, **text)
        reference = pin_flow_reference(pipe, zts, ns.pin_offset)
        prompts = [ns.reference_prompt] + prompts
    if args is not None:
        if args.share_group_norm:
            print("note: --share-group-norm has no counterpart on SD3/Flux (they have no GroupNorm): not applied")
        print(f"StyleAligned on {len(layers.layers)} of {total} attention layers ({layers.label}); "
              f"reference: {prompts[0]!r}")
    images = generate_flow(pipe, prompts, args, steps=ns.steps, guidance_scale=ns.cfg, seed=ns.seed, height=size,
                           width=size, reference=reference, layers=layers, **text)
    return prompts, images


def _flow_layers(pipe: DiffusionPipeline, blocks: str | None, args: StyleAlignedArgs | None) -> tuple[Any, int]:
    """The attention layers that share, and how many the transformer has: --blocks parsed against its own layout
    (SD3 joint blocks; Flux double and single blocks), else the family's default."""
    from ..layers import select_blocks
    from .flow_pipeline import flow_family
    from .joint_style import default_dit_layers, dit_layout
    from .joint_style_flux import default_flux_layers, flux_layout

    flux = flow_family(pipe) == "flux"
    layout = flux_layout(pipe.transformer) if flux else dit_layout(pipe.transformer)
    if blocks is not None:
        chosen = select_blocks(layout, blocks, "style-aligned", "--blocks")
    else:
        chosen = default_flux_layers(layout) if flux else default_dit_layers(layout, args)
    return chosen, len(layout.layers)


# ---------------------------------------------------------------- dual-style

# The original's style pair (Goldszal & Mercier: Minecraft | Van Gogh).
DUAL_STYLE_PROMPTS = ("a house in a minecraft style", "a house in a van gogh style")
DUAL_STYLE_SHARPNESS = {"epsilon": EPSILON_SHARPNESS, "cross-attention": CROSS_ATTENTION_SHARPNESS}


def _direction(text: str) -> str:
    name = text.replace("-", " ").replace("_", " ").lower()
    if name not in DIRECTIONS:
        raise argparse.ArgumentTypeError(f"unknown direction {text!r}; use one of: "
                                         + ", ".join(d.replace(" ", "-") for d in DIRECTIONS))
    return name


def _add_dual_style_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("dual-style", usage="%(prog)s [options]",
                                 help="two prompts in one image, blended across it (dual-style blending)",
                                 formatter_class=HelpFormatter,
                                 description="Generate one image whose first prompt holds one side and second prompt "
                                             "the other, blended by a spatial profile or a mask (Goldszal & Mercier).")
    first, second = DUAL_STYLE_PROMPTS
    parser.add_argument("--first", default=first, help="the prompt at the start of the direction, or where the mask "
                                                       "is white")
    parser.add_argument("--second", default=second, help="the other prompt")
    parser.add_argument("--method", choices=tuple(DUAL_STYLE_SHARPNESS), default="epsilon",
                        help="blend the two noise predictions (SD3/Flux: velocities), or the two cross-attention "
                             "outputs in every layer (SD3/Flux: the two texts' joint-attention outputs)")
    profile = parser.add_argument_group("where each prompt goes")
    profile.add_argument("--profile", choices=(*SHAPES, "mask"),
                         help="sigmoid (the original's), linear or cosine ramp, or mask (default: mask with --mask, "
                              "else sigmoid)")
    profile.add_argument("--mask", type=Path, help="a grayscale image: white = first prompt, black = second "
                                                   "(default: none; a profile)")
    way = profile.add_mutually_exclusive_group()
    way.add_argument("--direction", type=_direction,
                     help="from the first prompt to the second: " + ", ".join(d.replace(" ", "-") for d in DIRECTIONS)
                          + " (default: left-to-right)")
    way.add_argument("--angle", type=float, help="direction in degrees, image y down (default: 0, left to right)")
    profile.add_argument("--center", type=float, help="where both prompts weigh 1/2, 0..1 along the direction "
                                                      "(default: 0.5)")
    profile.add_argument("--sharpness", type=float,
                         help=f"sigmoid slope (default: the original's, {EPSILON_SHARPNESS:g} for epsilon, "
                              f"{CROSS_ATTENTION_SHARPNESS:g} for cross-attention)")
    profile.add_argument("--ramp-width", type=float,
                         help="fraction of the frame the linear/cosine ramp spans (default: 1)")
    add_model_flags(parser, dits=True)
    add_sampling_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="noise seed, the same for every image written")
    for side in ("width", "height"):
        parser.add_argument(f"--{side}", type=int, help=f"pixels, a multiple of 8 (default: the model's; "
                                                        f"{TINY_IMAGE_SIZE} for the tiny model)")
    add_out_flag(parser, "dual-style", "the PNGs")
    add_device_flag(parser)
    parser.add_argument("--compare", action="store_true", help="also write each prompt's plain image (same noise)")
    parser.set_defaults(run=run_dual_style, parser=parser)


def _validate_dual_style(ns: argparse.Namespace) -> None:
    if ns.profile is None:
        ns.profile = "mask" if ns.mask is not None else "sigmoid"
    if ns.profile == "mask":
        if ns.mask is None:
            fail(ns, "--profile mask needs --mask PATH, a grayscale image (white = first prompt)")
        if ns.direction is not None or ns.angle is not None or ns.center is not None or ns.ramp_width is not None:
            fail(ns, "--direction/--angle/--center/--ramp-width shape a profile; with --mask the mask is the "
                     "profile, drop them")
    elif ns.mask is not None:
        fail(ns, f"--mask goes with --profile mask, not --profile {ns.profile}; drop --profile or --mask")
    if ns.center is not None and not 0 <= ns.center <= 1:
        fail(ns, f"--center must be in 0..1 (a fraction along the direction), got {ns.center}")
    if ns.sharpness is not None and ns.sharpness < 0:
        fail(ns, f"--sharpness must be 0 or more, got {ns.sharpness}")
    if ns.ramp_width is not None and ns.ramp_width <= 0:
        fail(ns, f"--ramp-width must be > 0 (a fraction of the frame), got {ns.ramp_width}")
    family_defaults(ns)
    dit = ns.family in DIT_FAMILIES
    if ns.cfg <= 1 and not dit:
        fail(ns, "--cfg must be > 1: the blend works on the [uncond, cond] halves of a guided batch")
    if ns.cfg <= 0:
        fail(ns, "--cfg must be > 0")
    if ns.steps < 1:
        fail(ns, "--steps must be >= 1")
    step = 16 if ns.family == "flux" else 8  # Flux packs 2x2 latent pixels into a token
    for flag, value in (("--width", ns.width), ("--height", ns.height)):
        if value is not None and (value < step or value % step):
            fail(ns, f"{flag} must be a positive multiple of {step} (latents are 1/8 of the image"
                     f"{', packed 2x2 on Flux' if step == 16 else ''}), got {value}; "
                     f"try {max(step, round(value / step) * step)}")
    check_checkpoint(ns)


def load_mask(path: Path) -> torch.Tensor:
    """A grayscale image as an `(H, W)` float mask in [0, 1], white = 1 (read by PIL, nothing else)."""
    import torch
    from PIL import Image

    with Image.open(path) as image:
        gray = image.convert("L")
        pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
        return pixels.reshape(gray.height, gray.width).float() / 255


def dual_style_weights(ns: argparse.Namespace) -> Weights:
    """The profile or mask the flags describe."""
    from PIL import Image

    from ..blend import DIRECTIONS as ANGLES
    from ..blend import Profile

    if ns.profile == "mask":
        if not ns.mask.is_file():
            fail(ns, f"--mask {ns.mask}: no such file (in {Path.cwd()})")
        try:
            return load_mask(ns.mask)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            fail(ns, f"--mask {ns.mask}: cannot read it as an image ({error}); give a PNG or JPEG")
    angle = ANGLES[ns.direction] if ns.direction is not None else (ns.angle or 0.0)
    return Profile(ns.profile, DUAL_STYLE_SHARPNESS[ns.method] if ns.sharpness is None else ns.sharpness, angle,
                   0.5 if ns.center is None else ns.center, 1.0 if ns.ramp_width is None else ns.ramp_width)


def run_dual_style(ns: argparse.Namespace) -> int:
    _validate_dual_style(ns)
    weights = dual_style_weights(ns)
    if ns.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
    device = resolve_device(ns.device)
    with _cpu_threads(tiny_threads(ns, device)):
        return _dual_style(ns, weights, device)


def _dual_style(ns: argparse.Namespace, weights: Weights, device: str) -> int:
    from .dual_style import generate_dual_style

    pipe = load_model(ns, device, ns.seed)
    tiny = TINY_IMAGE_SIZE if ns.checkpoint is None else None
    width, height = ns.width or tiny, ns.height or tiny
    runs = [(ns.method, f"{ns.method}-{ns.profile}")]
    if ns.compare:
        runs += [("plain-first", f"first-{slug(ns.first)}"), ("plain-second", f"second-{slug(ns.second)}")]
    ns.out.mkdir(parents=True, exist_ok=True)
    for method, name in runs:
        text = {"max_sequence_length": TINY_T5_TOKENS} if ns.checkpoint is None and ns.family in DIT_FAMILIES else {}
        image = generate_dual_style(pipe, ns.first, ns.second, method, weights, steps=ns.steps, guidance_scale=ns.cfg,
                                    seed=ns.seed, height=height, width=width, **text)[0]
        path = ns.out / f"{name}.png"
        image.save(path)
        print(path)
    return 0


# ---------------------------------------------------------------- spatial

SPATIAL_PROMPT = "a cat to the left of a dog"
SPATIAL_FLOW_END = 0.3  # spatial_flow.SEED_END: the seed guides the first 30 % of the steps
SPATIAL_UNET = {"steps": 50, "cfg": 7.5, "end": 1.0, "scheduler": "ddpm"}  # the original's


def _relation(text: str) -> str:
    from .spatial import normalized_relation  # only when the flag is given: it imports diffusers

    name = normalized_relation(text)
    if name not in RELATIONS:
        raise argparse.ArgumentTypeError(f"unknown relation {text!r}; use one of: {', '.join(RELATIONS)} "
                                         "(or a phrase such as 'to the left of', 'on top of', 'beside')")
    return name


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the steps in 0..1, got {text}")
    return value


def _add_spatial_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("spatial", usage="%(prog)s [options]",
                                 help="objects where the prompt's relation puts them (InfSplign)",
                                 formatter_class=HelpFormatter,
                                 description="Generate images of a prompt such as 'a cat to the left of a dog' with "
                                             "InfSplign's guidance: at every guided step the gradient of a loss on the "
                                             "two objects' cross-attention maps moves the noise prediction (SD3/Flux: "
                                             "the seed's joint-attention maps and latent step). Writes the PNGs and "
                                             "centroids.json (each object's final-map centroid per image).")
    parser.add_argument("--prompt", default=SPATIAL_PROMPT, help="the prompt")
    parser.add_argument("--object-a", help="the first object, a word of the prompt (default: parsed from the prompt)")
    parser.add_argument("--relation", type=_relation,
                        help=f"{', '.join(RELATIONS)}, or a phrase such as 'to the left of' (default: parsed from "
                             "the prompt)")
    parser.add_argument("--object-b", help="the second object, a word of the prompt (default: parsed from the prompt)")
    defaults = SPATIAL_DEFAULTS
    loss = parser.add_argument_group("InfSplign loss and update (defaults: the original's)")
    loss.add_argument("--phi", choices=PHI_NAMES, default=defaults["phi"], help="the hinge's function")
    loss.add_argument("--alpha", type=float, default=defaults["alpha"], help="slope inside phi")
    loss.add_argument("--margin", type=float, default=defaults["margin"],
                      help="the centroid gap (in 0..1 of the image) the hinge asks for")
    loss.add_argument("--lambda-spatial", type=float, default=defaults["lambda_spatial"],
                      help="weight of the relation's hinge on the centroids")
    loss.add_argument("--lambda-presence", type=float, default=defaults["lambda_presence"],
                      help="weight of var_A + var_B on the coarsest layers")
    loss.add_argument("--lambda-balance", type=float, default=defaults["lambda_balance"],
                      help="weight of |var_A - var_B| on the finer layers")
    loss.add_argument("--weight", type=float, default=defaults["weight"],
                      help="eps <- eps + weight * dL/dx_t (SD3/Flux: x <- x - 0.03 weight dL/dx, the seed's 30 at "
                           "1000); 0 samples without guidance")
    loss.add_argument("--start", type=_fraction, default=0.0, help="guide from this fraction of the steps")
    loss.add_argument("--end", type=_fraction,
                      help=f"up to this fraction of the steps (default: 1, all; SD3/Flux: the seed's "
                           f"{SPATIAL_FLOW_END:g})")
    parser.add_argument("--scheduler", choices=("ddpm", "pipeline"),
                        help="ddpm: the original's DDPM with trailing timesteps; pipeline: the loaded one's (DDIM) "
                             "(default: ddpm on UNets; SD3/Flux: pipeline, their flow-matching Euler, the only one)")
    parser.add_argument("--steps", type=int, help=f"sampler steps (default: 50; {DEFAULT_STEPS['sd3']} on SD3 and "
                                                  "Flux)")
    parser.add_argument("--cfg", type=float,
                        help=f"classifier-free guidance scale (default: 7.5; SD3 {DEFAULT_CFG['sd3']:g}; Flux-dev: its "
                             f"distilled guidance, {DEFAULT_CFG['flux']:g})")
    parser.add_argument("--seed", type=int, default=0, help="image i gets the noise of seed + i")
    parser.add_argument("--images", type=int, default=1, help="how many images")
    parser.add_argument("--size", type=int, help=f"image side in pixels, a multiple of 8, of 16 on SD3/Flux (default: "
                                                 f"the model's; {TINY_IMAGE_SIZE} for the tiny model)")
    add_model_flags(parser, dits=True)
    add_device_flag(parser)
    add_out_flag(parser, "spatial", "the PNGs and centroids.json")
    parser.add_argument("--plain", action="store_true", help="also write unguided images from the same noise")
    parser.set_defaults(run=run_spatial, parser=parser)


def _validate_spatial(ns: argparse.Namespace) -> None:
    from ..spatial import parse_relation

    missing = [name for name in ("object_a", "relation", "object_b") if getattr(ns, name) is None]
    if missing:
        parsed = parse_relation(ns.prompt)
        if parsed is None:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            fail(ns, f"the prompt {ns.prompt!r} has no relation phrase to find the objects in; write one into it, "
                     f"e.g. '{SPATIAL_PROMPT}' ({', '.join(RELATIONS)}), or give {flags}")
        for name in missing:
            setattr(ns, name, getattr(parsed, name))
    dit = ns.family in DIT_FAMILIES
    if dit and ns.scheduler == "ddpm":
        fail(ns, "--scheduler ddpm is for UNets; SD3/Flux sample with their own flow-matching Euler (drop --scheduler)")
    if dit:
        family_defaults(ns)
        ns.end, ns.scheduler = SPATIAL_FLOW_END if ns.end is None else ns.end, "pipeline"
    for name, value in SPATIAL_UNET.items():
        if getattr(ns, name) is None:
            setattr(ns, name, value)
    if ns.start > ns.end:
        fail(ns, f"--start ({ns.start}) must not be after --end ({ns.end})")
    if ns.steps < 1 or ns.images < 1:
        fail(ns, "--steps and --images must be >= 1")
    if ns.cfg <= 0:
        fail(ns, f"--cfg must be > 0, got {ns.cfg}")
    step = 16 if dit else 8  # SD3 patches and Flux packs 2x2 latent pixels
    if ns.size is not None and (ns.size < step or ns.size % step):
        fail(ns, f"--size must be a positive multiple of {step} (latents are 1/8 of the image"
                 f"{', in 2x2 tokens on SD3/Flux' if dit else ''}), got {ns.size}")
    check_checkpoint(ns)


def spatial_settings(ns: argparse.Namespace) -> SpatialSettings:
    from ..spatial import SpatialSettings

    return SpatialSettings(relation=ns.relation, phi=ns.phi, alpha=ns.alpha, margin=ns.margin,
                           lambda_spatial=ns.lambda_spatial, lambda_presence=ns.lambda_presence,
                           lambda_balance=ns.lambda_balance, weight=ns.weight)


def run_spatial(ns: argparse.Namespace) -> int:
    _validate_spatial(ns)
    if ns.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
    device = resolve_device(ns.device)
    with _cpu_threads(tiny_threads(ns, device)):
        return _spatial(ns, device)


def _spatial_records(result: SpatialResult, files: list[Path], seed: int, guided: bool) -> list[dict]:
    return [{"file": path.name, "seed": seed + index, "guided": guided, "centroid_a": list(a), "centroid_b": list(b),
             "distance": d, "holds": holds}
            for index, (path, a, b, d, holds) in enumerate(zip(files, result.centroids_a, result.centroids_b,
                                                                result.distances, result.holds))]


def _spatial_generator(ns: argparse.Namespace, pipe: DiffusionPipeline) -> Callable[..., SpatialResult]:
    """`generate_spatial` (UNets) or `generate_spatial_flow` (SD3/Flux; the tiny T5's length without --checkpoint),
    after checking the object words against the tokenizer the maps read."""
    from functools import partial

    from .spatial import generate_spatial, infsplign_scheduler, object_tokens
    from .spatial_flow import flow_object_tokens, generate_spatial_flow

    dit = ns.family in DIT_FAMILIES
    text = {"max_sequence_length": TINY_T5_TOKENS} if dit and ns.checkpoint is None else {}
    tokens = partial(flow_object_tokens, **text) if dit else object_tokens
    try:
        tokens(pipe, ns.prompt, ns.object_b, tokens(pipe, ns.prompt, ns.object_a))
    except ValueError as error:
        fail(ns, f"{error} (--object-a/--object-b)")
    if dit:
        return partial(generate_spatial_flow, **text)
    if ns.scheduler == "ddpm":
        pipe.scheduler = infsplign_scheduler(pipe)
    return generate_spatial


def _spatial(ns: argparse.Namespace, device: str) -> int:
    pipe = load_model(ns, device, ns.seed)
    generate_spatial = _spatial_generator(ns, pipe)
    settings = spatial_settings(ns)
    size = ns.size or (TINY_IMAGE_SIZE if ns.checkpoint is None else None)
    print(f"InfSplign: {ns.object_a!r} {ns.relation} {ns.object_b!r}, weight {settings.weight:g}, "
          f"{type(pipe.scheduler).__name__} {ns.steps} steps, guided {ns.start:g}..{ns.end:g} of them")
    runs = [("spatial", settings)] + ([("plain", dataclasses.replace(settings, weight=0.0))] if ns.plain else [])
    ns.out.mkdir(parents=True, exist_ok=True)
    report = {"family": ns.family, "prompt": ns.prompt, "object_a": ns.object_a, "relation": ns.relation,
              "object_b": ns.object_b, "settings": dataclasses.asdict(settings), "start": ns.start, "end": ns.end,
              "steps": ns.steps, "cfg": ns.cfg, "scheduler": type(pipe.scheduler).__name__, "images": []}
    for name, run_settings in runs:
        result = generate_spatial(pipe, ns.prompt, ns.object_a, ns.relation, ns.object_b, run_settings, steps=ns.steps,
                                  guidance_scale=ns.cfg, seed=ns.seed, images=ns.images, height=size, width=size,
                                  start=ns.start, end=ns.end)
        files = [ns.out / f"{index:02d}-{name}-{slug(ns.prompt)}.png" for index in range(ns.images)]
        for path, image in zip(files, result.images):
            image.save(path)
            print(path)
        report.update(tokens_a=result.tokens_a, tokens_b=result.tokens_b)
        report["images"] += _spatial_records(result, files, ns.seed, bool(result.guided_steps))
        print(f"{name}: the relation holds (d > 0) in {sum(result.holds)} of {ns.images} images' final maps")
    path = ns.out / "centroids.json"
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(path)
    return 0


# ---------------------------------------------------------------- analyze

ANALYZE_CFG = {**DEFAULT_CFG, "sd1": 5.0, "sdxl": 5.0}  # UNets: the analysis repository's CFG
SERIES_EXAMPLE = ('{"reference_prompt": "a dark brown rabbit", "content_prompt": "a dark brown rabbit", '
                  '"styles": ["in Van Gogh style", "in Monet style"], "samples_per_style": 5}')


def _add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("analyze", usage="%(prog)s --series FILE [options]",
                                 help="a Conditional Balance layer grading from a StyleAligned image series",
                                 formatter_class=HelpFormatter,
                                 description="Generate styles x samples StyleAligned images, record every shared "
                                             "self-attention layer's q/k/v statistics (SD3/Flux: every joint "
                                             "attention's, image tokens only) and grade the layers (JSD). "
                                             "Under `accelerate launch` the jobs are split across processes.")
    parser.add_argument("--series", type=Path, required=True,
                        help=f"JSON file describing the series, e.g. {SERIES_EXAMPLE}")
    add_model_flags(parser, dits=True)
    parser.add_argument("--steps", type=int, help=f"sampler steps (default: {DEFAULT_STEPS['sd1']}; "
                                                  f"{DEFAULT_STEPS['sd3']} on SD3 and Flux)")
    parser.add_argument("--cfg", type=float,
                        help=f"classifier-free guidance scale, > 1 on UNets (default: {ANALYZE_CFG['sd1']:g}, the "
                             f"analysis repository's; SD3 {ANALYZE_CFG['sd3']:g}; Flux-dev: its distilled guidance, "
                             f"{ANALYZE_CFG['flux']:g})")
    parser.add_argument("--seed", type=int, default=10, help="sample j of every style starts from seed + 2j")
    parser.add_argument("--no-adain-values", dest="adain_values", action="store_false",
                        help="AdaIN on q and k only (the paper's geometry series); default: q, k and v (texture)")
    parser.add_argument("--size", type=int, help=f"image side in pixels, a multiple of 8 (default: the model's; "
                                                 f"{TINY_IMAGE_SIZE} for the tiny model)")
    add_out_flag(parser, "analysis", "the statistics, grading.safetensors and grading.png")
    add_device_flag(parser)
    parser.set_defaults(run=run_analyze, parser=parser)


def _series_or_exit(ns: argparse.Namespace) -> Series:
    from .analysis import load_series

    try:
        return load_series(ns.series)
    except ValueError as error:
        fail(ns, f"--series {ns.series}: {error}. Fix: give a JSON file like {SERIES_EXAMPLE}")


def run_analyze(ns: argparse.Namespace) -> int:
    series = _series_or_exit(ns)
    ns.steps = DEFAULT_STEPS[ns.family] if ns.steps is None else ns.steps
    ns.cfg = ANALYZE_CFG[ns.family] if ns.cfg is None else ns.cfg
    size_step = 16 if ns.family == "flux" else 8  # Flux packs 2x2 latent pixels into a token
    if (ns.cfg <= 1 and ns.family in FAMILIES) or ns.cfg <= 0 or ns.steps < 1 or (ns.size is not None
                                                                                   and ns.size % size_step):
        fail(ns, f"--cfg must be > 1 (on SD3/Flux > 0), --steps >= 1 and --size a multiple of {size_step}")
    check_checkpoint(ns)
    from accelerate import PartialState  # imported here: only this command shards

    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:
        # Every process would run the whole series and write the same files: refuse instead.
        print(f"analyze: {launched} processes were launched but accelerate set up {state.num_processes}; "
              "configure accelerate for several processes (`accelerate config`, e.g. multi-GPU) or run one process.",
              file=sys.stderr)
        return 2
    device = str(state.device) if state.num_processes > 1 else resolve_device(ns.device)
    if ns.checkpoint is None and state.is_main_process:
        print(RANDOM_WEIGHTS_NOTICE)
    ns.out.mkdir(parents=True, exist_ok=True)
    with _cpu_threads(tiny_threads(ns, device)):
        _analyze_shard(ns, series, state, device)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    return _grade(ns, state.num_processes)


def _analyze_shard(ns: argparse.Namespace, series: Series, state: PartialState, device: str) -> None:
    from tqdm.auto import tqdm

    from ..style import StyleAlignedArgs
    from .analysis import analyze_jobs, save_stats

    pipe = load_model(ns, device, 0)
    pipe.set_progress_bar_config(disable=True)
    args = StyleAlignedArgs(share_group_norm=False, share_layer_norm=False, adain_values=ns.adain_values)
    size = ns.size or (TINY_IMAGE_SIZE if ns.checkpoint is None else None)
    text = {"max_sequence_length": TINY_T5_TOKENS} if ns.checkpoint is None and ns.family in DIT_FAMILIES else {}
    with state.split_between_processes(series.jobs) as jobs, \
            tqdm(total=len(jobs), desc=f"analyze [{state.process_index}]", position=state.process_index) as bar:
        stats = analyze_jobs(pipe, series, jobs, steps=ns.steps, guidance_scale=ns.cfg, seed=ns.seed, size=size,
                             args=args, progress=bar.update, **text)
    save_stats(stats, ns.out / f"stats-shard{state.process_index}.safetensors")


def _grade(ns: argparse.Namespace, shards: int) -> int:
    from ..balance import save_grading
    from .analysis import grade_series, grading_heatmap, load_stats, merge_shards

    stats = [load_stats(ns.out / f"stats-shard{i}.safetensors") for i in range(shards)]
    grading = grade_series(merge_shards(stats), name=ns.series.stem)
    print(save_grading(grading, ns.out / "grading.safetensors"))
    grading_heatmap(grading).save(ns.out / "grading.png")
    print(ns.out / "grading.png")
    return 0


# ---------------------------------------------------------------- the parser

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from .cli_adapter import add_adapter_parsers  # here: cli_adapter imports this module's shared flags

    parser = argparse.ArgumentParser(
        prog=prog or program(), formatter_class=HelpFormatter, description="MultiCond on diffusers pipelines.",
        epilog="Relative paths (--out, --checkpoint, --reference-image, ...) are taken from the current directory; "
               "each command writes to outputs/<command>/ there unless --out says otherwise. Run a command with "
               "--help for its flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_style_aligned_parser(commands)
    _add_dual_style_parser(commands)
    _add_spatial_parser(commands)
    _add_analyze_parser(commands)
    add_adapter_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_torchvision_notice()
    command: Command = ns.run
    return command(ns)


if __name__ == "__main__":
    sys.exit(main())
