"""EpsilonBlend and CrossAttnBlend in a real ComfyUI, sampled inside inference_mode."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.patcher_extension  # noqa: E402
import comfy.samplers  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

import multicond.nodes.blend as blend_module  # noqa: E402
from multicond.core.blend import Profile, blend, profile_weights  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.layers import LayerId, LayerSelection  # noqa: E402
from multicond.nodes.blend import EPSILON_BLEND, CrossAttnBlend, EpsilonBlend, EpsilonBlendWrapper  # noqa: E402
from multicond.nodes.common import plain_attention  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny  # noqa: E402

PROFILE = dict(profile="sigmoid", direction="left to right", angle=0.0, center=0.5, ramp_width=1.0)


def epsilon(model, first, second, mask=None, weighting="complementary", sharpness=20.0, **profile):
    settings = {**PROFILE, "sharpness": sharpness, **profile}
    if mask is not None:
        settings["profile"] = "mask"
    out = EpsilonBlend.execute(model, first, second, weighting=weighting, mask=mask, **settings)
    return out.args[0], out.args[1]


def cross(model, second, mask=None, layers=None, sharpness=30.0, **profile):
    settings = {**PROFILE, "sharpness": sharpness, **profile}
    if mask is not None:
        settings["profile"] = "mask"
    return CrossAttnBlend.execute(model, second, mask=mask, layers=layers, **settings).args[0]


def apart(model, monkeypatch):
    """A clone whose chunks run in separate model calls, so batch-size numerics cannot blur equality."""
    clone = model.clone()
    monkeypatch.setattr(clone.model, "memory_required", lambda *args, **kwargs: float("inf"))
    return clone


@pytest.fixture(params=["sd15", "sdxl"])
def kind(request):
    return request.param


def prompts(kind):
    return tiny.conditioning(kind, 1), tiny.conditioning(kind, 3)


# --- EpsilonBlend -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_constant_mask_gives_exactly_one_prompt(kind, value, monkeypatch):
    model = apart(tiny.build(kind), monkeypatch)
    first, second = prompts(kind)
    patched, positive = epsilon(model, first, second, mask=torch.full((16, 24), value))
    blended = tiny.sample(patched, kind, positive=positive, latent=torch.zeros(2, 4, 16, 24))
    alone = tiny.sample(model, kind, positive=first if value else second, latent=torch.zeros(2, 4, 16, 24))
    assert torch.equal(blended, alone)


def test_one_model_call_of_three_chunks(kind):
    model = tiny.build(kind)
    patched, positive = epsilon(model, *prompts(kind))
    seen = []
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.record",
                                 lambda executor, *a, **k: seen.append(list(a[5]["cond_or_uncond"])) or executor(*a, **k))
    tiny.sample(patched, kind, positive=positive)
    assert seen and all(sorted(chunks) == [0, 0, 1] for chunks in seen)  # both prompts are cond chunks


def test_blend_equals_the_papers_blend_of_two_cfg_predictions(monkeypatch):
    """One Euler step to sigma 0 returns the CFG'd denoised latent: the paper blends those, we blend before CFG."""
    model = apart(tiny.build("sd15"), monkeypatch)
    first, second = prompts("sd15")
    latent = torch.zeros(1, 4, 16, 24)
    patched, positive = epsilon(model, first, second)
    run = lambda m, p: tiny.sample(m, "sd15", positive=p, latent=latent, steps=1, cfg=20.0)  # noqa: E731
    weight = profile_weights(Profile(), 16, 24)
    expected = blend(run(model, first), run(model, second), weight)
    assert_close_scaled(run(patched, positive), expected, amplification=20)  # one step at CFG 20


def test_the_profile_is_built_at_the_latents_own_size():
    model = tiny.build("sd15")
    _, positive = epsilon(model, *prompts("sd15"), sharpness=20.0)
    entries = [{**options, "model_conds": {}, "uuid": index} for index, (_, options) in enumerate(positive)]
    x = torch.zeros(2, 4, 12, 20)
    wrapper = EpsilonBlendWrapper(EPSILON_BLEND)
    seen = wrapper(lambda model, conds, *rest: conds, None, [entries, None], x, torch.tensor([1.0]), {})
    first_mask, second_mask = (entry["mask"] for entry in seen[0])
    torch.testing.assert_close(first_mask[0], profile_weights(Profile(), 12, 20))
    torch.testing.assert_close(first_mask + second_mask, torch.ones(2, 12, 20))
    assert seen[1] is None


