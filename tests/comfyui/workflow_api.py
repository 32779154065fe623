"""Convert a UI-format ComfyUI workflow (what the frontend saves) into the API format `/prompt` runs.

The frontend does this in `graphToPrompt`; the server cannot. The rules reproduced here, for the
node kinds a plain workflow uses (no subgraphs, reroutes, primitives or bypassed nodes):

* The node's widgets are its inputs that the frontend draws as widgets, in `/object_info`'s
  `input_order` (required, then optional). `widgets_values` holds one value per widget, in that
  order, plus values of frontend-only widgets: the "control_after_generate" combo after an input
  that asks for it (KSampler's seed) and the "upload" button of an image or video upload combo.
  A count that does not match raises, rather than shifting values into the wrong inputs.
* A linked input becomes `[source node id, source output slot]`, looked up in the `links` table.
* Frontend-only nodes (notes) are dropped.
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY_NODES = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload")  # one "upload" value each; audio and remote combos add more
SKIP = None  # marks a frontend-only widget's position in widgets_values


class WorkflowError(ValueError):
    """A workflow this converter cannot turn into an API graph."""


def input_specs(info: dict) -> dict[str, tuple[Any, dict]]:
    """name -> (type, options) for the required and optional inputs of one /object_info entry."""
    specs: dict[str, tuple[Any, dict]] = {}
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return specs


def ordered_inputs(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return [name for section in ("required", "optional") for name in order.get(section, [])]


def is_widget(kind: Any, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_layout(info: dict) -> list[str | None]:
    """The input name behind each position of `widgets_values`; SKIP for frontend-only widgets."""
    specs = input_specs(info)
    layout: list[str | None] = []
    for name in ordered_inputs(info):
        kind, options = specs[name]
        if not is_widget(kind, options):
            continue
        layout.append(name)
        if options.get("control_after_generate"):
            layout.append(SKIP)
        if any(options.get(flag) for flag in UPLOAD_OPTIONS):
            layout.append(SKIP)
    return layout


def widget_default(kind: Any, options: dict) -> Any:
    """The value a fresh widget starts with in the frontend."""
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, list) else options.get("options")
    if choices:
        return choices[0]
    return {"INT": options.get("min", 0), "FLOAT": options.get("min", 0.0), "BOOLEAN": False}.get(kind, "")


def widget_inputs(node: dict, info: dict) -> dict[str, Any]:
    """The node's widget values by input name, without frontend-only values.

    A node saved without `widgets_values` (older templates do that) keeps its widgets' defaults, and so
    do widgets added after the workflow was saved (the frontend fills values by position): an input
    appended to a node keeps old workflows loading.
    """
    layout = widget_layout(info)
    specs = input_specs(info)
    values = node.get("widgets_values", [])
    if isinstance(values, dict) or len(values) > len(layout):
        raise WorkflowError(f"node {node['id']} ({node['type']}): widgets_values {values!r} does not match the "
                            f"{len(layout)} widgets {layout} (None = frontend-only)")
    given = dict(zip(layout, values))
    return {name: given[name] if name in given else widget_default(*specs[name]) for name in layout if name is not SKIP}


def link_table(workflow: dict) -> dict[int, tuple[int, int]]:
    """link id -> (source node id, source output slot)."""
    return {link[0]: (link[1], link[2]) for link in workflow.get("links", [])}


def linked_inputs(node: dict, links: dict[int, tuple[int, int]]) -> dict[str, list]:
    result: dict[str, list] = {}
    for slot in node.get("inputs", []):
        link = slot.get("link")
        if link is None:
            continue
        source, output = links[link]
        result[slot["name"]] = [str(source), output]
    return result


def convert_node(node: dict, info: dict, links: dict[int, tuple[int, int]]) -> dict:
    if node.get("mode", 0) != 0:
        raise WorkflowError(f"node {node['id']} ({node['type']}) is muted or bypassed; not supported here")
    inputs = {**widget_inputs(node, info), **linked_inputs(node, links)}
    title = node.get("title") or info.get("display_name") or node["type"]
    return {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """API graph `{node id: {"class_type", "inputs", "_meta"}}` of a UI-format workflow."""
    links = link_table(workflow)
    graph: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        if node["type"] not in object_info:
            raise WorkflowError(f"node {node['id']}: type {node['type']} is not in /object_info")
        graph[str(node["id"])] = convert_node(node, object_info[node["type"]], links)
    return graph


def check_widget_values(node: dict, info: dict, file_inputs: frozenset[str] = frozenset()) -> list[str]:
    """Problems with a node's widget values: one per widget, of its declared type, range and choices.

    Inputs in `file_inputs` (checkpoint and image names) list files on the server's disk, so their
    choices are not checked.
    """
    specs = input_specs(info)
    layout = widget_layout(info)
    if len(node.get("widgets_values") or []) != len(layout):
        return [f"node {node['id']} ({node['type']}): widgets_values {node.get('widgets_values')!r} does not give "
                f"one value to each of the {len(layout)} widgets {layout} (None = frontend-only)"]
    problems = []
    for name, value in widget_inputs(node, info).items():
        kind, options = specs[name]
        choices = kind if isinstance(kind, list) else options.get("options")
        where = f"node {node['id']} ({node['type']}) input {name}={value!r}"
        if choices is not None:
            if name not in file_inputs and value not in choices:
                problems.append(f"{where}: not one of {choices}")
        elif kind in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
                problems.append(f"{where}: not an {kind}")
            elif not options.get("min", value) <= value <= options.get("max", value):
                problems.append(f"{where}: outside {options.get('min')}..{options.get('max')}")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{where}: not a BOOLEAN")
        elif kind == "STRING" and not isinstance(value, str):
            problems.append(f"{where}: not a STRING")
    return problems


def check_links(workflow: dict) -> list[str]:
    """Problems with the links table against the nodes' input and output slots (what the frontend relies on)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    problems = []
    for link_id, source, source_slot, target, target_slot, kind in workflow.get("links", []):
        where = f"link {link_id} ({source}:{source_slot} -> {target}:{target_slot})"
        if source not in nodes or target not in nodes:
            problems.append(f"{where}: unknown node")
            continue
        outputs, inputs = nodes[source].get("outputs", []), nodes[target].get("inputs", [])
        if source_slot >= len(outputs) or link_id not in (outputs[source_slot].get("links") or []):
            problems.append(f"{where}: not listed on the source output")
        elif target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"{where}: not the target input's link")
        elif not outputs[source_slot]["type"] == inputs[target_slot]["type"] == kind:
            problems.append(f"{where}: types {outputs[source_slot]['type']} -> {inputs[target_slot]['type']} ({kind})")
    ids = [link[0] for link in workflow.get("links", [])]
    if len(set(ids)) != len(ids):
        problems.append("duplicate link ids")
    used = {slot["link"] for node in nodes.values() for slot in node.get("inputs", []) if slot.get("link") is not None}
    used |= {link for node in nodes.values() for slot in node.get("outputs", []) for link in slot.get("links") or []}
    if used - set(ids):
        problems.append(f"links {sorted(used - set(ids))} are on nodes but not in the links table")
    if max(ids, default=0) > workflow.get("last_link_id", 0) or max(nodes, default=0) > workflow.get("last_node_id", 0):
        problems.append("last_node_id / last_link_id below the ids in use")
    return problems
