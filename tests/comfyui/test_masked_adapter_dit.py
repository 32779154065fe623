"""MaskedAdapter on SD3/SD3.5 and Flux.1 ControlNets in a real ComfyUI (dit.md §2.6, §4.5).

Tiny random ControlNets of each kind the hosts build, attached by ComfyUI's own Apply ControlNet:
SD3's diffusers-format ControlNet through the host's loader (`load_controlnet_state_dict`), an
SD3.5 ControlNet (`ControlNetSD35` around `ControlNetEmbedder`, as `load_controlnet_sd35` makes it,
with a 32-wide pooled embedding where the loader fixes 2048), and Flux XLabs and InstantX/Union
ControlNets (`ControlNetFlux`, as their loaders make them: detection fixes Flux's real sizes). The
residuals are image tokens [B, L, hidden]; several blocks share one tensor object (SD3.5, Flux).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import comfy.controlnet  # noqa: E402
import comfy.sd  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from multicond.core.diffusers_binding.tiny_dit import tiny_sd3_config  # noqa: E402
from multicond.core.errors import InputError  # noqa: E402
from multicond.nodes.adapter import MaskedAdapter  # noqa: E402
from multicond.nodes.style import SharedAttention  # noqa: E402

from ..conftest import assert_close_scaled  # noqa: E402
from . import tiny, tiny_dit  # noqa: E402
from .graph import call  # noqa: E402

CPU = torch.device("cpu")
LATENT = (16, 12)  # non-square (tall): an 8x6 token grid, 48 tokens
WIDE = (10, 16)    # non-square (wide): a 5x8 token grid
STEPS, CFG = 2, 4.0


@functools.cache
def vae16() -> comfy.sd.VAE:
    """A tiny random VAE with 16 latent channels: SD3/SD3.5 and InstantX ControlNets encode their hint with it."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"ddconfig": {**tiny.TINY_VAE_DDCONFIG, "z_channels": 16}, "embed_dim": 16}
    model = AutoencoderKL(**params)
    tiny.randomize(model, 3)
    return comfy.sd.VAE(sd=model.state_dict(), config={"params": params}, dtype=torch.float32)


def sd3_controlnet(seed: int = 0) -> comfy.controlnet.ControlNet:
    """A diffusers-format SD3 ControlNet (one block) loaded by the host's own loader."""
    from diffusers import SD3ControlNetModel

    model = SD3ControlNetModel(**{**tiny_sd3_config("sd3m"), "num_layers": 1})
    tiny.randomize(model, seed)
    control = comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert type(control.control_model).__module__ == "comfy.cldm.mmdit"
    return control


def sd35_controlnet(seed: int = 0) -> comfy.controlnet.ControlNet:
    """An SD3.5 (blur/canny/depth-style) ControlNet: one block, repeated over the two main blocks."""
    return tiny.build_sd35_controlnet(seed, pooled_width=tiny_dit.POOLED_WIDTH, load_device=CPU)


def flux_controlnet(main: Any, union: bool, seed: int = 0) -> comfy.controlnet.ControlNet:
    """XLabs (image hint, double blocks only) or InstantX/Union (latent hint, a union type set); one block each."""
    return tiny.build_flux_controlnet(main, union, seed, load_device=CPU)


@dataclass
class Setup:
    model: Any
    make_control: Callable[[int], Any]
    conditioning: Callable[[int], list]
    repeats: bool = True  # whether the control repeats one block's tensor over several main blocks


def setup_of(name: str) -> Setup:
    if name == "sd3":
        return Setup(tiny_dit.build("sd3m"), sd3_controlnet, tiny_dit.conditioning, repeats=False)  # 1 output for 2 blocks
    if name == "sd35":
        return Setup(tiny_dit.build("sd35l"), sd35_controlnet, tiny_dit.conditioning)
    main = tiny_dit.build_flux_weighted("dev")
    union = name == "flux instantx union"
    return Setup(main, lambda seed: flux_controlnet(main, union, seed), tiny_dit.flux_conditioning)


KINDS = ["sd3", "sd35", "flux xlabs", "flux instantx union"]


@pytest.fixture(params=KINDS)
def setup(request) -> Setup:
    return setup_of(request.param)


def apply_control(control, positive, negative, strength=1.0, seed=7, size=LATENT):
    hint = torch.rand(1, size[0] * 8, size[1] * 8, 3, generator=torch.Generator().manual_seed(seed))
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, strength, 0.0, 1.0,
                                                                  vae=vae16())


def controlled(setup: Setup, strength=1.0, size=LATENT, seed=0):
    return apply_control(setup.make_control(seed), setup.conditioning(1), setup.conditioning(2), strength, size=size)


def masked(positive, negative, mask, resize="nearest", feather=0.0, level_strengths=""):
    return MaskedAdapter.execute(positive, negative, mask, resize, feather, level_strengths).args


def run(model, positive, negative, batch=2, size=LATENT, steps=STEPS):
    return tiny_dit.sample(model, batch=batch, height=size[0], width=size[1], steps=steps, cfg=CFG,
                           positive=positive, negative=negative)


