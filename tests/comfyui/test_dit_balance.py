"""LayerBalance on SD3.5 in a real ComfyUI: CB35's grading format, its per-step sets, presets and block lists.

The tiny SD3.5-L-like model (`tiny_dit`) has 2 joint blocks, so its grading is made here in CB35's
format (`torch.save` of layer_names + stats) on CB35's 28 keys; the real 38-layer gradingSd35L is
checked against the node's own error path (and against a 38-layer layout in tests/test_core_balance.py).
"""

from __future__ import annotations

import shutil

import pytest

from .comfy_host import ROOT, find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny SD3 models come from diffusers: scripts/host_venv.sh installs it")

import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.core.layers import DiTLayout, LayerId, LayerSelection  # noqa: E402
from multicond.nodes.balance import GRADINGS, NO_GRADING, LayerBalance  # noqa: E402
from multicond.nodes.common import model_layout  # noqa: E402
from multicond.nodes.style import OVERRIDE  # noqa: E402

from . import tiny, tiny_dit  # noqa: E402
from .test_dit_style import changed, one_call, style_aligned  # noqa: E402

# The project's shared/ folder sits beside the checkout (and beside CI's clone).
CB35_FILE = ROOT.parent / "shared" / "data" / "conditional-balance-sd35" / "gradingSd35L"
# int(1000·σ) of the 28-step shift-3 flow schedule: CB35's grading keys (dit.md §4.2).
CB35_KEYS = (1000, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737, 707, 675, 640, 602, 560,
             515, 464, 409, 347, 278, 199, 110, 8)
JOINT = (LayerId("joint", 0), LayerId("joint", 1))
TINY_NAME = "gradingTiny35"


def balance(model, **overrides):
    inputs = dict(source="grading", grading=NO_GRADING, lambda_s=0.5, preset="all layers", only_self_level=0.0,
                  blocks="joint")
    return LayerBalance.execute(model, **{**inputs, **overrides}).args


def cb35_top(grades: list[float], count: int) -> frozenset[LayerId]:
    """CB35's `argsort(grades)[:λs]` (Handler.__init__, :302-307), re-stated with sorted()."""
    return frozenset(LayerId("joint", i) for i in sorted(range(len(grades)), key=grades.__getitem__)[:count])


@pytest.fixture
def gradings(tmp_path):
    """A CB35-format grading of the tiny model's 2 joint blocks (and the real file, where the data is there),
    in a folder ComfyUI lists for LayerBalance."""
    g = torch.Generator().manual_seed(3)
    raw = {"layer_names": [f"transformer_blocks.{i}.attn.processor" for i in range(2)],
           "stats": {t: {f: torch.rand(2, generator=g).tolist() for f in "qkv"} for t in CB35_KEYS}}
    torch.save(raw, tmp_path / TINY_NAME)
    if CB35_FILE.is_file():
        shutil.copyfile(CB35_FILE, tmp_path / CB35_FILE.name)
    folder_paths.add_model_folder_path(GRADINGS, str(tmp_path))
    yield raw
    folder_paths.folder_names_and_paths[GRADINGS][0].remove(str(tmp_path))


def sigmas_28(model) -> list[float]:
    sampling = model.get_model_object("model_sampling")
    assert float(sampling.shift) == 3.0  # SD3's default, the schedule CB35's keys come from
    return comfy.samplers.calculate_sigmas(sampling, "normal", 28)[:-1].tolist()


def test_the_normal_28_step_sigmas_take_their_own_keys(gradings):
    model = tiny_dit.build("sd35l")
    selection, _ = balance(model, grading=TINY_NAME)
    sigmas = sigmas_28(model)
    assert all(0 <= 1000 * s - key < 1 for s, key in zip(sigmas, CB35_KEYS, strict=True))  # the keys, truncated
    patch = style_aligned(model, layers=selection).model_options["transformer_options"][OVERRIDE]
    for sigma, key in zip(sigmas, CB35_KEYS):
        for layer in JOINT:
            assert patch.share.features(layer, sigma) == selection.schedule[key].get(layer, frozenset())


