"""The diffusers binding of joint-attention StyleAligned on tiny random Flux-dev/schnell-shaped transformers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from multicond.core.diffusers_binding import (ALIGNEDGEN_STYLE, FluxPositions, FluxStyleProcessor, flux_layout,
                                              install_style_aligned_flux)
from multicond.core.diffusers_binding import joint_style_flux
from multicond.core.diffusers_binding.tiny_dit import FLUX_VARIANTS, tiny_flux_inputs, tiny_flux_transformer
from multicond.core.joint_style import JointStyle
from multicond.core.layers import DiTLayout, LayerId, LayerSelection, select_all, select_blocks
from multicond.core.style import AdaINSettings, ShareSettings, StyleAlignedArgs, token_mean_std

from .conftest import assert_close_scaled
from .paper_alignedgen import PaperAlignedGenProcessor

ROWS = 3  # the reference and two targets
TEXT = 7  # tiny_flux_inputs' text tokens
GRID = (8, 6)  # token rows x columns of the 16 x 12 latent

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=FLUX_VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def transformer(variant: str) -> FluxTransformer2DModel:
    return tiny_flux_transformer(variant, seed=1)


def inputs_for(variant: str, batch: int = ROWS, seed: int = 2, **kwargs) -> dict:
    return tiny_flux_inputs(batch, seed=seed, variant=variant, **kwargs)


def run(transformer: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs).sample


def installed(transformer: FluxTransformer2DModel, inputs: dict, *args, **kwargs) -> torch.Tensor:
    with install_style_aligned_flux(transformer, *args, **kwargs):
        return run(transformer, inputs)


def paper(transformer: FluxTransformer2DModel, inputs: dict, active: range | None = None,
          shift: int = GRID[1]) -> torch.Tensor:
    """The transformer with AlignedGen's re-stated processor on every attention (default: single blocks active)."""
    names = list(transformer.attn_processors)
    doubles = len(transformer.transformer_blocks)
    ids = inputs["img_ids"].clone()
    ids[:, 2] += shift
    rotary = transformer.pos_embed(ids)
    before = dict(transformer.attn_processors)
    active = range(doubles, len(names)) if active is None else active
    transformer.set_attn_processor({name: PaperAlignedGenProcessor(i, active, rotary, inputs["txt_ids"].shape[0])
                                    for i, name in enumerate(names)})
    try:
        return run(transformer, inputs)
    finally:
        transformer.set_attn_processor(before)


# ---------------------------------------------------------------- layout and install

def test_layout_is_read_from_the_transformer(transformer):
    assert flux_layout(transformer) == DiTLayout("flux", double=2, single=2)


def test_installs_on_the_single_blocks_by_default_and_remove_restores_exactly(transformer, variant):
    before = dict(transformer.attn_processors)
    inputs = inputs_for(variant)
    plain = run(transformer, inputs)
    handle = install_style_aligned_flux(transformer)
    assert handle.layers == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    for name, processor in transformer.attn_processors.items():
        assert isinstance(processor, FluxStyleProcessor) == name.startswith("single_")
    with pytest.raises(RuntimeError, match="already installed"):
        install_style_aligned_flux(transformer)
    assert not torch.equal(run(transformer, inputs), plain)
    handle.remove()
    assert all(transformer.attn_processors[name] is processor for name, processor in before.items())
    assert not transformer._forward_pre_hooks
    assert torch.equal(run(transformer, inputs), plain)


@pytest.mark.parametrize("spec,expected", [("double", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]),
                                           ("double.1, single.0", ["transformer_blocks.1.attn",
                                                                   "single_transformer_blocks.0.attn"])])
def test_a_block_selection_installs_only_there_and_changes_the_targets(transformer, variant, spec, expected):
    inputs = inputs_for(variant)
    plain = run(transformer, inputs)
    selection = select_blocks(flux_layout(transformer), spec)
    with install_style_aligned_flux(transformer, layers=selection) as handle:
        assert handle.layers == expected
        styled = run(transformer, inputs)
    assert torch.equal(styled[0], plain[0])
    assert all((styled[row] - plain[row]).abs().max() > 1e-4 for row in (1, 2))


def test_refusals(transformer):
    with pytest.raises(ValueError, match="only_self_level"):
        install_style_aligned_flux(transformer, StyleAlignedArgs(only_self_level=0.5))
    with pytest.raises(ValueError, match="full_attention_share"):
        install_style_aligned_flux(transformer, StyleAlignedArgs(full_attention_share=True))
    with pytest.raises(Exception, match="for sd35"):
        install_style_aligned_flux(transformer, layers=LayerSelection("sd35", frozenset()))
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        install_style_aligned_flux(torch.nn.Linear(2, 2))
    assert not any(isinstance(p, FluxStyleProcessor) for p in transformer.attn_processors.values())


