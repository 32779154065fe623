"""MaskedAdapter in a real ComfyUI: T2I-Adapters and ControlNets applied by ComfyUI's own node, then masked."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.controlnet  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.nodes.adapter import MaskedAdapter  # noqa: E402

from . import tiny  # noqa: E402

LATENT = (16, 24)  # non-square: residuals at 16x24, 8x12, 4x6 and 2x3


def apply_control(control, positive, negative, strength=1.0, seed=7):
    hint = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3, generator=torch.Generator().manual_seed(seed))
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, strength, 0.0, 1.0)


def masked(positive, negative, mask, resize="nearest", feather=0.0, level_strengths=""):
    return MaskedAdapter.execute(positive, negative, mask, resize, feather, level_strengths).args


def run(model, kind, positive, negative, batch=1, **kwargs):
    return tiny.sample(model, kind, positive=positive, negative=negative, latent=torch.zeros(batch, 4, *LATENT), **kwargs)


def record_controls(model) -> list[dict]:
    """Every UNet call's control residuals (copied: the UNet pops them)."""
    seen: list[dict] = []

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, *args, **kwargs):
        seen.append({key: [None if r is None else r.clone() for r in value] for key, value in (control or {}).items()})
        return executor(x, timesteps, context, y, control, transformer_options, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.controls", wrapper)
    return seen


CONTROLS = {
    "t2i sd15": ("sd15_shaped", lambda: tiny.build_t2i_adapter("sd15_shaped")),
    "t2i sdxl": ("sdxl_shaped", lambda: tiny.build_t2i_adapter("sdxl_shaped")),
    "controlnet sd15": ("sd15", lambda: tiny.build_controlnet("sd15")),
}


@pytest.fixture(params=list(CONTROLS))
def setup(request):
    kind, make = CONTROLS[request.param]
    return kind, tiny.build(kind), make()


def test_ones_mask_is_bit_identical_to_no_masked_adapter(setup):
    kind, model, control = setup
    positive, negative = apply_control(control, tiny.conditioning(kind, 1), tiny.conditioning(kind, 2))
    plain = run(model, kind, positive, negative)
    assert torch.equal(run(model, kind, *masked(positive, negative, torch.ones(LATENT[0] * 8, LATENT[1] * 8))), plain)


def test_zeros_mask_is_identical_to_no_control(setup):
    kind, model, control = setup
    positive, negative = tiny.conditioning(kind, 1), tiny.conditioning(kind, 2)
    without = run(model, kind, positive, negative)
    controlled = apply_control(control, positive, negative)
    assert (run(model, kind, *controlled) - without).abs().max() > 1e-3, "the control must matter for this test"
    assert torch.equal(run(model, kind, *masked(*controlled, torch.zeros(64, 64))), without)


def test_every_residual_is_masked_at_its_own_size(setup):
    kind, model, control = setup
    positive, negative = apply_control(control, tiny.conditioning(kind, 1), tiny.conditioning(kind, 2))
    mask = torch.zeros(LATENT[0] * 8, LATENT[1] * 8)
    mask[:, : LATENT[1] * 4] = 1  # the left half
    plain_model, masked_model = model.clone(), model.clone()
    plain_seen, masked_seen = record_controls(plain_model), record_controls(masked_model)
    run(plain_model, kind, positive, negative, steps=1)
    run(masked_model, kind, *masked(positive, negative, mask), steps=1)
    sizes = set()
    for key, residuals in masked_seen[0].items():
        for got, reference in zip(residuals, plain_seen[0][key]):
            if got is None:
                continue
            sizes.add(tuple(got.shape[-2:]))
            nearest = torch.nn.functional.interpolate(mask[None, None], size=got.shape[-2:], mode="nearest")
            assert torch.equal(got, reference * nearest)
            if got.shape[-1] % 2 == 0:  # an even width splits exactly in half
                half = got.shape[-1] // 2
                assert torch.equal(got[..., :half], reference[..., :half]) and got[..., half:].eq(0).all()
    assert (LATENT[0] // 2, LATENT[1] // 2) in sizes and len(sizes) >= 2  # SDXL adapters: /2 and /4 only


def test_a_batch_of_masks_maps_to_the_batch_of_latents():
    model, control = tiny.build("sd15_shaped"), tiny.build_t2i_adapter("sd15_shaped")
    positive, negative = apply_control(control, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2))
    masks = torch.stack([torch.ones(64, 64), torch.zeros(64, 64)])
    seen_model = model.clone()
    seen = record_controls(seen_model)
    run(seen_model, "sd15_shaped", *masked(positive, negative, masks), batch=2, steps=1)
    residual = next(r for r in seen[0]["input"] if r is not None)  # rows: [uncond 0, uncond 1, cond 0, cond 1]
    assert residual.shape[0] == 4
    assert residual[[0, 2]].abs().sum() > 0 and residual[[1, 3]].eq(0).all()
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input .mask.: 2 masks for a latent batch of 3 images"):
        run(model, "sd15_shaped", *masked(positive, negative, torch.ones(2, 64, 64)), batch=3, steps=1)


def test_chained_controls_keep_working_and_only_the_last_is_masked():
    model = tiny.build("sd15_shaped")
    first_control, second_control = tiny.build_t2i_adapter("sd15_shaped", seed=1), tiny.build_t2i_adapter("sd15_shaped", seed=2)
    base = apply_control(first_control, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2))
    chained = apply_control(second_control, *base, seed=8)
    assert torch.equal(run(model, "sd15_shaped", *masked(*chained, torch.zeros(64, 64))), run(model, "sd15_shaped", *base))


