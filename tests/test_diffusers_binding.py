"""The diffusers binding of StyleAligned on tiny random SD1.5- and SDXL-shaped UNets.

The binding must give the same outputs as the paper's formulation (`paper_style_aligned`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from multicond.core.diffusers_binding import (StyleAlignedProcessor, install_style_aligned, shared_layers, tiny_unet,
                                              unet_layout)
from multicond.core.layers import SD1, SDXL, LayerSelection
from multicond.core.style import StyleAlignedArgs

from .conftest import assert_close_scaled
from .paper_style_aligned import paper_shared_names, paper_unet

FAMILIES = ("sd1", "sdxl")
ROWS = 3  # images per CFG half: the reference and two targets


pytestmark = pytest.mark.usefixtures("one_cpu_thread")



# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module", params=FAMILIES)
def unet(request: pytest.FixtureRequest) -> UNet2DConditionModel:
    return tiny_unet(request.param, seed=1)


def unet_inputs(unet: UNet2DConditionModel, seed: int = 0) -> tuple[torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(seed)
    batch = 2 * ROWS
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    kwargs: dict = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)}
    return latents, kwargs


def run_unet(unet: UNet2DConditionModel, seed: int = 0, timestep: int = 501) -> torch.Tensor:
    latents, kwargs = unet_inputs(unet, seed)
    with torch.no_grad():
        return unet(latents, timestep, **kwargs).sample


# ---------------------------------------------------------------- (a) the paper's numbers

ARGS = {
    "defaults": StyleAlignedArgs(),
    "shift log 2, scale 0.5": StyleAlignedArgs(shared_score_shift=math.log(2), shared_score_scale=0.5),
    "adain values": StyleAlignedArgs(adain_values=True),
    "full attention share": StyleAlignedArgs(full_attention_share=True),
    "only self level 0.25": StyleAlignedArgs(only_self_level=0.25),
    "no group norm": StyleAlignedArgs(share_group_norm=False),
}


@pytest.mark.parametrize("name", list(ARGS))
def test_unet_output_equals_the_paper_formulation(unet: UNet2DConditionModel, name: str) -> None:
    args = ARGS[name]
    expected = run_unet(paper_unet(unet, args))
    plain = run_unet(unet)
    with install_style_aligned(unet, args):
        ours = run_unet(unet)
    # rel 1e-4: another formulation (explicit logits, 2N keys) through the whole UNet, not only another order.
    assert_close_scaled(ours, expected, rel=1e-4)
    assert (ours - plain).abs().max() > 1e-3, "the settings must change the output, or the comparison proves nothing"


def test_reference_rows_keep_their_plain_output(unet: UNet2DConditionModel) -> None:
    plain = run_unet(unet)
    with install_style_aligned(unet, StyleAlignedArgs(shared_score_shift=math.log(2), shared_score_scale=0.5)):
        ours = run_unet(unet)
    references = [0, ROWS]
    # Not bitwise: the reference rows take the shared attention and GroupNorm paths (joined with themselves).
    assert_close_scaled(ours[references], plain[references], rel=1e-4)
    targets = [r for r in range(2 * ROWS) if r not in references]
    assert (ours[targets] - plain[targets]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_reference_index_and_chunk_count_move_the_reference(unet: UNet2DConditionModel) -> None:
    """Three chunks of two, reference at index 1: rows 1, 3, 5 keep their plain output."""
    plain = run_unet(unet)
    with install_style_aligned(unet, StyleAlignedArgs(), chunks=3, reference_index=1):
        ours = run_unet(unet)
    assert_close_scaled(ours[[1, 3, 5]], plain[[1, 3, 5]], rel=1e-4)
    assert (ours[[0, 2, 4]] - plain[[0, 2, 4]]).abs().max() > 1e-3


# ---------------------------------------------------------------- (b) which layers

def _real_unet(family: str) -> UNet2DConditionModel:
    """The real SD1.5 / SDXL UNet shapes, on the meta device (no memory, no weights)."""
    if family == "sd1":
        config = dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                      cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    else:
        config = dict(layers_per_block=2, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    with init_empty_weights():
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_shapes_give_the_core_layouts(family: str) -> None:
    layout = unet_layout(_real_unet(family))
    assert layout == (SD1 if family == "sd1" else SDXL)
    assert len(layout.layers) == (16 if family == "sd1" else 70)


@pytest.mark.parametrize("source", ["tiny sd1", "tiny sdxl", "real sd1", "real sdxl"])
@pytest.mark.parametrize("level", [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_layer_choice_is_the_papers(source: str, level: float) -> None:
    kind, family = source.split()
    model = tiny_unet(family) if kind == "tiny" else _real_unet(family)
    assert shared_layers(model, level) == paper_shared_names(model, level)


def test_sdxl_quarter_level_leaves_18_layers_unshared() -> None:
    assert len(shared_layers(_real_unet("sdxl"), 0.25)) == 70 - 18


def test_installs_on_exactly_the_chosen_layers_and_keeps_the_rest(unet: UNet2DConditionModel) -> None:
    before = dict(unet.attn_processors)
    with install_style_aligned(unet, StyleAlignedArgs(only_self_level=0.25)):
        chosen = set(shared_layers(unet, 0.25))
        for name, processor in unet.attn_processors.items():
            if name.removesuffix(".processor") in chosen:
                assert isinstance(processor, StyleAlignedProcessor)
            else:
                assert processor is before[name]


# ---------------------------------------------------------------- (c) removal

@pytest.mark.parametrize("args", [StyleAlignedArgs(), StyleAlignedArgs(full_attention_share=True)])
def test_remove_restores_bit_identical_outputs(unet: UNet2DConditionModel, args: StyleAlignedArgs) -> None:
    before_processors = dict(unet.attn_processors)
    before = run_unet(unet)
    handle = install_style_aligned(unet, args)
    assert not torch.equal(run_unet(unet), before)
    handle.remove()
    assert torch.equal(run_unet(unet), before)
    assert all(unet.attn_processors[name] is p for name, p in before_processors.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    handle.remove()  # a second remove is harmless


def test_installing_twice_is_refused(unet: UNet2DConditionModel) -> None:
    with install_style_aligned(unet):
        with pytest.raises(RuntimeError, match="already installed"):
            install_style_aligned(unet)
    with install_style_aligned(unet):  # and allowed again once removed
        pass


def test_a_batch_without_room_for_the_chunks_is_an_error(unet: UNet2DConditionModel) -> None:
    with install_style_aligned(unet, chunks=4):
        with pytest.raises(ValueError, match="cannot be split into 4"):
            run_unet(unet)


def test_a_per_timestep_selection_follows_the_unet_timestep(unet: UNet2DConditionModel) -> None:
    layout = unet_layout(unet)
    early, late = frozenset(layout.layers[:2]), frozenset(layout.layers[-3:])
    features = frozenset({"q", "k", "share"})
    schedule = {900: {layer: features for layer in early}, 100: {layer: features for layer in late}}
    graded = LayerSelection(layout.family, early | late, schedule=schedule)
    args = StyleAlignedArgs(share_group_norm=False)
    plain = run_unet(unet, timestep=51)
    for timestep, chosen in ((951, early), (51, late)):
        with install_style_aligned(unet, args, layers=graded):
            per_step = run_unet(unet, timestep=timestep)
        with install_style_aligned(unet, args, layers=LayerSelection(layout.family, chosen)):
            static = run_unet(unet, timestep=timestep)
        assert torch.equal(per_step, static)
    assert not torch.allclose(per_step, plain)
    assert torch.equal(run_unet(unet, timestep=51), plain)  # the clock hook went with the handle


def test_a_graded_selection_shares_no_group_norm(unet: UNet2DConditionModel) -> None:
    """Conditional Balance never shares GroupNorm (FALSE_SA_ARGS): the paper defaults plus a grading equal no sharing."""
    layout = unet_layout(unet)
    schedule = {900: {layer: frozenset({"q", "k", "share"}) for layer in layout.layers[:3]}}
    graded = LayerSelection(layout.family, frozenset(layout.layers[:3]), schedule=schedule, group_norm=False)
    with install_style_aligned(unet, StyleAlignedArgs(), layers=graded):
        defaults = run_unet(unet, timestep=951)
    with install_style_aligned(unet, StyleAlignedArgs(share_group_norm=False), layers=graded):
        without = run_unet(unet, timestep=951)
    with install_style_aligned(unet, StyleAlignedArgs(), layers=replace(graded, group_norm=None)):
        shared = run_unet(unet, timestep=951)
    assert torch.equal(defaults, without) and not torch.allclose(defaults, shared)
