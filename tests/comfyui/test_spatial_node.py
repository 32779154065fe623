"""SpatialGuidance in a real ComfyUI: autograd inside inference_mode, real samplers and CFG."""

from __future__ import annotations

import math

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.samplers  # noqa: E402
import torch  # noqa: E402

import multicond.nodes.spatial as spatial_module  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.layers import LayerId  # noqa: E402
from multicond.core.spatial import BALANCE, PRESENCE  # noqa: E402
from multicond.nodes.spatial import FROM_PROMPT, MapRecorder, SpatialGuidance, prompt_tokens  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny  # noqa: E402
from .tiny_pack import TinyCheckpoint  # noqa: E402

PROMPT = "a photo of a cat to the left of a dog"
DEFAULTS = dict(text=PROMPT, object_a="", relation=FROM_PROMPT, object_b="", weight=1000.0, start_percent=0.0,
                end_percent=1.0, phi="gelu", alpha=0.75, margin=0.25, lambda_spatial=1.0, lambda_presence=1.0,
                lambda_balance=1.0)


@pytest.fixture(params=["sd15", "sdxl"])
def kind(request):
    return request.param


def load(kind: str):
    """Model and CLIP loaded inside inference_mode, as ComfyUI's loaders run: the weights are inference tensors."""
    with torch.inference_mode():
        model, clip, _ = TinyCheckpoint().load(kind, 0)
    return model, clip


def guided(model, clip, **overrides):
    return SpatialGuidance.execute(model, clip, **{**DEFAULTS, **overrides}).args


def run(model, kind, positive, negative, **kwargs):
    return tiny.sample(model, kind, positive=positive, negative=negative, **{"batch": 2, "steps": 3, **kwargs})


