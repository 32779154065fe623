"""BatchPrompts in a real ComfyUI: comfy's own tiny-configured SD1.5 / SDXL text encoders, tiny UNets."""

from __future__ import annotations

import asyncio

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import nodes as comfy_nodes  # noqa: E402  - ComfyUI's nodes.py (CLIPTextEncode)
import torch  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.nodes.extension import MultiCondExtension  # noqa: E402
from multicond.nodes.prompts import BatchPrompts  # noqa: E402

from . import tiny  # noqa: E402
from .tiny_pack import BASE_FAMILIES, build_clip, build_model, model_config  # noqa: E402

PROMPTS = ["a toy train", "a toy airplane", "a toy bicycle"]
STYLE = "in minimal origami style"
LONG = "a toy boat " + "with many small colourful flags " * 15  # > 75 tokens: two chunks, 154 tokens


@pytest.fixture(scope="module", params=BASE_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def clip(family):
    return build_clip(model_config(family), family, seed=0)


@pytest.fixture(scope="module")
def model(family):
    return build_model(model_config(family), seed=0)


def batch_prompts(clip, prompts: str, batch_size: int = 0, style: str = "") -> list:
    return BatchPrompts.execute(clip, prompts, batch_size, style).args[0]


def text_encode(clip, text: str) -> list:
    """ComfyUI's own CLIPTextEncode."""
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def test_row_i_is_line_i_encoded_alone(clip):
    ((cond, extra),) = batch_prompts(clip, "\n".join(PROMPTS[:2]) + "\n\n   \n" + PROMPTS[2] + "\n", style=STYLE)
    assert cond.shape[0] == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ((alone, alone_extra),) = text_encode(clip, f"{prompt}, {STYLE}")
        assert torch.equal(cond[i:i + 1], alone)
        assert set(extra) == set(alone_extra)
        assert torch.equal(extra["pooled_output"][i:i + 1], alone_extra["pooled_output"])
    assert not torch.equal(cond[0], cond[1]) and not torch.equal(cond[1], cond[2])


def test_sdxl_pooled_output_is_batched():
    clip = build_clip(model_config("sdxl"), "sdxl", seed=0)
    ((cond, extra),) = batch_prompts(clip, "\n".join(PROMPTS))
    assert cond.shape[0] == 3 and extra["pooled_output"].shape == (3, 1280)


def test_without_style_the_lines_are_encoded_as_written(clip):
    ((cond, _),) = batch_prompts(clip, "\n".join(PROMPTS), style="   ")
    assert torch.equal(cond[1:2], text_encode(clip, PROMPTS[1])[0][0])


def test_batch_size_repeats_the_lines_cyclically(clip):
    ((cond, extra),) = batch_prompts(clip, "a toy train\na toy car", batch_size=5)
    assert cond.shape[0] == 5 and extra["pooled_output"].shape[0] == 5
    for i in range(5):
        assert torch.equal(cond[i], cond[i % 2])
    assert not torch.equal(cond[0], cond[1])


def test_prompts_of_different_lengths_pad_by_repeating_the_shorter(clip):
    ((cond, _),) = batch_prompts(clip, f"{PROMPTS[0]}\n{LONG}")
    ((short, _),) = text_encode(clip, PROMPTS[0])
    ((long, _),) = text_encode(clip, LONG)
    assert short.shape[1] == 77 and long.shape[1] == 154
    assert torch.equal(cond[0:1], short.repeat(1, 2, 1)) and torch.equal(cond[1:2], long)


def sample(model, family: str, batch: int, positive: list, negative: list):
    # The tiny random UNet barely reads its context (near-uniform cross-attention): CFG 50 lifts a
    # prompt's effect on the latent (~1e-2 of ~300) far above float noise.
    return tiny.sample(model, family, batch=batch, cfg=50.0, positive=positive, negative=negative)


def assert_follows(row: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> None:
    """`row` is the run with its own prompt, up to float noise far below another prompt's effect."""
    assert (row - own).abs().max() < (row - other).abs().max() / 20


def test_each_image_samples_its_own_prompt(clip, model, family):
    """Row i of one batched run is row i of a run where the whole batch has prompt i (same noise per row)."""
    negative = text_encode(clip, "")
    batched = sample(model, family, 3, batch_prompts(clip, "\n".join(PROMPTS)), negative)
    alone = [sample(model, family, 3, text_encode(clip, prompt), negative) for prompt in PROMPTS]
    for i in range(3):
        assert_follows(batched[i], alone[i][i], alone[(i + 1) % 3][i])


def test_a_padded_prompt_samples_as_alone(clip, model, family):
    """Repeating the shorter prompt's tokens to the longer one's length does not change what it generates."""
    negative = text_encode(clip, "")
    batched = sample(model, family, 2, batch_prompts(clip, f"{PROMPTS[0]}\n{LONG}"), negative)
    short = sample(model, family, 2, text_encode(clip, PROMPTS[0]), negative)
    long = sample(model, family, 2, text_encode(clip, LONG), negative)
    assert_follows(batched[0], short[0], long[0])
    assert_follows(batched[1], long[1], short[1])


@pytest.mark.parametrize("prompts", ["", "\n  \n\t\n"])
def test_no_prompt_is_an_error(clip, prompts):
    with pytest.raises(InputError) as error:
        batch_prompts(clip, prompts, style=STYLE)
    assert error.value.input_name == "prompts"


def test_fewer_images_than_prompts_is_an_error(clip):
    with pytest.raises(InputError) as error:
        batch_prompts(clip, "\n".join(PROMPTS), batch_size=2)
    assert error.value.input_name == "batch_size" and "3" in error.value.fix


def test_padding_far_past_the_longest_prompt_is_an_error(clip):
    five_chunks, six_chunks = "cat " * 320, "cat " * 400  # 385 and 462 tokens: LCM 2310, 5x the longest
    with pytest.raises(InputError) as error:
        batch_prompts(clip, f"{five_chunks}\n{six_chunks}")
    assert error.value.input_name == "prompts"


def test_no_clip_is_an_error():
    with pytest.raises(InputError) as error:
        batch_prompts(None, "\n".join(PROMPTS))
    assert error.value.input_name == "clip"


def test_node_is_registered_with_tooltips():
    assert BatchPrompts in asyncio.run(MultiCondExtension().get_node_list())
    schema = BatchPrompts.define_schema()
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert "line 1" in schema.description and "batch_size" in schema.description
