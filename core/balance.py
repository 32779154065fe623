"""Conditional Balance: layer gradings, their selection at inference, and the analysis that makes them.

A grading gives every (timestep, self-attention layer, feature q/k/v) a number; lower means the layer's
features cluster more by style, so style conditioning goes to the `count` lowest-graded layers
(reference/methods.md §2). Files from users are read without executing code from them.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .layers import DIT_FAMILIES, SDXL, DiTLayout, LayerId, LayerSelection, ModelLayout, describe_blocks
from .style import ADAIN_EPS, token_mean_std

FEATURES = ("q", "k", "v")
FORMAT = "multicond.grading"
FORMAT_VERSION = 1
_GET_IT = ("The published gradings are the files in grading_files/ of github.com/Nadavc220/conditional-balance "
           "(SDXL) and github.com/Nadavc220/conditional-balance-sd35 (gradingSd35L, SD3.5-Large); "
           "a grading saved by this pack is a .safetensors or .json file")
SD35_FAMILY = "sd35"  # CB35's only grading is for SD3.5-Large; its file does not say more than the layer names
_CB35_LAYER = re.compile(r"^transformer_blocks\.(\d+)\.attn\.processor$")  # CB35's `layer_names` (dit.md §4.2)


@dataclass(frozen=True, eq=False)
class Grading:
    """grades[feature][timestep index, layer index]; layers and timesteps in the file's order."""

    family: str
    layers: tuple[LayerId, ...]
    timesteps: tuple[int, ...]
    grades: dict[str, torch.Tensor]
    name: str = ""


# ---------------------------------------------------------------- loading and saving

def _numpy_scalar(dtype: np.dtype, data: Any = None) -> Any:
    # numpy's own reconstructor, refused for object dtypes (those would unpickle arbitrary objects).
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only plain numeric numpy scalars are allowed")
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar(dtype, data)


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles carry bytes as `_codecs.encode(str, "latin1")`; nothing else is needed.
    if not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode only on text")
    return text.encode(encoding, errors)


class _GradingUnpickler(pickle.Unpickler):
    """Resolves only the globals the published gradings use; any other global is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}:
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "numpy.dtypes" and name.endswith("DType"):
            cls = getattr(np.dtypes, name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a grading file")

    def persistent_load(self, pid: Any) -> Any:
        # A torch.save of tensors refers to storages here; gradings hold none, so refuse rather than guess.
        raise pickle.UnpicklingError("the file holds tensor storages, not a grading dictionary")


def restricted_unpickle(data: bytes) -> Any:
    return _GradingUnpickler(io.BytesIO(data)).load()


def _fail(node: str, input_name: str, path: Path, problem: str, fix: str = "") -> InputError:
    return InputError(node, input_name, f"{path.name}: {problem}", fix or f"Choose a grading file. {_GET_IT}.")


def load_grading(path: str | Path, node: str = "LayerBalance", input_name: str = "grading") -> Grading:
    """Read a published grading (torch.save zip) or one saved by `save_grading`; never executes code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(node, input_name, f"no grading file at {str(path)!r}",
                         f"Check the path or put the file in the gradings folder. {_GET_IT}.")
    try:
        # The suffix decides for the pack's formats (a safetensors length prefix may start with b"{");
        # anything else is sniffed: the published files have no suffix.
        if path.suffix == ".safetensors":
            return _load_safetensors(path, node, input_name)
        if path.suffix == ".json":
            return _from_json(json.loads(path.read_text("utf-8")), path, node, input_name)
        if zipfile.is_zipfile(path):
            return _load_original(path, node, input_name)
        if path.read_bytes()[:1] == b"{":
            return _from_json(json.loads(path.read_text("utf-8")), path, node, input_name)
        return _load_safetensors(path, node, input_name)
    except InputError:
        raise
    except Exception as error:  # a corrupt or foreign file: say so, never a bare traceback
        raise _fail(node, input_name, path, f"not a readable grading file ({type(error).__name__}: {error})") from error