def negative_of(clip):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(""))


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_guidance_runs_inside_inference_mode_and_moves_the_image(kind, sampler, scheduler):
    model, clip = load(kind)
    assert next(model.model.diffusion_model.parameters()).is_inference()
    # The tiny random model's maps hardly depend on the latent (gradients ~1e-9): a strong weight shows the step.
    patched, positive = guided(model, clip, weight=100000.0)
    negative = negative_of(clip)
    plain = run(model, kind, positive, negative, sampler=sampler, scheduler=scheduler)
    steered = run(patched, kind, positive, negative, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(steered).all()
    assert (steered - plain).abs().max() > 1e-2


def test_inference_weights_give_the_same_guidance_as_ordinary_weights():
    model, clip = load("sd15")
    ordinary = tiny.build("sd15")  # built outside inference_mode: ordinary parameters
    ordinary.model.diffusion_model.load_state_dict({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()})
    negative = negative_of(clip)
    patched, positive = guided(model, clip)
    reference, _ = guided(ordinary, clip)
    # autograd through other routes: a gradient step (rel 1e-4) over 3 steps at CFG 5
    assert_close_scaled(run(patched, "sd15", positive, negative), run(reference, "sd15", positive, negative), rel=1e-4,
                        amplification=15)


def count_guided_passes(monkeypatch) -> list:
    """One entry per guided pass the node runs (GuidanceWrapper._guided)."""
    calls = []
    original = spatial_module.GuidanceWrapper._guided

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(spatial_module.GuidanceWrapper, "_guided", spy)
    return calls


def record_gradients(monkeypatch) -> list:
    """Every gradient a guided step adds (StepGradient.add), cloned, in order."""
    gradients = []
    original_add = spatial_module.StepGradient.add

    def spy(self, gradient):
        gradients.append(gradient.clone())
        return original_add(self, gradient)

    monkeypatch.setattr(spatial_module.StepGradient, "add", spy)
    return gradients


def test_the_update_is_the_papers_epsilon_step_in_sigma_terms(monkeypatch):
    """One Euler step to sigma 0 returns the guided denoised latent: denoised - sigma w sqrt(1 + sigma^2) dL/dx."""
    model, clip = load("sd15")
    negative = negative_of(clip)
    gradients = record_gradients(monkeypatch)
    weighted, positive = guided(model, clip, weight=100000.0)
    unweighted, _ = guided(model, clip, weight=0.0)
    with_weight = run(weighted, "sd15", positive, negative, steps=1)
    gradient, = gradients[:1]
    sigma = float(comfy.samplers.calculate_sigmas(weighted.get_model_object("model_sampling"), "normal", 1)[0])
    without = run(unweighted, "sd15", positive, negative, steps=1)
    expected = -sigma * 100000.0 * math.sqrt(1 + sigma**2) * gradient
    expected = model.model.process_latent_out(expected)  # the sampler hands back latents in the VAE's scale
    assert expected.abs().max() > 0.05
    # The Euler step x + (x - denoised)(0 - sigma)/sigma cancels ~300-sized values: float32 rounding of that size
    # (1e-4 measured), not of the 0.5-sized update.
    torch.testing.assert_close(with_weight - without, expected, atol=1e-5 * float(with_weight.abs().max()), rtol=0)


def test_guided_layers_and_their_roles(kind):
    model, clip = load(kind)
    patched, _ = guided(model, clip)
    slots = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    roles = {LayerId(*key): patch.role for key, patch in slots.items() if isinstance(patch, MapRecorder)}
    if kind == "sd15":  # two decoder levels with attention: the coarser presence, the finer balance
        assert roles == {LayerId("output", n, 0): PRESENCE for n in (0, 1)} | {LayerId("output", n, 0): BALANCE for n in (2, 3)}
    else:  # the coarsest decoder level's second attention, depths 1 and up (the tiny model has 3): the original's
        # "blocks.1" match gives transformer_blocks.1 the presence term and later depths the balance term
        assert roles == {LayerId("output", 1, 1): PRESENCE, LayerId("output", 1, 2): BALANCE}


def test_start_and_end_limit_the_guided_steps(monkeypatch):
    model, clip = load("sd15")
    negative = negative_of(clip)
    calls = count_guided_passes(monkeypatch)
    patched, positive = guided(model, clip, start_percent=0.0, end_percent=0.5)
    run(patched, "sd15", positive, negative, steps=4)
    assert 0 < len(calls) < 4
    calls.clear()
    off, _ = guided(model, clip, start_percent=1.0, end_percent=1.0)
    assert torch.equal(run(off, "sd15", positive, negative), run(model, "sd15", positive, negative))
    zero, _ = guided(model, clip, weight=0.0)
    assert torch.equal(run(zero, "sd15", positive, negative), run(model, "sd15", positive, negative))
    assert not calls


def test_without_cfg_and_with_cfg(kind):
    model, clip = load(kind)
    patched, positive = guided(model, clip, weight=100000.0)
    negative = negative_of(clip)
    for cfg in (1.0, 7.5):
        steered = run(patched, kind, positive, negative, cfg=cfg)
        assert torch.isfinite(steered).all() and (steered - run(model, kind, positive, negative, cfg=cfg)).abs().max() > 1e-2


def test_no_leak_into_a_later_unpatched_run():
    model, clip = load("sd15")
    negative = negative_of(clip)
    patched, positive = guided(model, clip)
    before = run(model, "sd15", positive, negative)
    run(patched, "sd15", positive, negative)
    assert torch.equal(run(model, "sd15", positive, negative), before)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_word_positions_come_from_the_clip_l_tokens(kind):
    model, clip = load(kind)
    patched, _ = guided(model, clip)
    guidance = patched.get_wrappers(spatial_module.WrappersMP.APPLY_MODEL, spatial_module.WRAPPER_KEY)[0].guidance
    tokens = prompt_tokens(clip, PROMPT)
    cat, dog = clip.tokenizer.clip_l.tokenizer("cat dog")["input_ids"][1:3]
    assert [tokens[i] for i in guidance.tokens_a] == [cat] and [tokens[i] for i in guidance.tokens_b] == [dog]
    assert guidance.settings.relation == "left of"


def test_errors_name_the_input():
    model, clip = load("sd15")
    with pytest.raises(InputError, match="MultiCond_SpatialGuidance: input 'object_b'.*'horse' is not in the prompt"):
        guided(model, clip, object_b="horse")
    with pytest.raises(InputError, match="input 'relation'.*no relation"):
        guided(model, clip, text="a cat and a dog")
    with pytest.raises(InputError, match="input 'start_percent'"):
        guided(model, clip, start_percent=0.8, end_percent=0.2)
    import comfy.supported_models

    model.model.model_config = comfy.supported_models.Stable_Cascade_C.__new__(comfy.supported_models.Stable_Cascade_C)
    with pytest.raises(InputError, match="input 'model'.*not supported"):
        guided(model, clip)


def test_a_foreign_attn2_patch_with_inference_tensors_keeps_its_output():
    """As IPAdapter: a replace on a guided layer that attends to extra keys made inside inference_mode."""
    from multicond.nodes.common import plain_attention

    model, clip = load("sd15")
    negative = negative_of(clip)
    with torch.inference_mode():
        extra = torch.randn(1, 4, 64)  # image tokens' keys/values, an inference tensor

    def foreign(q, k, v, extra_options):
        image = extra.to(q).expand(q.shape[0], -1, -1)
        return plain_attention(q, k, v, extra_options) + 0.5 * plain_attention(q, image, image, extra_options)

    base = model.clone()
    base.set_model_attn2_replace(foreign, "output", 2, 0)
    patched, positive = guided(base, clip, weight=100000.0)
    steered = run(patched, "sd15", positive, negative)
    unguided = run(base, "sd15", positive, negative)
    assert torch.isfinite(steered).all() and (steered - unguided).abs().max() > 1e-2
    off, _ = guided(base, clip, start_percent=1.0, end_percent=1.0)
    assert torch.equal(run(off, "sd15", positive, negative), unguided)


def test_a_step_that_fails_after_the_guided_pass_leaves_nothing_for_the_next_run():
    """The gradient lives only inside one prediction: a failure after the guided pass cannot leak into another run."""
    model, clip = load("sd15")
    negative = negative_of(clip)
    patched, positive = guided(model, clip, weight=100000.0)
    failing = patched.clone()

    def fail(args):  # runs after the model call (the guided pass) and before CFG and the update
        raise RuntimeError("a pre-CFG function fails")

    failing.set_model_sampler_pre_cfg_function(fail)
    with pytest.raises(RuntimeError, match="a pre-CFG function fails"):
        run(failing, "sd15", positive, negative, seed=3)
    fresh, _ = guided(model, clip, weight=100000.0)
    assert torch.equal(run(patched, "sd15", positive, negative, seed=5), run(fresh, "sd15", positive, negative, seed=5))
