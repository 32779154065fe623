"""The diffusers binding of joint-attention StyleAligned on tiny random SD3/SD3.5-shaped transformers."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from multicond.core.diffusers_binding import JointStyleProcessor, dit_layout, install_style_aligned_dit
from multicond.core.diffusers_binding.tiny_dit import VARIANTS, tiny_sd3_inputs, tiny_sd3_transformer
from multicond.core.joint_style import JointStyle
from multicond.core.layers import DiTLayout, LayerId, LayerSelection, select_blocks, select_evenly_spaced
from multicond.core.style import AdaINSettings, ShareSettings, StyleAlignedArgs

from .conftest import assert_close_scaled
from .paper_cb35 import PaperCB35Processor

ROWS = 3  # images per CFG chunk: the reference and two targets

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module", params=VARIANTS)
def transformer(request: pytest.FixtureRequest) -> SD3Transformer2DModel:
    return tiny_sd3_transformer(request.param, seed=1)


def run(transformer: SD3Transformer2DModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs).sample


def installed(transformer: SD3Transformer2DModel, inputs: dict, *args, **kwargs) -> torch.Tensor:
    with install_style_aligned_dit(transformer, *args, **kwargs):
        return run(transformer, inputs)


STYLES = {
    "adain q k, share": JointStyle(),
    "adain q k v, scale 0.8, shift 0.3": JointStyle(AdaINSettings(values=True), ShareSettings(0.8, 0.3)),
    "share only": JointStyle(None, ShareSettings()),
    "adain only": JointStyle(AdaINSettings(), None),
}


# ---------------------------------------------------------------- layout and install

def test_layout_is_read_from_the_transformer(transformer):
    layout = dit_layout(transformer)
    assert layout == DiTLayout("sd3" if transformer.config.qk_norm is None else "sd35", joint=2)


def test_installs_on_the_joint_attentions_only_and_remove_restores_the_very_processors(transformer):
    before = dict(transformer.attn_processors)
    inputs = tiny_sd3_inputs(2 * ROWS)
    plain = run(transformer, inputs)
    handle = install_style_aligned_dit(transformer, JointStyle())
    after = transformer.attn_processors
    assert sorted(handle.layers) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    for name, processor in after.items():
        if name.endswith(".attn.processor"):
            assert isinstance(processor, JointStyleProcessor)
        else:  # SD3.5-M's image-only attn2 stays as it was
            assert processor is before[name]
    with pytest.raises(RuntimeError, match="already installed"):
        install_style_aligned_dit(transformer, JointStyle())
    assert not torch.equal(run(transformer, inputs), plain)
    handle.remove()
    assert all(transformer.attn_processors[name] is processor for name, processor in before.items())
    assert torch.equal(run(transformer, inputs), plain)


def test_only_self_level_picks_the_layers_evenly_spaced():
    transformer = tiny_sd3_transformer("sd35l")
    layout = dit_layout(transformer)
    with install_style_aligned_dit(transformer, StyleAlignedArgs(only_self_level=0.5)) as handle:
        expected = [layout.diffusers_path(layer) for layer in layout.layers
                    if layer in select_evenly_spaced(layout, 0.5).layers]
        assert handle.layers == expected and len(expected) == 1


def test_full_attention_share_and_a_foreign_selection_are_refused(transformer):
    with pytest.raises(ValueError, match="full_attention_share"):
        install_style_aligned_dit(transformer, StyleAlignedArgs(full_attention_share=True))
    with pytest.raises(Exception, match="for flux"):
        install_style_aligned_dit(transformer, JointStyle(), layers=LayerSelection("flux", frozenset()))
    assert not any(isinstance(p, JointStyleProcessor) for p in transformer.attn_processors.values())


# ---------------------------------------------------------------- plain when off, reference untouched

def test_nothing_enabled_is_the_plain_transformer(transformer):
    inputs = tiny_sd3_inputs(2 * ROWS, seed=2)
    assert torch.equal(installed(transformer, inputs, JointStyle(None, None)), run(transformer, inputs))


@pytest.mark.parametrize("name", list(STYLES))
@pytest.mark.parametrize("reference_index", [0, 2])
def test_isolated_references_render_as_unpatched_and_targets_change(transformer, name, reference_index):
    inputs = tiny_sd3_inputs(2 * ROWS, seed=3)
    plain = run(transformer, inputs)
    styled = installed(transformer, inputs, STYLES[name], reference_index=reference_index)
    references = [reference_index, ROWS + reference_index]
    assert torch.equal(styled[references], plain[references])
    targets = [row for row in range(2 * ROWS) if row not in references]
    assert all((styled[row] - plain[row]).abs().max() > 1e-4 for row in targets)


def test_without_isolation_the_reference_changes_too():
    """dit.md §4.1.2: in joint attention a reference attending to its own image keys twice is not a no-op."""
    transformer = tiny_sd3_transformer("sd35m")
    inputs = tiny_sd3_inputs(2 * ROWS, seed=3)
    styled = installed(transformer, inputs, JointStyle(), isolate_reference=False)
    assert (styled[[0, ROWS]] - run(transformer, inputs)[[0, ROWS]]).abs().max() > 1e-4


def test_both_streams_of_a_reference_row_are_the_plain_processors(transformer):
    """At one joint attention: the reference rows' image and text outputs equal JointAttnProcessor2_0's."""
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2 * ROWS, 48, attn.query_dim, generator=g)
    text = torch.randn(2 * ROWS, 10, attn.query_dim, generator=g)
    with torch.no_grad():
        plain_image, plain_text = JointAttnProcessor2_0()(attn, image, text)
        processor = JointStyleProcessor(JointStyle(AdaINSettings(values=True), ShareSettings(0.9, 0.2)))
        styled_image, styled_text = processor(attn, image, text)
    assert torch.equal(styled_image[[0, ROWS]], plain_image[[0, ROWS]])
    assert torch.equal(styled_text[[0, ROWS]], plain_text[[0, ROWS]])
    assert not torch.allclose(styled_text[[1, 2]], plain_text[[1, 2]])  # target text queries see the reference keys


# ---------------------------------------------------------------- batching and leaks

@pytest.mark.parametrize("isolate", [True, False])
def test_cond_and_uncond_chunks_together_equal_apart(transformer, isolate):
    inputs = tiny_sd3_inputs(2 * ROWS, seed=5)
    style = JointStyle(AdaINSettings(values=True), ShareSettings(0.8, 0.3))
    together = installed(transformer, inputs, style, isolate_reference=isolate)
    for chunk in range(2):
        part = slice(chunk * ROWS, (chunk + 1) * ROWS)
        apart = installed(transformer, {key: value[part] for key, value in inputs.items()}, style,
                          isolate_reference=isolate, chunks=1)
        assert_close_scaled(together[part], apart)


def test_a_row_does_not_depend_on_the_other_targets(transformer):
    inputs = tiny_sd3_inputs(2 * ROWS, seed=6)
    styled = installed(transformer, inputs, JointStyle(AdaINSettings(values=True), ShareSettings()))
    moved = {key: value.clone() for key, value in inputs.items()}
    moved["hidden_states"][2] += 1.0  # the other target of chunk 0
    moved["encoder_hidden_states"][2] -= 1.0
    moved["hidden_states"][ROWS + 1:] *= -1  # the targets of chunk 1
    again = installed(transformer, moved, JointStyle(AdaINSettings(values=True), ShareSettings()))
    kept = [0, 1, ROWS]
    assert_close_scaled(again[kept], styled[kept])
    assert not torch.allclose(again[2], styled[2])


# ---------------------------------------------------------------- CB35

def install_cb35(transformer: SD3Transformer2DModel, per_layer: dict[str, PaperCB35Processor]) -> dict:
    before = dict(transformer.attn_processors)
    transformer.set_attn_processor({**before, **{f"{path}.processor": p for path, p in per_layer.items()}})
    return before


@pytest.mark.parametrize("values,scale", [(False, 1.0), (True, 1.0), (True, 0.8)])
def test_cb35_layout_without_isolation_equals_the_cb35_processor(values, scale):
    """[uncond ref, uncond target, cond ref, cond target] on an SD3.5-L-like model, AdaIN q/k(/v), shared."""
    transformer = tiny_sd3_transformer("sd35l", seed=2)
    inputs = tiny_sd3_inputs(4, seed=7)
    ours = installed(transformer, inputs, StyleAlignedArgs(adain_values=values, shared_score_scale=scale),
                     isolate_reference=False)
    before = install_cb35(transformer, {f"transformer_blocks.{i}.attn": PaperCB35Processor(True, True, values, scale)
                                        for i in range(2)})
    try:
        theirs = run(transformer, inputs)
    finally:
        transformer.set_attn_processor(before)
    assert_close_scaled(ours, theirs)


def test_a_graded_selection_shares_only_where_q_and_k_are_both_chosen():
    """CB35's per-step rule: layer 0 has AdaIN on q only (so no sharing), layer 1 on q, k and v (shared)."""
    transformer = tiny_sd3_transformer("sd35l", seed=2)
    inputs = tiny_sd3_inputs(4, seed=8, sigma=0.9)
    schedule = {900: {LayerId("joint", 0): frozenset({"q", "share"}),
                      LayerId("joint", 1): frozenset({"q", "k", "v", "share"})},
                100: {}}
    selection = LayerSelection("sd35", frozenset({LayerId("joint", 0), LayerId("joint", 1)}), "graded", schedule,
                               graded_values=True)
    ours = installed(transformer, inputs, StyleAlignedArgs(), layers=selection, isolate_reference=False)
    before = install_cb35(transformer, {"transformer_blocks.0.attn": PaperCB35Processor(True, False, False),
                                        "transformer_blocks.1.attn": PaperCB35Processor(True, True, True)})
    try:
        theirs = run(transformer, inputs)
    finally:
        transformer.set_attn_processor(before)
    assert_close_scaled(ours, theirs)


