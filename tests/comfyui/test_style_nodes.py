"""SharedAttention, AdaINStyle and StyleReference in a real ComfyUI, sampled inside inference_mode."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.core.inversion import nearest_step, pinned_step  # noqa: E402
from multicond.core.layers import LayerId, LayerSelection  # noqa: E402
from multicond.nodes.common import plain_attention  # noqa: E402
from multicond.nodes.reference import StyleReference  # noqa: E402
from multicond.nodes.style import AdaINStyle, SharedAttention, StylePatch  # noqa: E402

from . import tiny  # noqa: E402

SHARE_DEFAULTS = dict(share_attention=True, score_scale=1.0, score_shift=0.0, full_attention_share=False,
                      share_group_norm=True, zero_reference_control=True, reference_index=0, start_percent=0.0,
                      end_percent=1.0)
ADAIN_DEFAULTS = dict(queries=True, keys=True, values=False, strength=1.0, reference_index=0, start_percent=0.0,
                      end_percent=1.0)


def shared(model, **overrides):
    return SharedAttention.execute(model, **{**SHARE_DEFAULTS, **overrides}).args[0]


def adain(model, **overrides):
    return AdaINStyle.execute(model, **{**ADAIN_DEFAULTS, **overrides}).args[0]


def style_aligned(model, **overrides):
    common = {k: v for k, v in overrides.items() if k in ("reference_index", "start_percent", "end_percent", "layers")}
    return adain(shared(model, **overrides), **common)


def record_chunks(model) -> list[list[int]]:
    """A clone-local DIFFUSION_MODEL wrapper that records each call's cond_or_uncond."""
    seen: list[list[int]] = []

    def wrapper(executor, *args, **kwargs):
        seen.append(list(args[5]["cond_or_uncond"]))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.record", wrapper)
    return seen


@pytest.fixture(params=["sd15", "sdxl"])
def kind(request):
    return request.param


def test_style_changes_targets_not_the_reference(kind):
    model = tiny.build(kind)
    vanilla = tiny.sample(model, kind)
    styled = tiny.sample(style_aligned(model), kind)
    torch.testing.assert_close(styled[0], vanilla[0], atol=2e-3, rtol=0)
    assert (styled[1:] - vanilla[1:]).abs().max() > 1e-2


def test_no_leak_into_a_later_unpatched_run(kind):
    model = tiny.build(kind)
    before = tiny.sample(model, kind)
    tiny.sample(style_aligned(model, score_shift=0.7), kind)
    assert torch.equal(tiny.sample(model, kind), before)


