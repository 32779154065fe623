"""What users type in the node search finds the pack's nodes: display names, and search aliases where the host has them."""

from __future__ import annotations

import pytest

from .comfy_host import find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

from comfy_api.latest import io  # noqa: E402

from multicond.nodes.extension import MultiCondExtension  # noqa: E402

# What users of the peer packs search for, and the node each should find.
QUERIES = {"controlnet mask": "MultiCond_MaskedAdapter", "t2i adapter": "MultiCond_MaskedAdapter",
           "style transfer": "MultiCond_SharedAttention", "regional": "MultiCond_EpsilonBlend",
           "layout": "MultiCond_SpatialGuidance", "conditional balance": "MultiCond_LayerBalance"}
HOST_HAS_ALIASES = "search_aliases" in io.Schema.__dataclass_fields__


@pytest.fixture(scope="module")
def schemas() -> dict[str, io.Schema]:
    import asyncio

    nodes = asyncio.run(MultiCondExtension().get_node_list())
    return {schema.node_id: schema for schema in (node.define_schema() for node in nodes)}


@pytest.mark.parametrize("query", list(QUERIES))
def test_each_query_finds_its_node(schemas, query):
    schema = schemas[QUERIES[query]]
    searchable = [schema.display_name.lower(), *(getattr(schema, "search_aliases", None) or [])]
    if HOST_HAS_ALIASES:
        assert any(query in text for text in searchable)
    else:  # older hosts search display names and descriptions only
        assert all(word in (schema.display_name + " " + schema.description).lower() for word in query.split())


def test_the_masked_control_node_says_controlnet_in_its_name(schemas):
    assert "ControlNet" in schemas["MultiCond_MaskedAdapter"].display_name


@pytest.mark.skipif(not HOST_HAS_ALIASES, reason="this host's node info has no search aliases")
def test_aliases_reach_the_frontends_node_info(schemas):
    from multicond.nodes.adapter import MaskedAdapter

    info = MaskedAdapter.GET_NODE_INFO_V1()
    assert "controlnet mask" in info["search_aliases"]