def test_weightings_agree_on_plain_prompts_and_on_a_hard_mask_and_part_with_strengths(monkeypatch):
    model = apart(tiny.build("sd15"), monkeypatch)
    first, second = prompts("sd15")
    strong_first = comfy_nodes.ConditioningSetMask().append(first, torch.ones(16, 16), "default", 2.0)[0]
    hard = torch.zeros(16, 16)
    hard[:, :8] = 1
    runs = {}
    for name, cond, mask in (("plain", first, None), ("hard", strong_first, hard), ("soft", strong_first, None)):
        for weighting in ("complementary", "normalised"):
            patched, positive = epsilon(model, cond, second, mask=mask, weighting=weighting)
            runs[name, weighting] = tiny.sample(patched, "sd15", positive=positive, batch=1)
    # sampled runs (3 steps at CFG 5) whose weights come out of different float arithmetic
    assert_close_scaled(runs["plain", "complementary"], runs["plain", "normalised"], amplification=15)
    assert_close_scaled(runs["hard", "complementary"], runs["hard", "normalised"], amplification=15)
    assert (runs["soft", "complementary"] - runs["soft", "normalised"]).abs().max() > 1e-3
    # complementary cancels the strength each prompt carries; the soft run equals the plain one
    assert_close_scaled(runs["soft", "complementary"], runs["plain", "complementary"], amplification=15)
    # normalised is ComfyUI's ConditioningSetMask rule: the same masks set by hand give the same image
    weight = profile_weights(Profile(), 16, 16)
    by_hand = comfy_nodes.ConditioningCombine().combine(
        comfy_nodes.ConditioningSetMask().append(first, weight, "default", 2.0)[0],
        comfy_nodes.ConditioningSetMask().append(second, 1 - weight, "default", 1.0)[0])[0]
    assert_close_scaled(runs["soft", "normalised"], tiny.sample(model, "sd15", positive=by_hand, batch=1), amplification=15)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "simple"),
                                               ("ddim", "ddim_uniform"), ("euler_ancestral", "normal")])
def test_any_sampler_and_img2img(sampler, scheduler, monkeypatch):
    model = apart(tiny.build("sd15"), monkeypatch)
    first, second = prompts("sd15")
    start = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    run = lambda m, p, denoise: tiny.sample(m, "sd15", positive=p, latent=start, sampler=sampler,  # noqa: E731
                                            scheduler=scheduler, denoise=denoise, steps=4)
    ones, positive_ones = epsilon(model, first, second, mask=torch.ones(16, 16))
    soft, positive_soft = epsilon(model, first, second)
    for denoise in (1.0, 0.5):
        assert torch.equal(run(ones, positive_ones, denoise), run(model, first, denoise))
        blended = run(soft, positive_soft, denoise)
        assert torch.isfinite(blended).all()
        assert (blended - run(model, first, denoise)).abs().max() > 1e-3


def test_without_cfg_the_blend_still_applies(monkeypatch):
    model = apart(tiny.build("sd15"), monkeypatch)
    first, second = prompts("sd15")
    patched, positive = epsilon(model, first, second, mask=torch.zeros(16, 16))
    assert torch.equal(tiny.sample(patched, "sd15", positive=positive, cfg=1.0), tiny.sample(model, "sd15", positive=second, cfg=1.0))


def test_epsilon_blend_leaves_no_trace(kind):
    model = tiny.build(kind)
    before = tiny.sample(model, kind)
    patched, positive = epsilon(model, *prompts(kind))
    tiny.sample(patched, kind, positive=positive)
    assert torch.equal(tiny.sample(model, kind), before)
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "multicond.epsilon_blend")