def test_each_step_shares_and_normalises_exactly_cb35s_sets(gradings):
    """At each of the 28 steps: AdaIN q/k/v on CB35's topQ/topK/topV, attention shared on topQ ∩ topK only."""
    model = tiny_dit.build("sd35l")
    selection, _ = balance(model, grading=TINY_NAME, lambda_s=0.5)  # 1 of 2 layers per feature
    patch = style_aligned(model, layers=selection).model_options["transformer_options"][OVERRIDE]
    seen_shared, seen_q_only = False, False
    for sigma, key in zip(sigmas_28(model), CB35_KEYS):
        top = {f: cb35_top(gradings["stats"][key][f], 1) for f in "qkv"}
        for layer in JOINT:
            adain = patch.adain.adain_at(layer, sigma, joint=True)
            share = patch.share.share_at(layer, sigma, joint=True)
            assert (share is not None) == (layer in top["q"] & top["k"]), (key, layer)
            flags = (False, False, False) if adain is None else (adain.queries, adain.keys, adain.values)
            assert flags == tuple(layer in top[f] for f in "qkv"), (key, layer)
            seen_shared |= share is not None
            seen_q_only |= layer in top["q"] - top["k"]
    assert seen_shared and seen_q_only  # the seed exercises both sides of CB35's q-and-k rule


def test_a_styled_call_equals_one_with_cb35s_restated_selection(gradings):
    """The node's selection, run through the style nodes, equals a selection built here from the file by CB35's rule."""
    model = tiny_dit.build("sd35l")
    selection, _ = balance(model, grading=TINY_NAME)
    schedule = {}
    for key, stats in gradings["stats"].items():
        top = {f: cb35_top(stats[f], 1) for f in "qkv"}
        schedule[key] = {layer: frozenset(f for f in "qkv" if layer in top[f])
                         | ({"share"} if layer in top["q"] & top["k"] else set()) for layer in JOINT}
    restated = LayerSelection("sd35", frozenset(JOINT), "cb35", schedule, graded_values=True, group_norm=False)
    data = tiny_dit.inputs(3)
    ours, theirs = style_aligned(model, layers=selection), style_aligned(model, layers=restated)
    for sigma in sigmas_28(model)[::9]:
        styled = one_call(ours, data, sigma)
        assert torch.equal(styled, one_call(theirs, data, sigma))
        if sigma > 0.1:  # denoised = x − σ·v: at the last step (σ ≈ 0.009) a styled v barely moves it
            assert changed(styled, one_call(model, data, sigma), 1e-4)


def test_presets_and_block_lists_on_sd35():
    model = tiny_dit.build("sd35l")
    assert model_layout(model, "t", dit=True) == DiTLayout("sd35", joint=2)
    assert balance(model, source="preset", preset="all layers")[0].layers == frozenset(JOINT)
    evenly = balance(model, source="preset", preset="evenly spaced (only_self_level)", only_self_level=0.5)[0]
    assert evenly.layers == frozenset({JOINT[1]})  # StyleAligned's switch vector [True, False] at 0.5 of 2
    assert balance(model, source="blocks", blocks="joint")[0].layers == frozenset(JOINT)
    assert balance(model, source="blocks", blocks="joint.1")[0].layers == frozenset({JOINT[1]})
    assert balance(model, source="blocks", blocks="joint.0, joint.1")[0].layers == frozenset(JOINT)


@pytest.mark.parametrize("overrides,match", [
    ({"source": "preset", "preset": "style blocks (IPAdapter)"}, "input 'preset'.*UNet blocks.*'all layers'"),
    ({"source": "preset", "preset": "composition blocks (IPAdapter)"}, "input 'preset'.*UNet blocks.*'joint"),
    ({"source": "blocks", "blocks": "output"}, "input 'blocks'.*'output' names UNet blocks.*'joint"),
    ({"source": "blocks", "blocks": "joint.3"}, "input 'blocks'.*joint.0-joint.1"),
    ({}, "input 'grading': no grading file chosen"),
])
def test_unet_only_choices_are_refused_by_name_on_sd35(overrides, match):
    with pytest.raises(InputError, match=f"MultiCond_LayerBalance: {match}"):
        balance(tiny_dit.build("sd35l"), **overrides)


