"""SpatialGuidance on SD3/SD3.5 in a real ComfyUI (InfSplign's sd3_guidance_modular.py, dit.md §4.4).

The tiny SD3.5-L-like model (2 joint blocks) with SD1's CLIP-L tokenizer at the model's context width: the maps are
the joint softmax's image rows x CLIP text columns, the gradient reaches the latent inside inference_mode, and the
update is the seed's latent step made through the denoised prediction.
"""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)
pytest.importorskip("diffusers", reason="the tiny DiTs come from diffusers: scripts/host_venv.sh installs it")

import comfy.model_management  # noqa: E402
import comfy.samplers  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402
import torch  # noqa: E402

import multicond.nodes.spatial as spatial_module  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.core.spatial import CLIP_TOKENS, SpatialSettings  # noqa: E402
from multicond.nodes.blend import BLOCK_LAYER, LayerStamp  # noqa: E402
from multicond.nodes.common import OVERRIDE, OVERRIDE_GUARD_KEY, model_layout  # noqa: E402
from multicond.nodes.spatial import (FROM_PROMPT, RECORD, DetachedTail, JointMapRecorder, JointRecord,  # noqa: E402
                                     SpatialGuidance, install_joint, object_positions)

from . import tiny_dit  # noqa: E402
from .test_spatial_node import count_guided_passes, record_gradients  # noqa: E402
from .tiny_pack import FLUX_DEV, SD35, TinyCheckpoint  # noqa: E402

PROMPT = "a photo of a cat to the left of a dog"
DEFAULTS = dict(text=PROMPT, object_a="", relation=FROM_PROMPT, object_b="", weight=1000.0, start_percent=0.0,
                end_percent=1.0, phi="gelu", alpha=0.75, margin=0.25, lambda_spatial=1.0, lambda_presence=1.0,
                lambda_balance=1.0)
HEIGHT, WIDTH = 10, 14  # a non-square latent: 5 x 7 tokens


def load_tiny(family: str):
    """Model and CLIP loaded inside inference_mode, as ComfyUI's loaders run: the weights are inference tensors."""
    with torch.inference_mode():
        model, clip, _ = TinyCheckpoint().load(family, 0)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, negative


@pytest.fixture(scope="module")
def loaded():
    return load_tiny(SD35)


def guided(model, clip, **overrides):
    return SpatialGuidance.execute(model, clip, **{**DEFAULTS, **overrides}).args


def run(model, positive, negative, steps=3, height=HEIGHT, width=WIDTH, **kwargs):
    return tiny_dit.sample(model, batch=2, height=height, width=width, steps=steps, positive=positive,
                           negative=negative, **kwargs)