# ---------------------------------------------------------------- plain when off, reference untouched

def test_nothing_enabled_is_the_plain_transformer(transformer, variant):
    inputs = inputs_for(variant, seed=3)
    styled = installed(transformer, inputs, JointStyle(None, None), layers=select_all(flux_layout(transformer)))
    assert torch.equal(styled, run(transformer, inputs))


@pytest.mark.parametrize("positions", [FluxPositions(), FluxPositions(adain_before_rope=False, shift_reference=False)])
@pytest.mark.parametrize("reference_index", [0, 2])
def test_isolated_reference_renders_as_unpatched_and_targets_change(transformer, variant, positions, reference_index):
    inputs = inputs_for(variant, seed=4)
    plain = run(transformer, inputs)
    styled = installed(transformer, inputs, JointStyle(AdaINSettings(values=True), ShareSettings(1.1, 0.2)),
                       reference_index=reference_index, layers=select_all(flux_layout(transformer)),
                       positions=positions)
    assert torch.equal(styled[reference_index], plain[reference_index])
    assert all((styled[row] - plain[row]).abs().max() > 1e-4 for row in range(ROWS) if row != reference_index)


def test_without_isolation_the_reference_changes_too(transformer, variant):
    inputs = inputs_for(variant, seed=4)
    styled = installed(transformer, inputs, isolate_reference=False)
    assert (styled[0] - run(transformer, inputs)[0]).abs().max() > 1e-5


# ---------------------------------------------------------------- AlignedGen's choices and their alternatives