def left_half(size=LATENT, soft_right: float = 0.0, columns: float | None = None) -> torch.Tensor:
    """A mask at pixel resolution: 1 on the first `columns` latent columns (default: the left half), `soft_right`
    on the rest."""
    columns = size[1] / 2 if columns is None else columns
    mask = torch.full((size[0] * 8, size[1] * 8), soft_right)
    mask[:, : round(columns * 8)] = 1.0
    return mask


def left_half_tokens(size=LATENT, soft_right: float = 0.0, columns: float | None = None) -> torch.Tensor:
    """`left_half` by hand on the token grid (ceil(H/2) x ceil(W/2)), row-major, as [1, L, 1]: a token covers
    latent columns 2j and 2j+1, and takes the mask at its first one (nearest)."""
    columns = size[1] / 2 if columns is None else columns
    rows, width = -(-size[0] // 2), -(-size[1] // 2)
    grid = torch.full((rows, width), soft_right)
    grid[:, [2 * j < columns for j in range(width)]] = 1.0
    return grid.reshape(1, rows * width, 1)


@dataclass
class Call:
    control: dict[str, list[torch.Tensor | None]]
    shared: dict[str, list[int]]  # per entry: the index of the first entry holding the same tensor object
    rows: int


@contextlib.contextmanager
def recorded(model) -> Iterator[list[Call]]:
    """Every model call's control residuals as the diffusion model receives them (cloned: the model adds them)."""
    seen: list[Call] = []

    def hook(module, args, kwargs):
        control = kwargs.get("control") or {}
        seen.append(Call({key: [None if r is None else r.clone() for r in value] for key, value in control.items()},
                         {key: [next(j for j, s in enumerate(value) if s is r) for r in value]
                          for key, value in control.items()}, args[0].shape[0]))

    handle = model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def first_call(model, positive, negative, **kwargs) -> Call:
    with recorded(model) as seen:
        run(model, positive, negative, steps=1, **kwargs)
    return seen[0]


def residual_pairs(got: Call, reference: Call,
                   same_sharing: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The non-None residuals of two calls side by side; by default their entries share tensors alike."""
    assert got.control.keys() == reference.control.keys() and (got.shared == reference.shared or not same_sharing)
    for key, residuals in got.control.items():
        assert len(residuals) == len(reference.control[key])
        for a, b in zip(residuals, reference.control[key]):
            assert (a is None) == (b is None)
            if a is not None:
                yield a, b


def residuals(c: Call) -> list[torch.Tensor]:
    """A call's non-None residuals, in order."""
    return [r for value in c.control.values() for r in value if r is not None]


def test_ones_mask_is_bit_identical_to_no_masked_adapter(setup):
    positive, negative = controlled(setup)
    plain = run(setup.model, positive, negative)
    assert torch.equal(run(setup.model, *masked(positive, negative, torch.ones(LATENT[0] * 8, LATENT[1] * 8))), plain)


def test_zeros_mask_is_identical_to_no_control(setup):
    without = run(setup.model, setup.conditioning(1), setup.conditioning(2))
    positive, negative = controlled(setup)
    assert (run(setup.model, positive, negative) - without).abs().max() > 1e-3, "the control must matter for this test"
    zeros = torch.zeros(LATENT[0] * 8, LATENT[1] * 8)
    assert torch.equal(run(setup.model, *masked(positive, negative, zeros)), without)


@pytest.mark.parametrize("size", [LATENT, WIDE], ids=["tall", "wide"])
def test_a_half_mask_keeps_the_left_tokens_residuals_and_zeroes_the_right(setup, size):
    positive, negative = controlled(setup, size=size)
    plain = first_call(setup.model, positive, negative, size=size)
    got = first_call(setup.model, *masked(positive, negative, left_half(size)), size=size)
    by_hand = left_half_tokens(size)
    pairs = list(residual_pairs(got, plain))  # the repeats of one tensor still share one (masked once)
    assert pairs and (setup.repeats == any(i != j for value in got.shared.values() for i, j in enumerate(value)))
    for residual, reference in pairs:
        assert residual.shape[1] == by_hand.shape[1]
        assert torch.equal(residual, reference * by_hand)
        assert reference[:, by_hand[0, :, 0] == 1].abs().min() > 0  # the kept tokens carry a residual
    # Only the control's contribution inside the mask remains: the result moves away from both ends.
    out = run(setup.model, *masked(positive, negative, left_half(size)), size=size)
    full = run(setup.model, positive, negative, size=size)
    none = run(setup.model, setup.conditioning(1), setup.conditioning(2), size=size)
    assert (out - full).abs().max() > 1e-3 and (out - none).abs().max() > 1e-3


def test_a_repeated_residual_is_masked_once_in_a_chain_at_half_strength(setup):
    """Soft mask 1 | 0.5, the masked control at strength 0.5 after another control: no factor is applied twice."""
    first = apply_control(setup.make_control(1), setup.conditioning(1), setup.conditioning(2), seed=5)
    second_control = setup.make_control(2)
    chained = apply_control(second_control, *first, strength=0.5)
    alone = apply_control(second_control, setup.conditioning(1), setup.conditioning(2), strength=0.5)
    previous, own = first_call(setup.model, *first), first_call(setup.model, *alone)
    unmasked = first_call(setup.model, *chained)
    got = first_call(setup.model, *masked(*chained, left_half(soft_right=0.5)))
    weights = left_half_tokens(soft_right=0.5)
    # Powers of two multiply exactly: (r·m)·0.5 == (r·0.5)·m, so the merge by hand must match bit for bit.
    by_hand = [before + mine * weights for before, mine in zip(residuals(previous), residuals(own))]
    masked_residuals = [residual for residual, _ in residual_pairs(got, unmasked)]
    assert len(masked_residuals) == len(by_hand) > 0
    for residual, expected in zip(masked_residuals, by_hand):
        assert torch.equal(residual, expected)


@pytest.mark.parametrize("name", ["sd35", "flux instantx union"])
def test_the_reference_row_gets_no_control_with_zero_reference_control(name):
    setup = setup_of(name)
    styled = call(SharedAttention, model=setup.model, share_group_norm=False, zero_reference_control=True)[0]
    positive, negative = controlled(setup)
    plain = first_call(setup.model, positive, negative, batch=3)
    got = first_call(styled, *masked(positive, negative, left_half()), batch=3)
    reference_rows = torch.tensor([True, False, False] * 2)  # row 0 of each chunk (uncond, cond)
    for residual, unstyled in residual_pairs(got, plain, same_sharing=False):  # zeroing copies each entry
        assert residual.shape[0] == 6
        assert residual[reference_rows].eq(0).all()
        assert torch.equal(residual[~reference_rows], unstyled[~reference_rows] * left_half_tokens())


def test_cond_and_uncond_together_equal_apart(setup, monkeypatch):
    positive, negative = masked(*controlled(setup), left_half())
    with recorded(setup.model) as together_calls:
        together = run(setup.model, positive, negative)
    # ComfyUI batches chunks only while it thinks they fit in memory: make them never fit.
    monkeypatch.setattr(setup.model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    with recorded(setup.model) as apart_calls:
        apart = run(setup.model, positive, negative)
    assert {c.rows for c in together_calls} == {4} and {c.rows for c in apart_calls} == {2}
    assert_close_scaled(apart, together, amplification=CFG * STEPS)
    for call_apart in apart_calls[:2]:  # the first step: uncond and cond, each alone
        for residual in residuals(call_apart):
            assert residual[:, left_half_tokens()[0, :, 0] == 0].eq(0).all()
            assert residual[:, left_half_tokens()[0, :, 0] == 1].abs().min() > 0


def test_one_mask_per_image_maps_to_the_latent_batch():
    setup = setup_of("sd35")
    positive, negative = controlled(setup)
    masks = torch.stack([torch.ones(LATENT[0] * 8, LATENT[1] * 8), torch.zeros(LATENT[0] * 8, LATENT[1] * 8)])
    got = first_call(setup.model, *masked(positive, negative, masks))
    for residual in residuals(got):  # rows: uncond 0, 1, cond 0, 1
        assert residual[[0, 2]].abs().min() > 0 and residual[[1, 3]].eq(0).all()
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input .mask.: 2 masks for a latent batch of 3"):
        run(setup.model, *masked(positive, negative, masks), batch=3, steps=1)


def test_what_it_cannot_do_is_named():
    setup = setup_of("flux xlabs")
    positive, negative = controlled(setup)
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input 'level_strengths'.*one resolution"):
        run(setup.model, *masked(positive, negative, left_half(), level_strengths="1, 0.5"), steps=1)
    # A transformer ControlNet whose residuals are not the latent's 2x2-patch image tokens (another family's).
    control = masked(positive, negative, left_half())[0][0][1]["control"]
    control.latent_size = LATENT
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input 'positive'.*not what this node can mask"):
        control.control_merge({"input": [torch.ones(2, 40, 64)]}, None, None)


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux instantx union"])  # XLabs' hint encoder needs even latents
def test_an_odd_latent_masks_each_token_at_its_place_in_the_padded_grid(name):
    """9x13 latent -> 5x7 tokens, the last ones half padding: the mask is not stretched over the padding."""
    setup, size = setup_of(name), (9, 13)
    positive, negative = controlled(setup, size=size)
    plain = first_call(setup.model, positive, negative, size=size)
    # Six latent columns: tokens 0-2 inside; stretched over 7 tokens, token 3 would land at column 5.6, inside too.
    got = first_call(setup.model, *masked(positive, negative, left_half(size, columns=6)), size=size)
    for residual, reference in residual_pairs(got, plain):
        assert residual.shape[1] == 5 * 7
        assert torch.equal(residual, reference * left_half_tokens(size, columns=6))