def test_maps_are_the_explicit_softmax_image_rows_by_clip_columns(loaded):
    """Head-averaged softmax(q k^T / sqrt(d)) over all joint keys, image query rows x the first 77 text columns."""
    model, clip, _ = loaded
    seen = []

    def spy(func, *args, **kwargs):  # an override another node set: the recorder keeps and calls it
        seen.append((args[0].detach().clone(), args[1].detach().clone(), kwargs["heads"]))
        return func(*args, **kwargs)

    base = model.clone()
    base.model_options.setdefault("transformer_options", {})[OVERRIDE] = spy
    patched, _ = guided(base, clip)
    recorder = patched.model_options["transformer_options"][OVERRIDE]
    assert isinstance(recorder, JointMapRecorder) and recorder.inner is spy
    data = tiny_dit.inputs(2, height=HEIGHT, width=WIDTH, text_tokens=CLIP_TOKENS + 13)  # CLIP 77 + a T5 part
    image = 5 * 7
    record = JointRecord((0, 1), image, [])
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0], RECORD: record,
               "sigmas": torch.full((2,), 0.7)}
    with torch.inference_mode():
        patched.model.apply_model(data["x"], torch.full((2,), 0.7), c_crossattn=data["context"], y=data["pooled"],
                                  transformer_options=options)
    assert len(seen) == 2 and len(record.maps) == 2
    for (q, k, heads), maps in zip(seen, record.maps):
        batch, tokens, width = q.shape
        split = lambda t: t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)  # noqa: E731
        probs = (split(q) @ split(k).transpose(-1, -2) * (width // heads) ** -0.5).softmax(dim=-1)
        text = tokens - image
        expected = probs[:, :, text:, :CLIP_TOKENS].mean(dim=1)
        assert maps.shape == (2, image, CLIP_TOKENS)
        torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)


def test_blocks_are_stamped_and_the_tail_runs_without_autograd(loaded):
    model, clip, _ = loaded
    patched, _ = guided(model, clip)
    slots = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(slots) == {("double_block", 0), ("double_block", 1)}
    for number, patch in ((n, slots[("double_block", n)]) for n in (0, 1)):
        assert isinstance(patch, DetachedTail) and isinstance(patch.inner, LayerStamp)
        assert patch.layer.number == number == patch.inner.layer.number
    guidance = patched.get_wrappers(spatial_module.WrappersMP.APPLY_MODEL, spatial_module.WRAPPER_KEY)[0].guidance
    # 2 blocks: the seed's 4-7 and 8-9 of 24 as fractions of depth keep block 0 at every step.
    assert guidance.joint.early == guidance.joint.late == (0,)
    seen = []

    def block(args):
        seen.append((args["transformer_options"][BLOCK_LAYER].number, torch.is_grad_enabled()))
        return {"img": args["img"], "txt": args["txt"]}

    record = JointRecord((0,), 4, [])
    with torch.enable_grad():
        for patch in (slots[("double_block", 0)], slots[("double_block", 1)]):
            patch({"img": None, "txt": None, "transformer_options": {RECORD: record}}, {"original_block": block})
    assert seen == [(0, True), (1, False)]


def test_the_gradient_reaches_the_latent_and_the_update_is_the_seeds_latent_step(loaded, monkeypatch):
    """One Euler step from sigma 1 to 0 returns the guided denoised latent: the seed's x <- x - 30 w/1000 dL/dx."""
    model, clip, negative = loaded
    gradients = record_gradients(monkeypatch)
    weighted, positive = guided(model, clip, weight=50000.0)
    plain = run(model, positive, negative, steps=1)
    steered = run(weighted, positive, negative, steps=1)
    gradient, = gradients
    assert torch.isfinite(gradient).all() and gradient.abs().max() > 0
    sigma = float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1)[0])
    shift = -30.0 * 50000.0 / 1000.0 * sigma / (sigma - 0.0) * gradient
    # The sampler hands back latents in the VAE's scale: SD3's latent format is affine, the shift cancels.
    expected = model.model.process_latent_out(shift) - model.model.process_latent_out(torch.zeros_like(shift))
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(steered - plain, expected, atol=1e-5 * float(steered.abs().max()), rtol=1e-4)


def test_only_the_guided_steps_change(loaded, monkeypatch):
    model, clip, negative = loaded
    calls = count_guided_passes(monkeypatch)
    patched, positive = guided(model, clip, weight=50000.0, end_percent=0.3)
    steered = run(patched, positive, negative, steps=4)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)[:-1]
    low = float(model.get_model_object("model_sampling").percent_to_sigma(0.3))
    assert len(calls) == int((sigmas >= low).sum()) == 2  # the seed guides the first 30 % of steps
    assert torch.isfinite(steered).all() and (steered - run(model, positive, negative, steps=4)).abs().max() > 1e-3
    calls.clear()
    late, _ = guided(model, clip, weight=50000.0, start_percent=0.5)
    unguided = run(model, positive, negative, steps=4, seed=7)
    # From 50 % on, the first two steps run unguided: the last steps' changes only.
    assert (run(late, positive, negative, steps=4, seed=7) - unguided).abs().max() > 0 and len(calls) == 2