@pytest.mark.parametrize("before", [True, False])
def test_adain_before_rope_gives_the_unrotated_image_qk_the_reference_statistics(transformer, before, monkeypatch):
    """At one single block: the image q/k of the targets, un-rotated, have the reference's per-channel token
    statistics when AdaIN runs before RoPE (AlignedGen), and not when it runs after."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = joint_style_flux.joint_adain

    def spy(q, k, v, image, layout, settings):
        out = original(q, k, v, image, layout, settings)
        seen.append(out[:2])
        return out

    monkeypatch.setattr(joint_style_flux, "joint_adain", spy)
    attn = transformer.single_transformer_blocks[0].attn
    ids = torch.cat([torch.zeros(TEXT, 3), tiny_flux_inputs(1)["img_ids"]])
    rotary = transformer.pos_embed(ids)
    image = slice(TEXT, len(ids))
    clock = joint_style_flux.FluxCall(FluxPositions(before), text_tokens=TEXT,
                                      reference_rotary=transformer.pos_embed(ids[image]))
    processor = FluxStyleProcessor(JointStyle(AdaINSettings(), None), clock=clock, positions=FluxPositions(before))
    with torch.no_grad():
        processor(attn, torch.randn(ROWS, len(ids), attn.query_dim, generator=torch.Generator().manual_seed(5)),
                  image_rotary_emb=rotary)
        (styled_q, styled_k), = seen
        unrotate = (rotary[0][image], -rotary[1][image])  # rotations are orthogonal: the inverse turns back
        for styled in (styled_q, styled_k):
            raw = styled[:, image] if before else joint_style_flux.rotated(styled[:, image], unrotate, attn.heads)
            mean, std = token_mean_std(raw, eps=0.0)
            matches = (torch.allclose(mean[1:], mean[:1].expand_as(mean[1:]), atol=1e-5)
                       and torch.allclose(std[1:], std[:1].expand_as(std[1:]), rtol=1e-3, atol=1e-5))
            assert matches == before


@pytest.mark.parametrize("before", [True, False])
def test_a_zero_shift_equals_the_same_positions(transformer, variant, before):
    inputs = inputs_for(variant, seed=6)
    same = installed(transformer, inputs, positions=FluxPositions(before, shift_reference=False))
    zero = installed(transformer, inputs, positions=FluxPositions(before, reference_shift=0))
    grid = installed(transformer, inputs, positions=FluxPositions(before))
    assert_close_scaled(zero, same)
    assert (grid[1:] - same[1:]).abs().max() > 1e-5


@pytest.mark.parametrize("shift", [3, GRID[1]])
def test_shifted_positions_equal_the_alignedgen_restatement(transformer, variant, shift):
    inputs = inputs_for(variant, seed=7)
    ours = installed(transformer, inputs, positions=FluxPositions(reference_shift=shift))
    assert_close_scaled(ours, paper(transformer, inputs, shift=shift), rel=1e-6)


def test_alignedgen_defaults_equal_the_restatement(transformer, variant):
    """One call with every default: single blocks, AdaIN q/k before RoPE, shift by the grid width, λ = 1.1."""
    inputs = inputs_for(variant, seed=8)
    ours = installed(transformer, inputs)
    theirs = paper(transformer, inputs)
    assert_close_scaled(ours, theirs, rel=1e-6)
    plain = run(transformer, inputs)
    assert torch.equal(ours[0], plain[0])  # constrain_first: the reference renders as unpatched, bit for bit
    assert (ours[1:] - plain[1:]).abs().max() > 1e-3


def test_all_layers_equal_the_restatement_active_everywhere(transformer, variant):
    """The double blocks' text/image split too: AlignedGen's processor active on all four attentions."""
    inputs = inputs_for(variant, seed=9)
    ours = installed(transformer, inputs, ALIGNEDGEN_STYLE, layers=select_all(flux_layout(transformer)))
    assert_close_scaled(ours, paper(transformer, inputs, active=range(4)), rel=1e-6)


def test_a_single_block_processor_without_the_hook_asks_for_the_text_length(transformer):
    attn = transformer.single_transformer_blocks[0].attn
    with pytest.raises(RuntimeError, match="text length"):
        FluxStyleProcessor(ALIGNEDGEN_STYLE)(attn, torch.randn(2, TEXT + 48, attn.query_dim))


# ---------------------------------------------------------------- batching, leaks, timesteps

@pytest.mark.parametrize("isolate", [True, False])
def test_two_chunks_together_equal_each_chunk_alone(transformer, variant, isolate):
    """True CFG batched as [uncond, cond] in one call (chunks=2) equals each chunk in its own call."""
    inputs = inputs_for(variant, batch=2 * ROWS, seed=10)
    style = JointStyle(AdaINSettings(values=True), ShareSettings(1.1, 0.3))
    together = installed(transformer, inputs, style, chunks=2, isolate_reference=isolate)
    for chunk in range(2):
        part = slice(chunk * ROWS, (chunk + 1) * ROWS)
        alone = {key: value[part] if key not in ("img_ids", "txt_ids") else value for key, value in inputs.items()}
        assert_close_scaled(together[part], installed(transformer, alone, style, isolate_reference=isolate))


def test_a_row_does_not_depend_on_the_other_targets(transformer, variant):
    inputs = inputs_for(variant, batch=2 * ROWS, seed=11)
    styled = installed(transformer, inputs, chunks=2)
    moved = {key: value.clone() for key, value in inputs.items()}
    moved["hidden_states"][2] += 1.0
    moved["encoder_hidden_states"][2] -= 1.0
    moved["hidden_states"][ROWS + 1:] *= -1
    again = installed(transformer, moved, chunks=2)
    kept = [0, 1, ROWS]
    assert_close_scaled(again[kept], styled[kept])
    assert not torch.allclose(again[2], styled[2])


def test_a_per_timestep_selection_is_keyed_by_1000_sigma(transformer, variant):
    selection = LayerSelection("flux", frozenset({LayerId("single", 0)}), "early only",
                               {1000: {LayerId("single", 0): frozenset({"q", "k", "share"})}, 200: {}})
    early, late = inputs_for(variant, seed=12, sigma=0.97), inputs_for(variant, seed=12, sigma=0.15)
    with install_style_aligned_flux(transformer, layers=selection) as handle:
        assert handle.layers == ["single_transformer_blocks.0.attn"]
        styled_early, styled_late = run(transformer, early), run(transformer, late)
    assert not torch.equal(styled_early, run(transformer, early))
    assert torch.equal(styled_late, run(transformer, late))


def test_the_hook_reads_positional_arguments_too(transformer, variant):
    """Text length, timestep and image ids by position: (hidden, context, pooled, timestep, img_ids, txt_ids)."""
    inputs = inputs_for(variant, seed=13)
    with install_style_aligned_flux(transformer):
        by_name = run(transformer, inputs)
        with torch.no_grad():
            by_position = transformer(inputs["hidden_states"], inputs["encoder_hidden_states"],
                                      inputs["pooled_projections"], inputs["timestep"], inputs["img_ids"],
                                      inputs["txt_ids"], inputs.get("guidance")).sample
    assert torch.equal(by_position, by_name)
