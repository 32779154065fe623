"""No silent no-op: a node that cannot act says so, and bad widget values are refused with the node, input and fix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import torch  # noqa: E402
from comfy_api.latest import io  # noqa: E402

from multicond.core.errors import InputError  # noqa: E402
from multicond.nodes.adapter import MaskedAdapter  # noqa: E402
from multicond.nodes.blend import EpsilonBlend  # noqa: E402
from multicond.nodes.extension import MultiCondExtension  # noqa: E402
from multicond.nodes.spatial import SpatialGuidance  # noqa: E402
from multicond.nodes.style import AdaINStyle, SharedAttention  # noqa: E402

from . import tiny  # noqa: E402
from .graph import call  # noqa: E402
from .tiny_pack import TinyCheckpoint  # noqa: E402



def pack_nodes() -> list[type[io.ComfyNode]]:
    import asyncio

    return asyncio.run(MultiCondExtension().get_node_list())


def connections(node: type[io.ComfyNode]) -> dict[str, None]:
    """Every required input that is a wire, not a widget: None is enough to reach the widget checks."""
    return {spec.id: None for spec in node.define_schema().inputs if not hasattr(spec, "default") and not spec.optional}


def widgets(kind: type) -> list[tuple[type, str]]:
    return [(node, spec.id) for node in pack_nodes() for spec in node.define_schema().inputs
            if isinstance(spec, kind) and (kind is not io.Combo.Input or spec.options)]


@pytest.mark.parametrize("node,name", widgets(io.Combo.Input), ids=lambda value: getattr(value, "__name__", value))
def test_an_option_not_in_the_list_names_the_node_the_input_and_the_options(node, name):
    """ComfyUI 0.3.64 does not check V3 option lists; an old workflow or an API call can send anything."""
    options = next(spec.options for spec in node.define_schema().inputs if spec.id == name)
    with pytest.raises(InputError, match=rf"{node.define_schema().node_id}: input '{name}': 'diagonal' is not an option"
                                         rf"\. Choose one of \[{repr(options[0])[:12]}"):
        call(node, **connections(node), **{name: "diagonal"})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("node,name", widgets(io.Float.Input), ids=lambda value: getattr(value, "__name__", value))
def test_a_number_that_is_not_finite_is_refused(node, name, value):
    """NaN passes every range check a host makes (no comparison with NaN is true)."""
    with pytest.raises(InputError, match=rf"{node.define_schema().node_id}: input '{name}': {value!r} is not a finite"):
        call(node, **connections(node), **{name: value})


@pytest.mark.parametrize("text", ["nan", "1, inf", "-inf"])
def test_level_strengths_must_be_finite(text):
    with pytest.raises(InputError, match="MultiCond_MaskedAdapter: input 'level_strengths'.*finite, non-negative"):
        call(MaskedAdapter, positive=[], negative=[], mask=torch.ones(8, 8), level_strengths=text)


def titled(node: type[io.ComfyNode], number: str, title: str) -> type[io.ComfyNode]:
    """The node class as the executor hands it over: its id in the graph and the graph, with the node's title."""
    hidden = SimpleNamespace(unique_id=number, prompt={number: {"class_type": node.__name__, "_meta": {"title": title}}})
    return type(node.__name__, (node,), {"hidden": hidden})


def test_epsilon_blend_without_its_positive_at_the_sampler_says_so_with_title_and_id():
    """The likeliest wiring mistake: only the MODEL output connected, the sampler's positive from CLIP Text Encode."""
    model = tiny.build("sd15")
    first, second = tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 3)
    patched, positive = call(titled(EpsilonBlend, "12", "Blend left/right"), model=model, first=first, second=second)
    message = r"MultiCond_EpsilonBlend 'Blend left/right' \(#12\): input 'positive': the sampler's positive is not"
    with pytest.raises(InputError, match=message):
        tiny.sample(patched, positive=first)
    assert torch.isfinite(tiny.sample(patched, positive=positive)).all()


def test_spatial_guidance_works_from_the_model_alone():
    """The node's positive output or any encoding of the same text: the same guided image."""
    with torch.inference_mode():
        model, clip, _ = TinyCheckpoint().load("sd15", 0)
        plain = clip.encode_from_tokens_scheduled(clip.tokenize("a cat to the left of a dog"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    patched, own = call(SpatialGuidance, model=model, clip=clip, weight=100000.0)
    guided = tiny.sample(patched, positive=plain, negative=negative, batch=2)
    assert torch.equal(guided, tiny.sample(patched, positive=own, negative=negative, batch=2))
    assert (guided - tiny.sample(model, positive=plain, negative=negative, batch=2)).abs().max() > 1e-2


def test_style_nodes_that_would_change_nothing_say_so():
    model = tiny.build("sd15")
    with pytest.raises(InputError, match="MultiCond_AdaINStyle: input 'queries': queries, keys and values are all off"):
        call(AdaINStyle, model=model, queries=False, keys=False, values=False)
    with pytest.raises(InputError, match="MultiCond_SharedAttention: input 'share_attention'.*would change nothing"):
        call(SharedAttention, model=model, share_attention=False, full_attention_share=False, share_group_norm=False)


def test_an_error_while_sampling_names_the_title_and_id():
    """Errors raised inside the sampler name the node that set the patch up, not only its type."""
    model = tiny.build("sd15")
    (patched,) = call(titled(SharedAttention, "7", "Style batch"), model=model)
    with pytest.raises(InputError, match=r"MultiCond_SharedAttention 'Style batch' \(#7\): input 'latent batch'"):
        tiny.sample(patched, batch=1)