def test_weight_zero_and_an_empty_range_are_plain_sampling_bit_for_bit(loaded, monkeypatch):
    model, clip, negative = loaded
    calls = []
    monkeypatch.setattr(spatial_module.GuidanceWrapper, "_guided", lambda *args, **kwargs: calls.append(1))
    zero, positive = guided(model, clip, weight=0.0)
    plain = run(model, positive, negative)
    assert torch.equal(run(zero, positive, negative), plain)
    off, _ = guided(model, clip, start_percent=1.0, end_percent=1.0)
    assert torch.equal(run(off, positive, negative), plain)
    assert not calls


@pytest.mark.parametrize("height,width", [(10, 14), (9, 12), (16, 8)])
def test_non_square_and_odd_latents(loaded, height, width):
    """The token grid is (ceil(H/2), ceil(W/2)); the seed assumed a square one."""
    model, clip, negative = loaded
    patched, positive = guided(model, clip, weight=50000.0)
    steered = run(patched, positive, negative, steps=2, height=height, width=width)
    plain = run(model, positive, negative, steps=2, height=height, width=width)
    assert steered.shape == plain.shape and torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-3


def test_the_model_stays_untouched(loaded):
    model, clip, negative = loaded
    patched, positive = guided(model, clip, weight=50000.0)
    before = run(model, positive, negative)
    run(patched, positive, negative)
    assert torch.equal(run(model, positive, negative), before)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert OVERRIDE not in model.model_options.get("transformer_options", {})


def test_errors_name_the_node_and_input(loaded):
    model, clip, negative = loaded
    with pytest.raises(InputError, match="MultiCond_SpatialGuidance: input 'object_b'.*'horse' is not in the prompt"):
        guided(model, clip, object_b="horse")
    patched, _ = guided(model, clip, weight=50000.0)
    short = tiny_dit.conditioning(1, tokens=4)  # a positive of 4 tokens: 'cat' and 'dog' lie past its text
    with pytest.raises(InputError, match="MultiCond_SpatialGuidance: input 'text'.*past the 4 text tokens"):
        run(patched, short, negative)
    replaced = patched.clone()  # another node's override, set after this one without keeping it, and no guard left
    replaced.model_options["transformer_options"][OVERRIDE] = lambda func, *args, **kwargs: func(*args, **kwargs)
    replaced.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, OVERRIDE_GUARD_KEY)
    with pytest.raises(InputError, match="MultiCond_SpatialGuidance: input 'model'.*no joint-attention maps"):
        run(replaced, tiny_dit.conditioning(1, tokens=CLIP_TOKENS), negative)


# --- Flux.1: T5 text, no start token, double blocks (dit.md §2.8, §4.4) ---------------------------------------------


@pytest.fixture(scope="module")
def flux_loaded():
    return load_tiny(FLUX_DEV)


def flux_guided(model):
    """The node's Flux plumbing with fixed words (T5 positions 2 and 5)."""
    patched = model.clone()
    return patched, install_joint(patched, model_layout(model, "test", dit=True), SpatialSettings(), (2,), (5,), 1.0, 0.0)