def test_positive_and_negative_share_one_masked_control_and_the_original_is_untouched():
    control = tiny.build_t2i_adapter("sd15_shaped")
    positive, negative = apply_control(control, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2))
    original = positive[0][1]["control"]
    new_positive, new_negative = masked(positive, negative, torch.ones(64, 64))
    assert new_positive[0][1]["control"] is new_negative[0][1]["control"]
    assert type(original) is comfy.controlnet.T2IAdapter and not hasattr(original, "effect_mask")
    assert isinstance(new_positive[0][1]["control"].copy(), comfy.controlnet.T2IAdapter)


def test_level_strengths_scale_each_resolution():
    model, control = tiny.build("sd15_shaped"), tiny.build_t2i_adapter("sd15_shaped")
    positive, negative = apply_control(control, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2))
    plain_model, scaled_model = model.clone(), model.clone()
    plain_seen, scaled_seen = record_controls(plain_model), record_controls(scaled_model)
    run(plain_model, "sd15_shaped", positive, negative, steps=1)
    run(scaled_model, "sd15_shaped", *masked(positive, negative, torch.ones(64, 64), level_strengths="1, 0.5, 0, 2"), steps=1)
    factors = {}
    for got, reference in zip(scaled_seen[0]["input"], plain_seen[0]["input"]):
        if got is not None:
            factors[got.shape[-1]] = float((got.sum() / reference.sum()))
    assert [round(factors[w], 4) for w in sorted(factors, reverse=True)] == [1.0, 0.5, 0.0, 2.0]


def test_bad_input_is_named():
    positive, negative = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2)
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input 'positive'.*no ControlNet or T2I-Adapter"):
        masked(positive, negative, torch.ones(8, 8))
    controlled = apply_control(tiny.build_t2i_adapter("sd15_shaped"), positive, negative)
    with pytest.raises(InputError, match="input 'mask'.*4 dimensions"):
        masked(*controlled, torch.ones(1, 1, 8, 8))
    with pytest.raises(InputError, match="input 'level_strengths'"):
        masked(*controlled, torch.ones(8, 8), level_strengths="strong")


def test_a_mask_of_another_aspect_ratio_is_stretched_with_one_warning(caplog):
    kind, model, control = "sd15", tiny.build("sd15"), tiny.build_controlnet("sd15")
    positive, negative = apply_control(control, tiny.conditioning(kind, 1), tiny.conditioning(kind, 2))
    with caplog.at_level("WARNING"):
        run(model, kind, *masked(positive, negative, torch.ones(64, 64)))
    notes = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("MultiCond_MaskedAdapter") and "64x64" in notes[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        run(model, kind, *masked(positive, negative, torch.ones(LATENT[0] * 8, LATENT[1] * 8)))
    assert not [r for r in caplog.records if "stretched" in r.getMessage()]