def test_the_preview_has_a_row_per_joint_layer_and_a_column_per_key(gradings):
    model = tiny_dit.build("sd35l")
    selection, preview = balance(model, grading=TINY_NAME)
    assert preview.shape == (1, 6 * 2, 6 * len(CB35_KEYS), 3)
    for column, key in enumerate(CB35_KEYS):
        red = (preview[0, 3::6, 6 * column + 3, 0] == 1.0).tolist()
        assert red == [layer in cb35_top(gradings["stats"][key]["q"], 1) for layer in JOINT]


def test_a_grading_for_another_model_is_refused_by_name(gradings):
    if not CB35_FILE.is_file():
        pytest.skip("CB35's gradingSd35L not found in shared/data")
    with pytest.raises(InputError, match="input 'grading'.*joint.2.*not in this model.*SD3.5-Large's 38"):
        balance(tiny_dit.build("sd35l"), grading=CB35_FILE.name, lambda_s=28.0)
    with pytest.raises(InputError, match="input 'grading'.*for sd35 but the model is sd1"):
        balance(tiny.build("sd15"), grading=TINY_NAME)
    with pytest.raises(InputError, match="input 'lambda_s'"):
        balance(tiny_dit.build("sd35l"), grading=TINY_NAME, lambda_s=28.0)  # a count beyond the 2 joint layers


@pytest.mark.parametrize("build,expected", [
    (lambda: tiny_dit.build("sd35l"), lambda layers: layers),                            # every joint block
    (lambda: tiny_dit.build_flux(), lambda layers: [l for l in layers if l.block == "single"]),  # AlignedGen's blocks
])
def test_the_node_at_its_defaults_gives_the_family_style_blocks(build, expected):
    """Dropped in with nothing changed, Layer Balance works on DiTs too (source preset, the family default)."""
    from .graph import call

    model = build()
    layers = model_layout(model, "test", dit=True).layers
    selection, preview = call(LayerBalance, model=model)
    assert sorted(selection.layers) == sorted(expected(layers)) and selection.layers
    assert preview.shape[1] == 6 * len(layers)


def test_a_flux_grading_in_the_analysis_format_drives_layer_balance_by_1000_sigma(tmp_path):
    """A grading as `analyze --family flux` writes it (the pack's .safetensors, keys int(1000·σ)) loads for Flux:
    the node's per-step sets are the graded top-λs ones, and the patch picks a step's set by nearest 1000·σ."""
    from multicond.core.balance import FEATURES, Grading, graded_selection, save_grading

    model = tiny_dit.build_flux()
    layers = tuple(model_layout(model, "test", dit=True).layers)  # the tiny model's double.0 and single.0
    keys = (1000, 750, 300)
    g = torch.Generator().manual_seed(5)
    grading = Grading("flux", layers, keys, {f: torch.rand(len(keys), len(layers), generator=g) for f in FEATURES},
                      "tinyFlux")
    save_grading(grading, tmp_path / "tinyFlux.safetensors")
    folder_paths.add_model_folder_path(GRADINGS, str(tmp_path))
    try:
        selection, _ = balance(model, grading="tinyFlux.safetensors", lambda_s=0.5)
        wrong = Grading("flux", (*layers, LayerId("single", 1)), keys,
                        {f: torch.rand(len(keys), len(layers) + 1, generator=g) for f in FEATURES}, "wide")
        save_grading(wrong, tmp_path / "wide.safetensors")
        with pytest.raises(InputError, match="single.1 are not in this model. Use a grading of this model's "
                                             "double.0-double.0, single.0-single.0.*analyze --family flux"):
            balance(model, grading="wide.safetensors", lambda_s=0.5)
    finally:
        folder_paths.folder_names_and_paths[GRADINGS][0].remove(str(tmp_path))
    assert selection.schedule == graded_selection(grading, 1).schedule and selection.family == "flux"
    patch = style_aligned(model, layers=selection).model_options["transformer_options"][OVERRIDE]
    for sigma, key in ((0.98, 1000), (0.7, 750), (0.2, 300)):
        for layer in layers:
            assert patch.share.features(layer, sigma) == selection.schedule[key].get(layer, frozenset())
