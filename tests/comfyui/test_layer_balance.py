"""LayerBalance in a real ComfyUI: per-step layer choice from a grading, presets, block lists, errors."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import folder_paths  # noqa: E402
import torch  # noqa: E402

from multicond.core.balance import Grading, save_grading, select_at, shared_at  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.layers import LayerId  # noqa: E402
from multicond.nodes.balance import GRADINGS, NO_GRADING, LayerBalance  # noqa: E402
from multicond.nodes.common import model_layout, plain_attention  # noqa: E402

from . import tiny  # noqa: E402
from .test_style_nodes import adain, shared  # noqa: E402

TIMESTEPS = (999, 750, 500, 250, 0)


def means_equal(target: torch.Tensor, reference: torch.Tensor) -> bool:
    """AdaIN moved the target's per-channel means onto the reference's, up to float32 rounding of their scale."""
    return bool(((target - reference).abs().max() <= 1e-5 * reference.abs().max().clamp_min(1.0)).item())


def balance(model, **overrides):
    inputs = dict(source="grading", grading=NO_GRADING, lambda_s=0.43, preset="all layers", only_self_level=0.0,
                  blocks="output.1")
    return LayerBalance.execute(model, **{**inputs, **overrides}).args[0]  # the selection; args[1] is the preview


@pytest.fixture
def grading_file(tmp_path):
    """A random grading for the tiny SD1.5 model, in a folder ComfyUI lists for LayerBalance."""
    model = tiny.build("sd15")
    layers = model_layout(model, "test").layers
    g = torch.Generator().manual_seed(11)
    grading = Grading("sd1", layers, TIMESTEPS, {f: torch.rand(len(TIMESTEPS), len(layers), generator=g, dtype=torch.float64)
                                                 for f in "qk"}, "tiny")
    save_grading(grading, tmp_path / "tiny_grading.json")
    folder_paths.add_model_folder_path(GRADINGS, str(tmp_path))
    yield grading, "tiny_grading.json"
    folder_paths.folder_names_and_paths[GRADINGS][0].remove(str(tmp_path))


def test_each_step_shares_and_normalises_exactly_the_graded_layers(grading_file):
    grading, name = grading_file
    model = tiny.build("sd15")
    seen: list[tuple] = []

    def recording(q, k, v, extra_options):
        # Delegated to by our patch: the keys tell sharing; the targets' query means tell AdaIN.
        rows = q.shape[0] // len(extra_options["cond_or_uncond"])
        means = q.mean(dim=1)
        seen.append((extra_options["block"], extra_options["block_index"], float(extra_options["sigmas"].max()),
                     k.shape[1] // q.shape[1] == 2, means_equal(means[1], means[0]) and rows > 1))
        return plain_attention(q, k, v, extra_options)

    base = model.clone()
    layout = model_layout(model, "test")
    for layer in layout.layers:
        base.set_model_attn1_replace(recording, *layer.comfy_key)
    selection = balance(model, grading=name, lambda_s=3.0)
    styled = adain(shared(base, share_group_norm=False, layers=selection), layers=selection)
    tiny.sample(styled, "sd15", batch=3, steps=4)
    sampling = model.get_model_object("model_sampling")
    assert len(seen) == 4 * len(layout.layers)
    for block, depth, sigma, was_shared, was_normalised in seen:
        layer = LayerId(block[0], block[1], depth)
        timestep = float(sampling.timestep(torch.tensor(sigma)))
        chosen = select_at(grading, timestep, 3)
        assert was_shared == (layer in shared_at(chosen))
        assert was_normalised == (layer in chosen["q"])


def test_presets_and_block_lists():
    sdxl = tiny.build("sdxl")
    style = balance(sdxl, source="preset", preset="style blocks (IPAdapter)")
    assert style.layers == {layer for layer in model_layout(sdxl, "t").layers if layer.block == "output" and layer.number == 1}
    assert balance(sdxl, source="blocks", blocks="middle").layers == {LayerId("middle", 0, 0), LayerId("middle", 0, 1)}
    assert len(balance(sdxl, source="preset", preset="all layers").layers) == 17


@pytest.mark.parametrize("overrides,match", [
    ({}, "input 'grading': no grading file chosen"),
    ({"source": "blocks", "blocks": "input.99"}, "input 'blocks'"),
    ({"source": "preset", "preset": "composition blocks (IPAdapter)"}, "input 'preset'"),
])
def test_errors_name_the_input(overrides, match):
    with pytest.raises(InputError, match=f"MultiCond_LayerBalance: {match}"):
        balance(tiny.build("sdxl"), **overrides)


def test_grading_for_another_model_and_lambda_beyond_the_layers(grading_file):
    _, name = grading_file
    with pytest.raises(InputError, match="input 'grading'.*for sd1 but the model is sdxl"):
        balance(tiny.build("sdxl"), grading=name)
    with pytest.raises(InputError, match="input 'lambda_s'"):
        balance(tiny.build("sd15"), grading=name, lambda_s=8.0)


def test_lambda_t_frees_the_controlnet_geometry_late_and_keeps_the_middle():
    import comfy.patcher_extension
    import nodes as comfy_nodes

    model = tiny.build("sd15")
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2), tiny.build_controlnet(), hint, 1.0, 0.0, 1.0)
    received = []

    def spy(executor, x, timesteps, context, y, control, *args, **kwargs):
        received.append((float(timesteps.max()), {name: list(r) for name, r in control.items()}))
        return executor(x, timesteps, context, y, control, *args, **kwargs)

    selection = balance(model, source="preset", lambda_t=0.5)
    styled = adain(shared(model, layers=selection), layers=selection)
    styled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.spy", spy)
    tiny.sample(styled, "sd15", batch=3, steps=6, positive=positive, negative=negative)
    late = [control for t, control in received if t < 500]
    early = [control for t, control in received if t >= 500]
    assert late and early
    assert all(r is None for control in late for r in control["output"])
    assert all(any(r is not None for r in control["output"]) for control in early)
    assert all(control["middle"][0][[1, 2, 4, 5]].abs().amax() > 0 for control in late)  # mid residual kept for targets


def test_preview_shows_the_graded_choice_per_step(grading_file):
    grading, name = grading_file
    model = tiny.build("sd15")
    selection, preview = LayerBalance.execute(model, source="grading", grading=name, lambda_s=3.0, preset="all layers",
                                              only_self_level=0.0, blocks="output.1").args
    layers = model_layout(model, "test").layers
    assert preview.shape == (1, 6 * len(layers), 6 * len(TIMESTEPS), 3)
    for column, timestep in enumerate(sorted(TIMESTEPS, reverse=True)):
        chosen = select_at(grading, timestep, 3)
        red = preview[0, 3::6, 6 * column + 3, 0] == 1.0
        assert red.tolist() == [layer in chosen["q"] for layer in layers]


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform", "beta"])
def test_every_scheduler_step_takes_the_nearest_graded_timestep(grading_file, scheduler):
    import comfy.samplers

    from multicond.nodes.style import StylePatch

    grading, name = grading_file
    model = tiny.build("sd15")
    selection = balance(model, grading=name, lambda_s=3.0)
    patch = next(iter(shared(model, layers=selection).model_options["transformer_options"]["patches_replace"]["attn1"].values()))
    assert isinstance(patch, StylePatch)
    sampling = model.get_model_object("model_sampling")
    for sigma in comfy.samplers.calculate_sigmas(sampling, scheduler, 20)[:-1].tolist():
        timestep = float(sampling.timestep(torch.tensor(sigma)))
        nearest = min(TIMESTEPS, key=lambda t: (abs(t - timestep), -t))
        assert patch.share.features(patch.layer, sigma) == selection.schedule[nearest].get(patch.layer, frozenset())


def test_a_grading_with_v_turns_adain_on_values_on_where_it_picks(tmp_path):
    """The original applies AdaIN to v on the v-graded layers whenever the v grading is loaded
    (conditional-balance `handlers/adain_handler_balanced.py:318-335`): no second switch."""
    model = tiny.build("sd15")
    layout = model_layout(model, "test")
    g = torch.Generator().manual_seed(12)
    grading = Grading("sd1", layout.layers, TIMESTEPS, {f: torch.rand(len(TIMESTEPS), len(layout.layers), generator=g,
                                                                       dtype=torch.float64) for f in "qkv"}, "tiny_v")
    save_grading(grading, tmp_path / "tiny_grading_v.json")
    folder_paths.add_model_folder_path(GRADINGS, str(tmp_path))
    try:
        selection = balance(model, grading="tiny_grading_v.json", lambda_s=3.0)
    finally:
        folder_paths.folder_names_and_paths[GRADINGS][0].remove(str(tmp_path))
    seen: list[tuple] = []

    def recording(q, k, v, extra_options):
        means = v.mean(dim=1)  # AdaIN on v moves each target's value means onto the reference's
        seen.append((extra_options["block"], extra_options["block_index"], float(extra_options["sigmas"].max()),
                     means_equal(means[1], means[0])))
        return plain_attention(q, k, v, extra_options)

    base = model.clone()
    for layer in layout.layers:
        base.set_model_attn1_replace(recording, *layer.comfy_key)
    default = adain(base, layers=selection)  # AdaIN Style's values input at its default, off
    out = tiny.sample(default, "sd15", batch=3, steps=4)
    sampling = model.get_model_object("model_sampling")
    assert any(normalised for *_, normalised in seen)
    for block, depth, sigma, normalised in seen:
        timestep = float(sampling.timestep(torch.tensor(sigma)))
        assert normalised == (LayerId(block[0], block[1], depth) in select_at(grading, timestep, 3)["v"])
    assert torch.equal(out, tiny.sample(adain(base, values=True, layers=selection), "sd15", batch=3, steps=4))


def test_a_grading_means_no_shared_group_norm_unless_layer_balance_says_so(grading_file):
    """Conditional Balance never shares GroupNorm (FALSE_SA_ARGS, conditional-balance handlers/__init__.py:10)."""
    _, name = grading_file
    model = tiny.build("sd15")

    def sample(selection, **share):
        return tiny.sample(adain(shared(model, layers=selection, **share), layers=selection), "sd15", batch=3, steps=2)

    graded = balance(model, grading=name, lambda_s=3.0)
    assert torch.equal(sample(graded), sample(graded, share_group_norm=False))  # Shared Attention's default: off
    forced = balance(model, grading=name, lambda_s=3.0, group_norm="shared")
    assert not torch.equal(sample(forced, share_group_norm=False), sample(graded))
    preset = balance(model, source="preset")  # not a grading: Shared Attention's own setting decides
    assert not torch.equal(sample(preset), sample(preset, share_group_norm=False))
    off = balance(model, source="preset", group_norm="not shared")
    assert torch.equal(sample(off), sample(off, share_group_norm=False))


def test_lambda_s_zero_selects_no_layer_as_the_original(grading_file, caplog):
    _, name = grading_file
    model = tiny.build("sd15")
    with caplog.at_level("WARNING"):
        nothing = balance(model, grading=name, lambda_s=0.0)
    assert not nothing.layers and "selects no layer" in caplog.text
    styled = adain(shared(model, layers=nothing), layers=nothing)
    assert torch.equal(tiny.sample(styled, "sd15", batch=3, steps=2), tiny.sample(model, "sd15", batch=3, steps=2))


@pytest.mark.parametrize("kind", ["sd15_shaped", "sdxl_shaped", "sdxl"])
def test_the_defaults_select_layers_on_every_family(kind):
    """Dropped in with nothing changed, the node gives a fixed style-block selection (no file needed) on the real
    SD1.x and SDXL layouts (the *_shaped tiny models)."""
    from .graph import call

    model = tiny.build(kind)
    selection, preview = call(LayerBalance, model=model)
    layers = model_layout(model, "test").layers
    assert 0 < len(selection.layers) < len(layers) or len(layers) <= 2
    assert preview.shape[1] == 6 * len(layers)  # a 6-pixel row per self-attention layer
    blocks, _ = call(LayerBalance, model=model, source="blocks")
    assert blocks.layers and all(layer.block == "output" for layer in blocks.layers)


def test_the_frontend_hides_exactly_the_inputs_a_source_does_not_use():
    """web/js/layer_balance_inputs.js (run by node) names this schema's inputs, and each source keeps its own."""
    import json
    import shutil
    import subprocess

    from .comfy_host import ROOT

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the frontend rule cannot be run")
    rule = (ROOT / "web" / "js" / "layer_balance_inputs.js").as_uri()
    script = (f"import('{rule}').then(m => console.log(JSON.stringify({{sources: m.SOURCE_INPUTS, "
              "grading: m.unusedInputs('grading'), blocks: m.unusedInputs('blocks'), "
              "preset: m.unusedInputs('preset', 'all layers'), "
              "evenly: m.unusedInputs('preset', m.EVENLY_SPACED)})))")
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    schema_inputs = {item.id for item in LayerBalance.define_schema().inputs}
    per_source = {name for names in found["sources"].values() for name in names}
    assert set(found["sources"]) == {"grading", "preset", "blocks"}
    assert per_source <= schema_inputs and schema_inputs - per_source == {"model", "source", "lambda_t", "group_norm"}
    assert set(found["grading"]) == per_source - {"grading", "lambda_s"}
    assert set(found["blocks"]) == per_source - {"blocks"}
    assert set(found["preset"]) == per_source - {"preset"}
    assert set(found["evenly"]) == per_source - {"preset", "only_self_level"}
