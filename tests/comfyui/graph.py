"""Call ComfyUI nodes as a graph would: the node's own defaults for every input not given.

Works for V3 nodes (`define_schema` + `execute`) and V1 nodes (`INPUT_TYPES` + `FUNCTION`), so a
test can chain this pack's nodes with core nodes whichever API the host version gives them.
"""

from __future__ import annotations

from typing import Any

import torch


def _defaults_v1(node: type) -> dict[str, Any]:
    spec = node.INPUT_TYPES()
    defaults = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if "default" in options:
                defaults[name] = options["default"]
            elif isinstance(entry[0], list) and entry[0]:
                defaults[name] = entry[0][0]
    return defaults


def _defaults_v3(node: type) -> dict[str, Any]:
    defaults = {}
    for item in node.define_schema().inputs:
        default = getattr(item, "default", None)
        if default is not None:
            defaults[item.id] = default
        elif getattr(item, "options", None):
            defaults[item.id] = item.options[0]
    return defaults


def call(node: type, **inputs: Any) -> tuple:
    """The node's outputs for `inputs`, every other widget at its default, inside inference_mode as ComfyUI runs it."""
    with torch.inference_mode():
        if hasattr(node, "define_schema"):
            return tuple(node.execute(**{**_defaults_v3(node), **inputs}).args)
        result = getattr(node(), node.FUNCTION)(**{**_defaults_v1(node), **inputs})
    return tuple(result.args) if hasattr(result, "args") else tuple(result)