def _read_original(archive: zipfile.ZipFile, path: Path, node: str, input_name: str) -> tuple[Any, str]:
    """The dictionary of a published (torch.save) grading and the name it was saved under; runs no code.

    CB35's gradingSd35L holds plain Python types: `torch.load(weights_only=True)` reads it. The SDXL
    files carry numpy scalars, which that loader refuses: they go through `restricted_unpickle`.
    """
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise _fail(node, input_name, path, "the zip archive is not a torch.save file with one data.pkl")
    name = pickles[0].rpartition("/")[0] or path.stem  # torch.save's archive folder is the name it was saved under
    try:
        return torch.load(path, map_location="cpu", weights_only=True), name
    except pickle.UnpicklingError:
        return restricted_unpickle(archive.read(pickles[0])), name


def original_layers(names: Sequence[Any], path: Path, node: str, input_name: str) -> tuple[str, tuple[LayerId, ...]]:
    """The family and layer ids of a published grading's `layer_names`: SD3.5 joint blocks (CB35) or SDXL attn1."""
    texts = [str(name) for name in names]
    joint = [_CB35_LAYER.match(text) for text in texts]
    if texts and all(joint):
        # CB35 grades `transformer_blocks.{i}.attn` = ComfyUI's joint block i (dit.md §4.2 host mapping).
        return SD35_FAMILY, tuple(LayerId("joint", int(match.group(1))) for match in joint if match)
    layers = []
    for text in texts:
        try:
            layers.append(SDXL.layer_from_diffusers_path(text))
        except KeyError:
            raise _fail(node, input_name, path, f"layer {text!r} is not a self-attention layer of SDXL "
                        "nor an SD3.5 joint attention",
                        "Conditional Balance gradings are for SDXL's 70 attn1 layers or SD3.5-Large's 38 joint "
                        "blocks; use one of those.") from None
    return "sdxl", tuple(layers)


def _load_original(path: Path, node: str, input_name: str) -> Grading:
    with zipfile.ZipFile(path) as archive:
        raw, name = _read_original(archive, path, node, input_name)
    if not isinstance(raw, dict) or "layer_names" not in raw or "stats" not in raw:
        raise _fail(node, input_name, path,
                    "the file holds no 'layer_names' and 'stats' (not a Conditional Balance grading)")
    family, layers = original_layers(raw["layer_names"], path, node, input_name)
    stats = raw["stats"]
    timesteps = tuple(int(t) for t in stats)  # CB35's keys are int(1000·σ) of its 28-step shift-3 schedule
    features = [f for f in FEATURES if all(f in stats[t] for t in stats)]
    grades = {f: torch.tensor([[float(g) for g in stats[t][f]] for t in stats], dtype=torch.float64) for f in features}
    return _validated(Grading(family, layers, timesteps, grades, name), path, node, input_name)


def _validated(grading: Grading, path: Path, node: str, input_name: str) -> Grading:
    # One structural check for every format, so later code can index without guarding.
    problems = []
    if not grading.layers or len(set(grading.layers)) != len(grading.layers):
        problems.append("the layer list is empty or repeats a layer")
    if not grading.timesteps or len(set(grading.timesteps)) != len(grading.timesteps):
        problems.append("the timestep list is empty or repeats a timestep")
    if "q" not in grading.grades or "k" not in grading.grades:
        problems.append("grades for q and k are both needed")
    shape = (len(grading.timesteps), len(grading.layers))
    for feature, table in grading.grades.items():
        if feature not in FEATURES or tuple(table.shape) != shape or not torch.isfinite(table).all():
            problems.append(f"grades for {feature!r} are not a finite {shape[0]}×{shape[1]} table")
    if problems:
        raise _fail(node, input_name, path, "; ".join(problems))
    return grading


def _metadata(grading: Grading) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "family": grading.family, "name": grading.name,
            "layers": [str(layer) for layer in grading.layers], "timesteps": list(grading.timesteps)}