def test_a_per_timestep_selection_follows_the_transformer_timestep(transformer):
    """Keys are 1000·σ, the transformer's `timestep` argument in diffusers SD3."""
    selection = LayerSelection("sd3" if transformer.config.qk_norm is None else "sd35",
                               frozenset({LayerId("joint", 0)}), "early only",
                               {1000: {LayerId("joint", 0): frozenset({"q", "k", "share"})}, 200: {}})
    early, late = tiny_sd3_inputs(2 * ROWS, seed=9, sigma=0.97), tiny_sd3_inputs(2 * ROWS, seed=9, sigma=0.15)
    with install_style_aligned_dit(transformer, JointStyle(), layers=selection) as handle:
        assert handle.layers == ["transformer_blocks.0.attn"]
        styled_early, styled_late = run(transformer, early), run(transformer, late)
        positional = transformer(early["hidden_states"], early["encoder_hidden_states"], early["pooled_projections"],
                                 early["timestep"]).sample.detach()
    assert not torch.equal(styled_early, run(transformer, early))
    assert torch.equal(positional, styled_early)  # the timestep read from a positional argument too
    assert torch.equal(styled_late, run(transformer, late))


def test_a_static_block_selection_installs_only_there():
    transformer = tiny_sd3_transformer("sd35m")
    selection = select_blocks(dit_layout(transformer), "joint.1")
    with install_style_aligned_dit(transformer, JointStyle(), layers=selection) as handle:
        assert handle.layers == ["transformer_blocks.1.attn"]