def test_flux_words_are_t5_tokens_without_a_start_token(flux_loaded):
    model, clip, _ = flux_loaded
    t5 = clip.tokenizer.t5xxl.tokenizer
    tokens = t5(PROMPT)["input_ids"]
    for word in ("cat", "dog"):
        positions = object_positions(clip, PROMPT, word, "object_a", encoder="t5xxl")
        assert [tokens[i] for i in positions] == t5(word)["input_ids"][:-1]
    patched, guidance = flux_guided(model)
    assert guidance.joint.text_limit is None and guidance.joint.early == (0,)
    slots = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(slots) == {("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)}


def test_flux_maps_are_the_explicit_softmax_image_rows_by_text_columns(flux_loaded):
    model, clip, _ = flux_loaded
    seen = []

    def spy(func, *args, **kwargs):
        seen.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)

    base = model.clone()
    base.model_options.setdefault("transformer_options", {})[OVERRIDE] = spy
    patched, _ = flux_guided(base)
    data = tiny_dit.flux_inputs(2, height=HEIGHT, width=WIDTH, text_tokens=9)
    record = JointRecord((0,), 5 * 7, [], None, None)
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0], RECORD: record,
               "sigmas": torch.full((2,), 0.7)}
    with torch.inference_mode():
        patched.model.apply_model(data["x"], torch.full((2,), 0.7), c_crossattn=data["context"], y=data["pooled"],
                                  guidance=torch.full((2,), 3.5), transformer_options=options)
    assert len(seen) == 4 and len(record.maps) == 1  # 2 double + 2 single blocks; double block 0 measured
    q, k = seen[0]
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    torch.testing.assert_close(record.maps[0], probs[:, :, 9:, :9].mean(dim=1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_flux_guidance_moves_the_sample_and_weight_0_does_not(flux_loaded, cfg):
    """Autograd through Flux's in-place residual adds (the saved-tensor copies, views owned by the inference-weight
    routing, the host's PyTorch RoPE during the guided pass): the guided run is finite and differs; weight 0 is plain."""
    model, clip, negative = flux_loaded
    patched, positive = guided(model, clip)
    plain = run(model, positive, negative, cfg=cfg)
    steered = run(patched, positive, negative, cfg=cfg)
    assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-6
    assert not getattr(comfy.model_management, "in_training", False)  # the host's switch is back as it was
    still, positive = guided(model, clip, weight=0.0)
    assert torch.equal(run(still, positive, negative, cfg=cfg), plain)


@pytest.mark.parametrize("order", ["blend after guidance", "guidance after blend"])
def test_guidance_beside_the_cross_attention_blend(loaded, order):
    """Both read every joint attention (the map recorder stays outermost, the blend below it): with a ones mask the
    blend is the positive alone, so the guided run equals guidance alone; a soft profile moves it."""
    from multicond.nodes.blend import CrossAttnBlend

    model, clip, negative = loaded
    second = clip.encode_from_tokens_scheduled(clip.tokenize("a red bird"))

    def both(mask=None):
        profile = dict(profile="mask" if mask is not None else "sigmoid", direction="left to right", angle=0.0,
                       center=0.5, sharpness=30.0, ramp_width=1.0, mask=mask)
        if order == "blend after guidance":
            patched, positive = guided(model, clip, weight=50000.0)
            return CrossAttnBlend.execute(patched, second, **profile).args[0], positive
        blended = CrossAttnBlend.execute(model, second, **profile).args[0]
        return guided(blended, clip, weight=50000.0)

    alone, positive = guided(model, clip, weight=50000.0)
    expected = run(alone, positive, negative)
    ones, positive = both(torch.ones(HEIGHT, WIDTH))
    torch.testing.assert_close(run(ones, positive, negative), expected, rtol=0,
                               atol=1e-5 * 4 * 3 * float(expected.abs().max()))
    soft, positive = both()
    assert (run(soft, positive, negative) - expected).abs().max() > 1e-4
    assert (expected - run(model, positive, negative)).abs().max() > 1e-4  # the guidance acts at all


@pytest.mark.parametrize("kind", ["sd35", "flux"])
def test_an_override_set_after_the_guidance_runs_below_it(loaded, flux_loaded, kind):
    """A node after Spatial Guidance that sets its own attention override (as 0.33.0's Model Attention Backend does)
    goes beneath the map recorder at sampling: the guided run is the same, and the newcomer's attention runs."""
    from .test_override_after_pack import backend

    model, clip, negative = flux_loaded if kind == "flux" else loaded
    patched, positive = guided(model, clip, weight=50000.0)
    newcomer, calls = backend()
    after = patched.clone()
    after.model_options["transformer_options"][OVERRIDE] = newcomer
    expected = run(patched, positive, negative)
    torch.testing.assert_close(run(after, positive, negative), expected, rtol=0,
                               atol=1e-5 * 4 * 3 * float(expected.abs().max()))
    assert calls and (expected - run(model, positive, negative)).abs().max() > 1e-4