def _from_json(doc: Any, path: Path, node: str, input_name: str,
               grades: dict[str, torch.Tensor] | None = None) -> Grading:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(node, input_name, path, f"the file is not a {FORMAT} file")
    if int(doc.get("version", 0)) > FORMAT_VERSION:
        raise _fail(node, input_name, path, f"format version {doc['version']} is newer than this pack reads",
                    "Update the MultiCond node pack.")
    try:
        layers = tuple(LayerId.parse(text) for text in doc["layers"])
    except (ValueError, TypeError) as error:
        raise _fail(node, input_name, path, f"unknown layer names ({error})",
                    "Layer ids look like 'output.1.3'; re-save the grading with this pack.") from None
    if grades is None:
        grades = {f: torch.tensor(table, dtype=torch.float64) for f, table in doc["grades"].items()}
    # Layers are checked against the model the grading is used with (`check_grading`), not a canonical
    # layout, so a grading computed on any SD1/2/SDXL-shaped UNet loads.
    family = str(doc["family"])
    grading = Grading(family, layers, tuple(int(t) for t in doc["timesteps"]), grades, str(doc.get("name", "")))
    return _validated(grading, path, node, input_name)


def _load_safetensors(path: Path, node: str, input_name: str) -> Grading:
    from safetensors import safe_open  # imported here: only this format needs it

    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata() or {}
        grades = {key.removeprefix("grades."): file.get_tensor(key).to(torch.float64)
                  for key in file.keys() if key.startswith("grades.")}
    if "grading" not in meta:
        raise _fail(node, input_name, path,
                    "the safetensors file carries no grading metadata (a model, not a grading?)")
    return _from_json(json.loads(meta["grading"]), path, node, input_name, grades)


def save_grading(grading: Grading, path: str | Path) -> Path:
    """Write `.safetensors` (tensors `grades.<feature>`, metadata key `grading`) or `.json`, by suffix."""
    path = Path(path)
    doc = _metadata(grading)
    if path.suffix == ".json":
        doc["grades"] = {f: table.tolist() for f, table in grading.grades.items()}
        path.write_text(json.dumps(doc), "utf-8")
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"grades.{f}": t.detach().cpu().contiguous() for f, t in grading.grades.items()},
                  str(path), metadata={"grading": json.dumps(doc)})
    else:
        raise ValueError(f"save a grading as .safetensors or .json, not {path.suffix!r}")
    return path


# ---------------------------------------------------------------- using a grading

def check_grading(grading: Grading, layout: ModelLayout, node: str, input_name: str = "grading") -> None:
    """Refuse a grading made for another family or layer table than the model's."""
    dit = layout.family in DIT_FAMILIES
    if grading.family != layout.family:
        hint = ("CB35's gradingSd35L is for SD3.5-Large; for SD3/SD3.5-Medium or Flux make one with the pack's "
                "`analyze --family sd3|flux`" if dit else "the published Conditional Balance UNet gradings are SDXL-only")
        raise InputError(node, input_name,
                         f"the grading {grading.name!r} is for {grading.family} but the model is {layout.family}",
                         f"Use a grading made for {layout.family} ({hint}).")
    unknown = [str(layer) for layer in sorted(set(grading.layers) - set(layout.layers))]  # joint.2 before joint.10
    if unknown:
        raise InputError(node, input_name, f"grading layers {', '.join(unknown[:5])} are not in this model",
                         _size_fix(layout))
    if isinstance(layout, DiTLayout) and len(grading.layers) != len(layout.layers):
        # A DiT grading ranks all its blocks against each other: a subset would not be CB35's choice.
        raise InputError(node, input_name, f"the grading {grading.name!r} grades {len(grading.layers)} attention layers "
                         f"but the model has {len(layout.layers)}", _size_fix(layout))