def test_epsilon_blend_errors():
    model = tiny.build("sd15")
    first, second = prompts("sd15")
    with pytest.raises(InputError, match="MultiCond_EpsilonBlend: input 'second'.*empty"):
        epsilon(model, first, [])
    with pytest.raises(InputError, match="input 'mask'.*no mask is connected"):
        EpsilonBlend.execute(model, first, second, weighting="complementary", mask=None,
                             **{**PROFILE, "profile": "mask", "sharpness": 20.0})
    with pytest.raises(InputError, match="input 'mask'.*4 dimensions"):
        epsilon(model, first, second, mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(InputError, match="input 'mask'.*but profile is 'sigmoid'"):
        EpsilonBlend.execute(model, first, second, weighting="complementary", mask=torch.ones(16, 16),
                             **{**PROFILE, "sharpness": 20.0})
    patched, positive = epsilon(model, first, second, mask=torch.ones(2, 16, 16))
    with pytest.raises(InputError, match="input 'mask'.*2 masks for a batch of 3"):
        tiny.sample(patched, "sd15", positive=positive, batch=3)


# --- CrossAttnBlend -----------------------------------------------------------------------------


def test_identical_second_prompt_equals_plain_sampling(kind):
    model = tiny.build(kind)
    first, _ = prompts(kind)
    # 154 context tokens against 77: the same attention in another summation order, over 3 steps at CFG 5
    assert_close_scaled(tiny.sample(cross(model, first), kind, positive=first), tiny.sample(model, kind, positive=first),
                        amplification=15)


def test_constant_masks_give_one_prompts_attention(kind):
    model = tiny.build(kind)
    first, second = prompts(kind)
    second = [[second[0][0], first[0][1]]]  # SDXL: the pooled output is the positive's, as the node documents
    plain_first = tiny.sample(model, kind, positive=first)
    plain_second = tiny.sample(model, kind, positive=second)
    assert_close_scaled(tiny.sample(cross(model, second, mask=torch.ones(16, 16)), kind, positive=first), plain_first,
                        amplification=15)
    assert_close_scaled(tiny.sample(cross(model, second, mask=torch.zeros(16, 16)), kind, positive=first), plain_second,
                        amplification=15)


def record_blends(monkeypatch) -> list[dict]:
    calls = []
    original = blend_module.dual_context_attention

    def spy(q, k, v, heads, second_tokens, weight, rows, *attention):
        calls.append({"tokens": q.shape[1], "weight": weight.clone(), "rows": rows, "batch": q.shape[0],
                      "second_tokens": second_tokens, "context": k.shape[1]})
        return original(q, k, v, heads, second_tokens, weight, rows, *attention)

    monkeypatch.setattr(blend_module, "dual_context_attention", spy)
    return calls


def test_each_layer_weighs_tokens_at_its_own_height_and_width(kind, monkeypatch):
    calls = record_blends(monkeypatch)
    model = tiny.build(kind)
    first, second = prompts(kind)
    tiny.sample(cross(model, second), kind, positive=first, latent=torch.zeros(2, 4, 16, 24))
    sizes = {(16, 24), (8, 12), (4, 6)}
    seen = set()
    for call in calls:
        (height, width), = [s for s in sizes if s[0] * s[1] == call["tokens"]]
        seen.add((height, width))
        expected = 1 - torch.sigmoid(30 * (torch.linspace(0, 1, width) - 0.5))  # the original's column weight
        assert_close_scaled(call["weight"][0, :, 0].reshape(height, width), expected.expand(height, width))
        assert call["rows"] == [2, 3] and call["batch"] == 4  # chunks (1, 0): only the cond rows blend
    assert seen == ({(16, 24), (8, 12)} if kind == "sd15" else {(8, 12), (4, 6)})


def test_contexts_of_different_lengths(monkeypatch):
    calls = record_blends(monkeypatch)
    model = tiny.build("sd15")
    first = tiny.conditioning("sd15", 1)
    negative = tiny.conditioning("sd15", 2, tokens=154)
    doubled = [[torch.cat([first[0][0]] * 2, dim=1), {}]]  # the same tokens twice: the same attention
    out = tiny.sample(cross(model, doubled), "sd15", positive=first, negative=negative)
    assert {(c["context"], c["second_tokens"]) for c in calls} == {(154 + 154, 154)}
    assert_close_scaled(out, tiny.sample(model, "sd15", positive=first, negative=negative), amplification=15)


def test_a_foreign_attn2_patch_is_delegated_to_for_each_context(kind):
    model = tiny.build(kind)
    first, second = prompts(kind)
    contexts = []

    def foreign(q, k, v, extra_options):
        contexts.append(k.shape[1])
        return plain_attention(q, k, v, extra_options)

    base = model.clone()
    for block, number, depth in [("output", 2, 0), ("output", 3, 0)] if kind == "sd15" else [("input", 4, 0), ("output", 0, 1)]:
        base.set_model_attn2_replace(foreign, block, number, depth)
    delegated = tiny.sample(cross(base, second), kind, positive=first)
    assert set(contexts) == {77}  # each context apart, never the appended 154 tokens
    assert_close_scaled(delegated, tiny.sample(cross(model, second), kind, positive=first), amplification=15)
    with pytest.raises(InputError, match="IPAdapter was applied after"):
        existing = cross(model, second).model_options["transformer_options"]["patches_replace"]["attn2"]
        next(iter(existing.values())).set_new_condition(weight=1.0)


def test_only_selected_layers_blend(monkeypatch):
    calls = record_blends(monkeypatch)
    model = tiny.build("sd15")
    first, second = prompts("sd15")
    chosen = LayerSelection("sd1", frozenset({LayerId("output", 3, 0)}), "one")
    tiny.sample(cross(model, second, layers=chosen), "sd15", positive=first, latent=torch.zeros(2, 4, 16, 24))
    assert calls and {c["tokens"] for c in calls} == {16 * 24}  # output.3 is a full-resolution layer
    assert len(calls) == 3  # once per step


def test_cross_attn_blend_leaves_no_trace(kind):
    model = tiny.build(kind)
    first, second = prompts(kind)
    before = tiny.sample(model, kind, positive=first)
    tiny.sample(cross(model, second), kind, positive=first)
    assert torch.equal(tiny.sample(model, kind, positive=first), before)
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_cross_attn_blend_errors():
    import comfy.supported_models

    model = tiny.build("sd15")
    first, second = prompts("sd15")
    with pytest.raises(InputError, match="MultiCond_CrossAttnBlend: input 'second'.*2 prompts"):
        cross(model, first + second)
    with pytest.raises(InputError, match="input 'second'.*takes \\(1, tokens, 64\\)"):
        cross(model, tiny.conditioning("sdxl", 3))
    with pytest.raises(InputError, match="input 'second'.*empty"):
        cross(model, [])
    with pytest.raises(InputError, match="input 'mask'.*empty"):
        cross(model, second, mask=torch.ones(0, 16))
    with pytest.raises(InputError, match="input 'layers'.*for sdxl but the model is sd1"):
        cross(model, second, layers=LayerSelection("sdxl", frozenset({LayerId("input", 4, 0)})))
    model.model.model_config = comfy.supported_models.Stable_Cascade_C.__new__(comfy.supported_models.Stable_Cascade_C)
    with pytest.raises(InputError, match="input 'model'.*Stable_Cascade_C is not supported"):
        cross(model, second)


def test_epsilon_blend_composes_with_style_aligned(monkeypatch):
    from .test_style_nodes import style_aligned

    model = apart(style_aligned(tiny.build("sd15")), monkeypatch)
    first, second = prompts("sd15")
    patched, positive = epsilon(model, first, second, mask=torch.ones(16, 16))
    assert torch.equal(tiny.sample(patched, "sd15", positive=positive), tiny.sample(model, "sd15", positive=first))
    soft, positive = epsilon(model, first, second)
    blended = tiny.sample(soft, "sd15", positive=positive)
    assert torch.isfinite(blended).all() and (blended - tiny.sample(model, "sd15", positive=first)).abs().max() > 1e-3


def test_a_graded_selection_is_followed_per_step(monkeypatch):
    calls = record_blends(monkeypatch)
    model = tiny.build("sd15")
    first, second = prompts("sd15")
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 2)
    steps = [float(sampling.timestep(sigma)) for sigma in sigmas[:2]]
    early, late = LayerId("input", 1, 0), LayerId("output", 3, 0)  # 16x24 tokens; output.5 would be too
    graded = LayerSelection("sd1", frozenset({early, late}), "graded",
                            schedule={round(steps[0]): {early: frozenset({"q"})}, round(steps[1]): {}})
    tiny.sample(cross(model, second, layers=graded), "sd15", positive=first, latent=torch.zeros(1, 4, 16, 24), steps=2)
    assert len(calls) == 1 and calls[0]["tokens"] == 16 * 24  # step 1: input.1 only; step 2: no layer


