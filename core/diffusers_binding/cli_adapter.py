"""Command lines of the localized adapter: `train-adapter` and `score-local`.

`add_adapter_parsers(commands)` registers both on the subparsers of `python -m multicond`. As in
`cli`, only the standard library is imported here; numpy, PIL, torch and the method code are
imported by the commands when they run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import (RANDOM_WEIGHTS_NOTICE, TINY_IMAGE_SIZE, HelpFormatter, _cpu_threads, add_model_flags,
                  check_checkpoint, fail, load_model)

if TYPE_CHECKING:
    from ..adapter import ConditionName, SoftMask
    from .adapter_training import AdapterTrainSettings

# ---------------------------------------------------------------- help-time facts
# Mirrors of library values, here because importing the library takes seconds and --help must not;
# tests/test_cli.py checks each against its source.
TRAIN_DEFAULTS: dict[str, int | float | str] = {  # adapter_training.AdapterTrainSettings's defaults
    "steps": 50000, "batch_size": 8, "grad_accumulation": 2, "lr": 8e-5, "warmup": 500, "edge_weight": 1e-3,
    "edge_method": "constant", "empty_prompt_rate": 0.5, "checkpoint_every": 1000, "seed": 0}
EDGE_METHODS: tuple[str, ...] = ("constant", "step_unit", "time_unit")  # core.adapter.EDGE_METHODS
CONDITION_NAMES: tuple[str, ...] = ("sobel", "canny")  # core.adapter.CONDITION_NAMES
SOFT_MASKS: tuple[str, ...] = ("threshold", "original")  # core.adapter.SOFT_MASKS
METRIC_SIGMA = 5.0  # core.adapter.METRIC_SIGMA


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    defaults = TRAIN_DEFAULTS
    parser = commands.add_parser(
        "train-adapter", usage="%(prog)s --images DIR [options]",
        help="train a localized (masked-feature) T2I-Adapter on an image folder",
        formatter_class=HelpFormatter,
        description="Train a T2I-Adapter whose features are multiplied by a random box mask, with the paper's loss "
                    "(noise MSE + lambda * masked Sobel MSE of the predicted clean latent). The condition is the "
                    "1-channel Canny (100, 200) edge map of each image (repeated for an --init-adapter with 3 "
                    "input channels); the UNet is frozen. Writes checkpoints under "
                    "OUT/checkpoints and OUT/adapter.safetensors (diffusers T2IAdapter keys, loadable by ComfyUI's "
                    "ControlNet loader). Runs under `accelerate launch` too.")
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of training images, each with its caption in a same-name .txt file")
    parser.add_argument("--out", type=Path, default=Path("outputs", "adapter"),
                        help="output folder, relative to the current directory")
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="images per micro-batch, per process")
    parser.add_argument("--grad-accumulation", type=int, default=defaults["grad_accumulation"],
                        help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=defaults["lr"], help="AdamW learning rate, the paper's")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="linear warm-up updates")
    parser.add_argument("--edge-weight", type=float, default=defaults["edge_weight"],
                        help="lambda of the masked Sobel term, the paper's")
    parser.add_argument("--edge-method", choices=EDGE_METHODS, default=defaults["edge_method"],
                        help="lambda(t): constant; step_unit (only t in 500..999); time_unit "
                             "((1 - alpha_bar_t) * lambda)")
    parser.add_argument("--empty-prompts", dest="empty_prompt_rate", type=float, default=defaults["empty_prompt_rate"],
                        help="share of captions replaced by the empty prompt")
    parser.add_argument("--size", type=int,
                        help=f"training side in pixels, a multiple of 8 (default: 512; {TINY_IMAGE_SIZE} for the "
                             "tiny model)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"],
                        help="save a resumable checkpoint every N updates")
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="continue from a checkpoint folder; the flag alone: the newest under OUT/checkpoints "
                             "(default: start anew)")
    parser.add_argument("--init-adapter",
                        help="start from these adapter weights (an adapter.safetensors or a diffusers folder); "
                             "its input channels (1 or 3) decide how the edge map is fed (default: a new adapter)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="seed of the adapter's init, the boxes and the noise")
    parser.add_argument("--device", choices=("cpu", "auto"), default="auto",
                        help="auto: a GPU when there is one (or what `accelerate launch` assigns); cpu forces the CPU")
    parser.set_defaults(run=run_train_adapter, parser=parser)


def _validate_train(ns: argparse.Namespace) -> None:
    parser: argparse.ArgumentParser = ns.parser
    for flag in ("steps", "batch_size", "grad_accumulation", "checkpoint_every"):
        if getattr(ns, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(ns, flag)}")
    if ns.lr <= 0 or ns.edge_weight < 0 or ns.warmup < 0:
        parser.error("--lr must be > 0, --edge-weight and --warmup >= 0 (the paper: --lr 8e-5 --edge-weight 1e-3)")
    if not 0 <= ns.empty_prompt_rate <= 1:
        parser.error(f"--empty-prompts must be a fraction in 0..1 (the paper: 0.5), got {ns.empty_prompt_rate}")
    if ns.size is not None and (ns.size < 8 or ns.size % 8):
        parser.error(f"--size must be a positive multiple of 8 (64 for full SD adapters), got {ns.size}")
    if not ns.images.is_dir():
        parser.error(f"--images {ns.images}: no such folder; give a folder of images with same-name .txt captions")
    if ns.resume not in (None, "latest") and not Path(ns.resume).is_dir():
        parser.error(f"--resume {ns.resume}: no such checkpoint folder; give OUT/checkpoints/step-..., or --resume alone")
    if ns.init_adapter is not None and not Path(ns.init_adapter).exists():
        parser.error(f"--init-adapter {ns.init_adapter}: no such file or folder (in {Path.cwd()})")
    check_checkpoint(ns)


def train_settings(ns: argparse.Namespace) -> AdapterTrainSettings:
    from .adapter_training import AdapterTrainSettings

    return AdapterTrainSettings(
        images=ns.images, out=ns.out, checkpoint=ns.checkpoint, family=ns.family, steps=ns.steps,
        batch_size=ns.batch_size, grad_accumulation=ns.grad_accumulation, lr=ns.lr, warmup=ns.warmup,
        edge_weight=ns.edge_weight, edge_method=ns.edge_method, size=ns.size, empty_prompt_rate=ns.empty_prompt_rate,
        checkpoint_every=ns.checkpoint_every, resume=ns.resume, seed=ns.seed,
        device="cpu" if ns.device == "cpu" else None, init_adapter=ns.init_adapter)


def run_train_adapter(ns: argparse.Namespace) -> int:
    from ..errors import InputError
    from .adapter_training import train_adapter

    _validate_train(ns)
    if ns.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTICE)
    # A checkpoint is loaded here, offline and with the CLI's one-line errors; training moves it to its device.
    pipe = None if ns.checkpoint is None else load_model(ns, "cpu", ns.seed)
    try:
        # The tiny model's ops are so small that extra CPU threads only add synchronisation cost.
        with _cpu_threads(1 if ns.checkpoint is None and ns.device == "cpu" else None):
            result = train_adapter(train_settings(ns), pipe=pipe)
    except InputError as error:
        ns.parser.error(f"{error.input_name}: {error.problem}. {error.fix}")
    print(f"trained {result.steps - result.start_step} updates (from step {result.start_step}); "
          f"last loss {result.losses[-1] if result.losses else float('nan'):.4f}")
    print(result.adapter_path)
    return 0


# ---------------------------------------------------------------- score-local

def _add_score_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "score-local", usage="%(prog)s --generated DIR --conditions DIR --masks DIR [options]",
        help="LF-MSE (and DiffCC) of generated images against their conditions inside/outside masks",
        formatter_class=HelpFormatter,
        description="For each generated image, the condition and the mask of the same file name (any image "
                    "extension). --condition-name sobel (the original's evaluation): the Sobel map of the generated "
                    "image against the condition's, LF-MSE in/out. canny: Canny (100, 200) edges, LF-MSE in/out "
                    "and DiffCC (coincidence, hallucination in/out). Prints the means and writes JSON.")
    parser.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    parser.add_argument("--conditions", type=Path, required=True, help="folder of condition images (same names)")
    parser.add_argument("--masks", type=Path, required=True, help="folder of masks (same names; white = inside)")
    parser.add_argument("--condition-name", choices=CONDITION_NAMES, default=CONDITION_NAMES[0],
                        help="sobel: Sobel maps, no blur (the original's evaluate_metrics.py); canny: Canny edges, "
                             "low-passed, plus DiffCC")
    parser.add_argument("--condition-kind", choices=("edges", "image"), default="edges",
                        help="edges: the conditions are already maps (Sobel magnitudes or white Canny edges, per "
                             "--condition-name); image: take their Sobel map or Canny edges")
    parser.add_argument("--soft-mask", choices=SOFT_MASKS, default="threshold",
                        help="how a grey mask pixel counts: threshold: inside where >= 0.5, else outside; original: "
                             "inside where > 0 and outside where < 1, both for a grey pixel")
    parser.add_argument("--sigma", type=float, default=METRIC_SIGMA,
                        help="Gaussian low-pass sigma, canny only")
    parser.add_argument("--outside-target", type=float, default=1.0,
                        help="LF-MSE out compares the generated edges outside with this constant: 1.0 as the original "
                             "code; 0.0 reads it as 'against no edges'")
    parser.add_argument("--out", type=Path, help="JSON file, relative to the current directory (default: "
                                                 "GENERATED/local_scores.json)")
    parser.set_defaults(run=run_score_local, parser=parser)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    from .adapter_training import IMAGE_SUFFIXES

    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0, "count": int(finite.size)}


def score_image(generated: Path, condition: Path, mask: Path, condition_kind: str = "edges", sigma: float = METRIC_SIGMA,
                outside_target: float = 1.0, condition_name: ConditionName = "sobel",
                soft_mask: SoftMask = "threshold") -> dict[str, float]:
    """LF-MSE (and DiffCC for canny) of one generated image; the condition and mask are resized (nearest) to its size.

    sobel: `sobel_image` of the generated image (and of the condition for `condition_kind="image"`),
    `lf_mse_sobel`, as the original's scripts/evaluate_metrics.py:57, 71. canny: `canny_edges`,
    `lf_mse` and `diffcc`.
    """
    import numpy as np
    from PIL import Image

    from ..adapter import canny_edges, diffcc, lf_mse, lf_mse_sobel, sobel_image

    image = Image.open(generated).convert("RGB")
    size = image.size
    mark = sobel_image if condition_name == "sobel" else canny_edges
    cond = Image.open(condition).convert("RGB" if condition_kind == "image" else "L").resize(size, Image.NEAREST)
    cond_map = mark(np.asarray(cond)) if condition_kind == "image" else np.asarray(cond)
    mask_array = np.asarray(Image.open(mask).convert("L").resize(size, Image.NEAREST))
    if condition_name == "sobel":
        lf = lf_mse_sobel(sobel_image(np.asarray(image)), cond_map, mask_array, outside_target, soft_mask)
        return {"lf_mse_in": lf["in"], "lf_mse_out": lf["out"], "lf_mse_total": lf["total"]}
    edges = canny_edges(np.asarray(image))
    lf = lf_mse(edges, cond_map, mask_array, sigma=sigma, outside_target=outside_target, soft_mask=soft_mask)
    cc = diffcc(edges, cond_map, mask_array, sigma=sigma, soft_mask=soft_mask)
    return {"lf_mse_in": lf["in"], "lf_mse_out": lf["out"], "lf_mse_total": lf["total"], **cc}


def run_score_local(ns: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = ns.parser
    for flag in ("generated", "conditions", "masks"):
        if not getattr(ns, flag).is_dir():
            parser.error(f"--{flag} {getattr(ns, flag)}: no such folder")
    generated, conditions, masks = (_images_by_stem(getattr(ns, f)) for f in ("generated", "conditions", "masks"))
    names = [name for name in generated if name in conditions and name in masks]
    if not names:
        parser.error(f"no file name is in all of --generated ({len(generated)} images), --conditions "
                     f"({len(conditions)}) and --masks ({len(masks)}); name each condition and mask as its "
                     "generated image (e.g. 0001.png in all three)")
    records = []
    from PIL import Image

    for name in names:
        try:
            scores = score_image(generated[name], conditions[name], masks[name], ns.condition_kind, ns.sigma,
                                 ns.outside_target, ns.condition_name, ns.soft_mask)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            fail(ns, f"cannot read the generated image, condition or mask named {name!r} ({error})")
        records.append({"file": generated[name].name, **scores})
    keys = [k for k in records[0] if k != "file"]
    summary = {key: _summary([r[key] for r in records]) for key in keys}
    report = {"images": len(records), "unmatched": sorted(set(generated) - set(names)),
              "condition_name": ns.condition_name, "condition_kind": ns.condition_kind, "soft_mask": ns.soft_mask,
              "sigma": ns.sigma, "outside_target": ns.outside_target, "summary": summary, "per_image": records}
    out = ns.out or ns.generated / "local_scores.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    for key, stats in summary.items():
        print(f"{key:18s} {stats['mean']:.4f} ± {stats['std']:.4f}  (n={stats['count']})")
    print(out)
    return 0


def add_adapter_parsers(commands: argparse._SubParsersAction) -> None:
    """Register `train-adapter` and `score-local` on `python -m multicond`'s subparsers."""
    _add_train_parser(commands)
    _add_score_parser(commands)