def test_cond_and_uncond_together_equal_apart(kind, monkeypatch):
    model = style_aligned(tiny.build(kind))
    together_model = model.clone()
    together_calls = record_chunks(together_model)
    together = tiny.sample(together_model, kind)
    apart_model = model.clone()
    apart_calls = record_chunks(apart_model)
    # ComfyUI batches chunks only while it thinks they fit in memory: make them never fit.
    monkeypatch.setattr(apart_model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    apart = tiny.sample(apart_model, kind)
    assert {len(c) for c in together_calls} == {2} and {len(c) for c in apart_calls} == {1}
    # float32 kernels differ by batch size (~1e-4 here); a wrong reference row would move the result ~1e-1.
    torch.testing.assert_close(apart, together, atol=1e-3, rtol=0)
    assert (together[1:] - tiny.sample(tiny.build(kind), kind)[1:]).abs().max() > 5e-2


def test_three_chunks_two_positive_prompts():
    model = style_aligned(tiny.build("sd15"))
    calls = record_chunks(model)
    positive = tiny.conditioning("sd15", 1) + tiny.conditioning("sd15", 3)
    out = tiny.sample(model, "sd15", positive=positive)
    assert [1, 0, 0] in calls and torch.isfinite(out).all()


def test_nodes_compose_in_either_order():
    model = tiny.build("sd15")
    first = tiny.sample(adain(shared(model)), "sd15")
    second = tiny.sample(shared(adain(model)), "sd15")
    assert torch.equal(first, second)


def test_patch_sits_on_every_layer_or_exactly_the_selection():
    model = tiny.build("sd15")
    slots = shared(model).model_options["transformer_options"]["patches_replace"]["attn1"]
    assert len(slots) == 7 and all(isinstance(p, StylePatch) for p in slots.values())
    chosen = LayerSelection("sd1", frozenset({LayerId("input", 1, 0), LayerId("output", 3, 0)}))
    slots = adain(model, layers=chosen).model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(slots) == {("input", 1, 0), ("output", 3, 0)}


def test_only_selected_layers_are_touched_at_sampling():
    model = tiny.build("sd15")
    chosen = LayerSelection("sd1", frozenset({LayerId("output", 0, 0)}))
    calls: set[tuple] = set()

    def recording(q, k, v, extra_options):
        calls.add((extra_options["block"], k.shape[1] // q.shape[1]))
        return plain_attention(q, k, v, extra_options)

    base = model.clone()
    for key in [("input", 1, 0), ("output", 0, 0)]:
        base.set_model_attn1_replace(recording, *key)
    styled = style_aligned(base, layers=chosen)
    tiny.sample(styled, "sd15", steps=1)
    # The unselected layer runs its own patch untouched; the selected one delegates with reference keys appended.
    assert calls == {(("input", 1), 1), (("output", 0), 2)}


def test_foreign_replace_patch_is_delegated_to(kind):
    model = tiny.build(kind)
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(k.shape[1] // q.shape[1])
        return plain_attention(q, k, v, extra_options)

    base = model.clone()
    key = ("output", 0, 0)
    base.set_model_attn1_replace(foreign, *key)
    delegated = tiny.sample(style_aligned(base), kind)
    own = tiny.sample(style_aligned(model), kind)
    assert calls and set(calls) == {2}  # the foreign patch saw the reference keys appended
    torch.testing.assert_close(delegated, own, atol=1e-3, rtol=0)


def test_score_shift_with_a_foreign_patch_is_an_error():
    base = tiny.build("sd15").clone()
    base.set_model_attn1_replace(lambda q, k, v, o: plain_attention(q, k, v, o), "output", 0, 0)
    with pytest.raises(InputError, match="MultiCond_SharedAttention: input 'score_shift'"):
        tiny.sample(shared(base, score_shift=0.5), "sd15")


def test_range_outside_is_plain():
    model = tiny.build("sd15")
    vanilla = tiny.sample(model, "sd15")
    off = tiny.sample(style_aligned(model, start_percent=1.0, end_percent=1.0, share_group_norm=False), "sd15")
    torch.testing.assert_close(off, vanilla, atol=0, rtol=0)


def test_reference_index_and_batch_errors():
    model = tiny.build("sd15")
    with pytest.raises(InputError, match="no target besides the reference"):
        tiny.sample(shared(model), "sd15", batch=1)
    with pytest.raises(InputError, match="input 'reference_index'"):
        tiny.sample(shared(model, reference_index=3), "sd15", batch=3)
    with pytest.raises(InputError, match="MultiCond_AdaINStyle: input 'reference_index'"):
        adain(shared(model, reference_index=1), reference_index=0)


def test_selection_for_another_architecture_is_refused_and_model_unpatched():
    model = tiny.build("sdxl")
    with pytest.raises(InputError, match="for sd1 but the model is sdxl"):
        shared(model, layers=LayerSelection("sd1", frozenset({LayerId("input", 1, 0)})))
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_unsupported_family_is_named():
    import comfy.supported_models

    model = tiny.build("sd15")
    model.model.model_config = comfy.supported_models.Stable_Cascade_C.__new__(comfy.supported_models.Stable_Cascade_C)
    with pytest.raises(InputError, match="model family Stable_Cascade_C is not supported"):
        shared(model)


def test_reference_control_is_zeroed_in_every_chunk():
    styled = shared(tiny.build("sd15"), reference_index=1, share_group_norm=False)
    wrapper = styled.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "multicond.style_batch")[0]
    control = {"output": [torch.ones(6, 2, 4, 4), None], "middle": [torch.ones(6, 2, 2, 2)]}
    passed = wrapper(lambda *args, **kwargs: args[4], torch.zeros(6, 4, 8, 8), None, None, None, control,
                     {"cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0])})
    assert passed["output"][1] is None
    for residual in (passed["output"][0], passed["middle"][0]):
        assert residual[[1, 4]].abs().sum() == 0 and residual[[0, 2, 3, 5]].min() == 1
    assert control["output"][0].min() == 1  # ComfyUI's own residuals are left as they were


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_reference_image_pins_the_reference_row(sampler, scheduler):
    model = tiny.build("sd15")
    vae = tiny.build_vae()
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        pinned = StyleReference.execute(model, vae, image, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2),
                                        reference_index=1, inversion_steps=10, inversion_cfg=2.0, offset=2).args[0]
    wrapper = pinned.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "multicond.pin_reference")[0]
    styled = style_aligned(pinned, reference_index=1)
    inputs = []

    def spy(executor, x, timesteps, *args, **kwargs):
        inputs.append((x[1].clone(), float(timesteps[0]), x.shape[0]))
        return executor(x, timesteps, *args, **kwargs)

    styled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.spy", spy)
    out = tiny.sample(styled, "sd15", batch=3, steps=6, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(out).all() and len(inputs) >= 6
    for unet_input, timestep, _ in inputs:
        expected = wrapper.trajectory[pinned_step(nearest_step(timestep, wrapper.timesteps), wrapper.offset)][0]
        torch.testing.assert_close(unet_input, expected, atol=1e-5, rtol=1e-5)
    unpinned = tiny.sample(style_aligned(model, reference_index=1), "sd15", batch=3, steps=6, sampler=sampler, scheduler=scheduler)
    assert (out[[0, 2]] - unpinned[[0, 2]]).abs().max() > 1e-3  # the targets follow the real reference


def test_reference_image_of_another_size_is_an_error():
    model = tiny.build("sd15")
    with torch.inference_mode():
        pinned = StyleReference.execute(model, tiny.build_vae(), torch.rand(1, 64, 64, 3), tiny.conditioning("sd15", 1),
                                        tiny.conditioning("sd15", 2), 0, 4, 2.0, 1).args[0]
    with pytest.raises(InputError, match="MultiCond_StyleReference: input 'image'.*64x64 px"):
        tiny.sample(style_aligned(pinned), "sd15", batch=2, size=16)


def test_a_real_controlnet_gives_the_reference_row_no_control():
    import nodes as comfy_nodes

    model = tiny.build("sd15")
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(4))
    positive, negative = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2)
    with torch.inference_mode():
        positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, tiny.build_controlnet(), hint, 1.0, 0.0, 1.0)
    received = []

    def spy(executor, x, timesteps, context, y, control, *args, **kwargs):
        received.append({name: list(residuals) for name, residuals in control.items()})  # the UNet pops them
        return executor(x, timesteps, context, y, control, *args, **kwargs)

    styled = style_aligned(model, reference_index=1)
    styled.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.spy", spy)  # runs after ours
    tiny.sample(styled, "sd15", batch=3, steps=2, positive=positive, negative=negative)
    residuals = [r for control in received for r in control["output"] + control["middle"] if r is not None]
    assert received and residuals
    for residual in residuals:
        assert residual[[1, 4]].abs().max() == 0 and residual[[0, 2, 3, 5]].abs().amax(dim=(1, 2, 3)).min() > 0


def test_a_connected_latent_is_checked_before_the_inversion_runs(monkeypatch):
    """Size and reference row are refused before minutes of inversion, not at the first sampling step."""
    import multicond.nodes.reference as reference

    model, vae = tiny.build("sd15"), tiny.build_vae()
    inverted = []
    monkeypatch.setattr(reference, "invert", lambda *args, **kwargs: inverted.append(args) or (_ for _ in ()).throw(
        AssertionError("the inversion ran")))
    conditioning = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2)
    with pytest.raises(InputError, match="input 'image'.*64x64 px but the latent is 128x128 px"):
        StyleReference.execute(model, vae, torch.rand(1, 64, 64, 3), *conditioning, 0, 4, 2.0, 1,
                               latent={"samples": torch.zeros(2, 4, 16, 16)})
    with pytest.raises(InputError, match="input 'reference_index': 2 is not an image of the latent batch of 2"):
        StyleReference.execute(model, vae, torch.rand(1, 128, 128, 3), *conditioning, 2, 4, 2.0, 1,
                               latent={"samples": torch.zeros(2, 4, 16, 16)})
    assert not inverted


def test_the_inversion_reports_progress_to_the_ui_every_step():
    import comfy.utils

    reports = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        with torch.inference_mode():
            StyleReference.execute(tiny.build("sd15"), tiny.build_vae(), torch.rand(1, 64, 64, 3),
                                   tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2), 0, 7, 2.0, 1,
                                   latent={"samples": torch.zeros(2, 4, 8, 8)})
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    # Newer hosts throttle the updates between the first and the last.
    assert reports[0] == (1, 7) and reports[-1] == (7, 7) and all(total == 7 for _, total in reports)
    assert [value for value, _ in reports] == sorted({value for value, _ in reports})