def test_epsilon_blend_refuses_a_latent_that_is_not_an_image():
    _, positive = epsilon(tiny.build("sd15"), *prompts("sd15"))
    entries = [{**options, "model_conds": {}, "uuid": index} for index, (_, options) in enumerate(positive)]
    video = torch.zeros(1, 4, 3, 8, 8)
    with pytest.raises(InputError, match="MultiCond_EpsilonBlend: input 'model'.*5 dimensions"):
        EpsilonBlendWrapper(EPSILON_BLEND)(lambda *args: None, None, [entries], video, torch.tensor([1.0]), {})


def test_a_mask_of_another_aspect_ratio_is_stretched_with_one_warning_per_size(caplog):
    """ComfyUI's masked-conditioning rule (stretch to the latent), said once in the log, for both blend nodes."""
    model = tiny.build("sd15")
    first, second = prompts("sd15")
    square = torch.zeros(32, 32)
    square[:, :16] = 1.0
    patched, positive = epsilon(model, first, second, mask=square)
    with caplog.at_level("WARNING"):
        tiny.sample(patched, "sd15", positive=positive, latent=torch.zeros(1, 4, 16, 24))
    notes = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("MultiCond_EpsilonBlend") and "32x32" in notes[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiny.sample(cross(model, second, mask=square), "sd15", positive=first, latent=torch.zeros(1, 4, 16, 24))
    notes = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("MultiCond_CrossAttnBlend")
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same shape at another scale is not a stretch
        tiny.sample(cross(model, second, mask=torch.zeros(64, 96)), "sd15", positive=first, latent=torch.zeros(1, 4, 16, 24))
    assert not [r for r in caplog.records if "stretched" in r.getMessage()]
