"""Layer ids, their diffusers names, and the layer selections."""

from __future__ import annotations

import pytest
import torch

from multicond.core.errors import InputError
from multicond.core.layers import SD1, SDXL, LayerId, select_blocks, select_evenly_spaced, switch_vector


def original_switch_vec(total: int, level: float) -> torch.Tensor:
    """StyleAligned's `_get_switch_vec`, restated with tensors."""
    if level == 0:
        return torch.zeros(total, dtype=torch.bool)
    if level == 1:
        return torch.ones(total, dtype=torch.bool)
    flip = level > 0.5
    level = 1 - level if flip else level
    vec = torch.arange(total) % (total // int(level * total)) == 0
    return ~vec if flip else vec


def test_layer_counts():
    assert len(SD1.layers) == 16 and len(SDXL.layers) == 70
    assert len(set(SDXL.layers)) == 70


def test_sdxl_order_and_names_follow_diffusers():
    paths = [SDXL.diffusers_path(layer) for layer in SDXL.layers]
    prefixes = [p.split(".attentions")[0] if "attentions" in p else p for p in paths]
    runs = [(prefix, sum(1 for p in prefixes if p == prefix)) for prefix in dict.fromkeys(prefixes)]
    assert runs == [("down_blocks.1", 4), ("down_blocks.2", 20), ("up_blocks.0", 30), ("up_blocks.1", 6), ("mid_block", 10)]
    assert SDXL.diffusers_path(LayerId("input", 4, 1)) == "down_blocks.1.attentions.0.transformer_blocks.1.attn1"
    assert SDXL.diffusers_path(LayerId("input", 8, 9)) == "down_blocks.2.attentions.1.transformer_blocks.9.attn1"
    assert SDXL.diffusers_path(LayerId("output", 5, 0)) == "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
    assert SDXL.diffusers_path(LayerId("middle", 0, 3)) == "mid_block.attentions.0.transformer_blocks.3.attn1"
    for layer in SDXL.layers:
        assert SDXL.layer_from_diffusers_path(SDXL.diffusers_path(layer) + ".processor") == layer


def test_sd1_blocks_map_as_comfyui_numbers_them():
    inputs = sorted({layer.number for layer in SD1.layers if layer.block == "input"})
    outputs = sorted({layer.number for layer in SD1.layers if layer.block == "output"})
    assert inputs == [1, 2, 4, 5, 7, 8] and outputs == list(range(3, 12))
    assert SD1.diffusers_path(LayerId("output", 9, 0)).startswith("up_blocks.3.attentions.0.")
    assert SD1.diffusers_path(LayerId("input", 2, 0)).startswith("down_blocks.0.attentions.1.")


@pytest.mark.parametrize("level", [0.0, 0.1, 0.25, 0.43, 0.5, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("layout", [SD1, SDXL])
def test_evenly_spaced_equals_original_switch_vec(level, layout):
    total = len(layout.layers)
    expected = original_switch_vec(total, level).tolist()
    assert switch_vector(total, level) == expected
    shared = select_evenly_spaced(layout, level).layers
    assert shared == {layer for layer, off in zip(layout.layers, expected) if not off}


def test_paper_example_sdxl_quarter():
    assert sum(switch_vector(70, 0.25)) == 18


def test_block_list():
    selection = select_blocks(SDXL, "output.1, input.8:0-3")
    assert len(selection.layers) == 10 + 4
    assert LayerId("input", 8, 3) in selection.layers and LayerId("input", 8, 4) not in selection.layers
    assert len(select_blocks(SDXL, "middle").layers) == 10


@pytest.mark.parametrize("spec,fragment", [("output.99", "names no self-attention layer"), ("outputs.1", "cannot parse"), (" , ", "empty")])
def test_block_list_errors_name_node_and_input(spec, fragment):
    with pytest.raises(InputError) as error:
        select_blocks(SDXL, spec, node="LayerBalance", input_name="blocks")
    assert fragment in str(error.value) and str(error.value).startswith("LayerBalance: input 'blocks'")


def test_selection_for_another_architecture_is_refused():
    selection = select_evenly_spaced(SD1, 0.0)
    with pytest.raises(InputError, match="for sd1 but the model is sdxl"):
        selection.check(SDXL, "SharedAttention")


def test_static_selection_gives_every_feature_on_its_layers_only():
    selection = select_blocks(SDXL, "output.1")
    assert selection.features(LayerId("output", 1, 0), 500.0) == {"q", "k", "v", "share"}
    assert selection.features(LayerId("output", 2, 0), 500.0) == frozenset()
    assert not selection.per_timestep


def test_selection_chart_rows_are_layers_and_colours_are_features():
    from multicond.core.layers import LayerSelection, selection_chart

    layers = SDXL.layers[:3]
    schedule = {900: {layers[0]: frozenset({"q", "k", "share"})}, 100: {layers[1]: frozenset({"v"}), layers[2]: frozenset({"share"})}}
    chart = selection_chart(LayerSelection("sdxl", frozenset(layers), schedule=schedule), layers, [900, 100], cell=2)
    assert chart.shape == (6, 4, 3)
    assert chart[0, 0].tolist() == [1.0, 0.0, 1.0] and chart[0, 2].tolist() == [0.0, 0.0, 0.0]
    assert chart[2, 2].tolist() == [0.0, 1.0, 0.0] and chart[4, 3].tolist() == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------- DiT layouts

def test_dit_layer_ids_and_diffusers_paths():
    from multicond.core.layers import FLUX1, SD35_LARGE, DiTLayout

    assert len(SD35_LARGE.layers) == 38 and SD35_LARGE.layers[0] == LayerId("joint", 0, 0)
    assert SD35_LARGE.diffusers_path(LayerId("joint", 37)) == "transformer_blocks.37.attn"
    assert len(FLUX1.layers) == 57 and [layer.block for layer in FLUX1.layers[18:20]] == ["double", "single"]
    assert FLUX1.diffusers_path(LayerId("double", 3)) == "transformer_blocks.3.attn"
    assert FLUX1.diffusers_path(LayerId("single", 0)) == "single_transformer_blocks.0.attn"
    for layout in (SD35_LARGE, FLUX1):
        for layer in layout.layers:
            assert layout.layer_from_diffusers_path(layout.diffusers_path(layer) + ".processor") == layer
    with pytest.raises(KeyError):
        SD35_LARGE.layer_from_diffusers_path("transformer_blocks.0.attn2.processor")
    with pytest.raises(ValueError):
        SD35_LARGE.diffusers_path(LayerId("joint", 38))
    with pytest.raises(ValueError):
        DiTLayout("sd35", double=2)
    with pytest.raises(ValueError):
        LayerId("joint", 1, 2)


def test_dit_layer_ids_print_and_parse():
    layer = LayerId("single", 7)
    assert str(layer) == "single.7" and LayerId.parse("single.7") == layer == LayerId.parse("single.7.0")
    assert LayerId.parse("output.1.2") == LayerId("output", 1, 2)


@pytest.mark.parametrize("host,family,expected", [
    ("comfyui", "sd3", (10, 58)), ("comfyui", "sd35", (10, 58)), ("comfyui", "flux", (10, 58)),
    ("diffusers", "sd3", (0, 48)), ("diffusers", "sd35", (0, 48)), ("diffusers", "flux", (10, 58)),
])
def test_token_order_per_host_and_image_span(host, family, expected):
    from multicond.core.layers import DiTLayout

    layout = DiTLayout(family, **({"double": 1, "single": 1} if family == "flux" else {"joint": 2}))
    image = layout.image_tokens((2, 16, 16, 12))  # dit.md §5.1: a 16x12 latent is 48 image tokens
    assert image == 48
    assert layout.image_span(host, 58, image) == expected
    assert layout.token_order(host) == ("image_first" if host == "diffusers" and family != "flux" else "text_first")


def test_image_tokens_pad_odd_latents_and_kontext_tokens_follow_the_image():
    from multicond.core.layers import FLUX1, image_token_count

    assert image_token_count(15, 9) == 8 * 5
    assert FLUX1.image_span("comfyui", 10 + 48 + 20, 48, extra_tokens=20) == (10, 58)
    with pytest.raises(ValueError):
        FLUX1.image_span("comfyui", 40, 48)


def test_dit_block_lists_and_selections():
    from multicond.core.layers import FLUX1, SD35_LARGE, select_all, select_blocks

    assert select_blocks(SD35_LARGE, "joint").layers == frozenset(SD35_LARGE.layers)
    assert select_blocks(SD35_LARGE, "joint.3, joint.5").layers == {LayerId("joint", 3), LayerId("joint", 5)}
    assert select_blocks(FLUX1, "single").layers == {layer for layer in FLUX1.layers if layer.block == "single"}
    assert select_blocks(FLUX1, "double, single.0").layers == {layer for layer in FLUX1.layers[:20]}
    assert len(select_evenly_spaced(FLUX1, 0.25).layers) == 57 - sum(switch_vector(57, 0.25))
    select_all(FLUX1).check(FLUX1, "SharedAttention")
    with pytest.raises(InputError, match="names no self-attention layer.*joint.0-joint.37"):
        select_blocks(SD35_LARGE, "joint.40")
    with pytest.raises(InputError, match="names no self-attention layer"):
        select_blocks(SD35_LARGE, "single")
    with pytest.raises(InputError, match="for sd35 but the model is flux"):
        select_all(SD35_LARGE).check(FLUX1, "SharedAttention")
    with pytest.raises(InputError, match="joint.30 are not in this model"):
        select_blocks(SD35_LARGE, "joint.30").check(type(SD35_LARGE)("sd35", joint=24), "SharedAttention")
    with pytest.raises(InputError, match="for sdxl but the model is sd35"):
        select_all(SDXL).check(SD35_LARGE, "SharedAttention")