def _size_fix(layout: ModelLayout) -> str:
    if isinstance(layout, DiTLayout) and layout.family == "flux":
        return (f"Use a grading of this model's {describe_blocks(layout)} (none is published for Flux: make one with "
                "the pack's `analyze --family flux`).")
    if isinstance(layout, DiTLayout):
        return ("Use a grading of this model's joint blocks (CB35's gradingSd35L grades SD3.5-Large's 38; for "
                "SD3.5-Medium make one with the pack's `analyze --family sd3`).")
    return "Use a grading computed on this model's architecture."


def style_layer_count(lambda_s: float, total: int, node: str, input_name: str = "lambda_s") -> int:
    """λ_s in [0, 1] is a fraction of `total` (1 means all layers, as in the original), an integer > 1 a count.

    The fraction truncates as the original's `int(lambda_s * 70)`: 0.43 → 30 of 70, and 0 (or a tiny
    λ_s) selects no layer, as the original does.
    """
    if not math.isfinite(lambda_s) or lambda_s < 0:
        raise InputError(node, input_name, f"{lambda_s} is not a fraction in [0, 1] or a layer count",
                         f"Use e.g. 0.43 (the paper's default, {int(0.43 * total)} of {total} layers) "
                         f"or a count up to {total}.")
    if lambda_s <= 1:
        return int(lambda_s * total)
    if lambda_s != int(lambda_s) or lambda_s > total:
        raise InputError(node, input_name,
                         f"{lambda_s} is neither a fraction in [0, 1] nor a whole layer count ≤ {total}",
                         f"Give a fraction such as 0.43 or a whole number of layers from 2 to {total}.")
    return int(lambda_s)


def nearest_timestep(grading: Grading, timestep: float) -> int:
    """The graded timestep nearest to `timestep`; a tie goes to the larger (noisier) one."""
    return min(grading.timesteps, key=lambda t: (abs(t - timestep), -t))


def select_at(grading: Grading, timestep: float, count: int) -> dict[str, frozenset[LayerId]]:
    """Per feature, the `count` lowest-graded layers at the nearest graded timestep (stable ascending argsort)."""
    row = grading.timesteps.index(nearest_timestep(grading, timestep))
    return {feature: frozenset(grading.layers[i] for i in torch.argsort(table[row], stable=True)[:count].tolist())
            for feature, table in grading.grades.items()}


def shared_at(selection: dict[str, frozenset[LayerId]], joint: bool = False) -> frozenset[LayerId]:
    """Layers that share attention: the UNet original sets `share_attention = adain_q or adain_k`;
    on joint attention CB35's processor overwrites it with `adain_keys and adain_queries` (dit.md §4.1.3, :157)."""
    return selection["q"] & selection["k"] if joint else selection["q"] | selection["k"]


def graded_selection(grading: Grading, count: int, label: str = "") -> LayerSelection:
    """The handler's per-timestep choice as a layer selection: AdaIN on the `count` lowest-graded
    layers per feature, attention shared where q or k is chosen (`update_adain_layers`), or on a DiT
    where both are (CB35); keys are the grading's timesteps (1000·σ for CB35's file)."""
    joint = grading.family in DIT_FAMILIES
    schedule: dict[int, dict[LayerId, frozenset[str]]] = {}
    for timestep in grading.timesteps:
        chosen = select_at(grading, timestep, count)
        shared = shared_at(chosen, joint)
        layers = shared.union(*chosen.values())
        schedule[timestep] = {layer: frozenset(f for f, picked in chosen.items() if layer in picked)
                              | ({"share"} if layer in shared else set()) for layer in layers}
    every = frozenset(layer for by_layer in schedule.values() for layer in by_layer)
    # Conditional Balance never shares GroupNorm (the handler's FALSE_SA_ARGS, handlers/__init__.py:10).
    return LayerSelection(grading.family, every, label or f"{grading.name} top {count}", schedule,
                          graded_values="v" in grading.grades, group_norm=False)


# ---------------------------------------------------------------- producing a grading

def token_statistics(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (rows, tokens, channels): mean and std over tokens, StyleAligned's statistics → (rows, channels)."""
    mean, std = token_mean_std(x, eps)
    return mean.squeeze(-2), std.squeeze(-2)


def jsd_diagonal_gaussian(m1: torch.Tensor, s1: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Gaussian approximation of JSD (methods.md §2.3): moment-matched midpoint, KLs summed over the last dim."""
    var1, var2 = s1.square(), s2.square()
    var_m, mean_m = (var1 + var2) / 2, (m1 + m2) / 2

    def kl_to_mid(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # ½[Σ s_P²/s_M² + Σ (m_M − m_P)²/s_M² − D + Σ log(s_M²/s_P²)]; −D folded in per dim as −1.
        return 0.5 * (var / var_m + (mean_m - mean).square() / var_m - 1 + torch.log(var_m / var)).sum(-1)

    return 0.5 * (kl_to_mid(m1, var1) + kl_to_mid(m2, var2))


def image_pairs(styles: int, samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every unordered image pair once (style-major images): first, second, same-style flag.

    The original offsets style si by `si * 2` instead of `si * num_samples`, which mislabels and
    repeats pairs when samples != 2; here image = style * samples + sample.
    """
    first, second = torch.triu_indices(styles * samples, styles * samples, offset=1)
    return first, second, first // samples == second // samples


def grade(means: torch.Tensor, stds: torch.Tensor, styles: int, samples: int, chunk: int = 256) -> torch.Tensor:
    """Mean same-style JSD / mean different-style JSD for stats of shape (images, *batch, D) → (*batch).

    Normalisers comb(samples, 2)·styles and comb(styles, 2)·samples²; 1 where both means are 0.
    """
    if styles < 2 or samples < 2 or means.shape[0] != styles * samples or means.shape != stds.shape:
        raise ValueError(f"need ≥2 styles and ≥2 samples with {styles}×{samples} images of equal-shaped stats, "
                         f"got means {tuple(means.shape)} and stds {tuple(stds.shape)}")
    first, second, same = image_pairs(styles, samples)
    same_sum = means.new_zeros(means.shape[1:-1])
    diff_sum = means.new_zeros(means.shape[1:-1])
    for start in range(0, len(first), chunk):  # chunks keep pairs × batch × D within memory
        i, j, s = first[start:start + chunk], second[start:start + chunk], same[start:start + chunk]
        jsd = jsd_diagonal_gaussian(means[i], stds[i], means[j], stds[j])
        same_sum += jsd[s].sum(0)
        diff_sum += jsd[~s].sum(0)
    same_mean = same_sum / (math.comb(samples, 2) * styles)
    diff_mean = diff_sum / (math.comb(styles, 2) * samples**2)
    both_zero = (same_mean == 0) & (diff_mean == 0)
    return torch.where(both_zero, torch.ones_like(same_mean), same_mean / torch.where(both_zero, 1.0, diff_mean))


def trimmed_mean(gradings: Sequence[Grading], node: str = "CombineGradings", input_name: str = "gradings",
                 name: str = "") -> Grading:
    """Per entry, the mean without the min and the max (combine_gradings.py); features common to all."""
    if len(gradings) < 3:
        raise InputError(node, input_name, f"a trimmed mean needs at least 3 gradings, got {len(gradings)}",
                         "Add more gradings (the paper combines five), or use one grading directly.")
    base = gradings[0]
    for other in gradings[1:]:
        if (other.family, set(other.layers), other.timesteps) != (base.family, set(base.layers), base.timesteps):
            raise InputError(node, input_name,
                             f"{other.name!r} and {base.name!r} differ in family, layers or timesteps",
                             "Combine gradings made for the same model with the same sampler schedule.")
    features = [f for f in FEATURES if all(f in g.grades for g in gradings)]
    combined = {}
    for f in features:
        # Reorder every grading's columns to the first one's layer order before stacking.
        stack = torch.stack([g.grades[f][:, [g.layers.index(layer) for layer in base.layers]] for g in gradings])
        combined[f] = stack.sort(dim=0).values[1:-1].mean(dim=0)
    return Grading(base.family, base.layers, base.timesteps, combined, name or f"trimmed_mean({len(gradings)})")
