"""The example workflows as a user first sees them: what the canvas shows, what the frontend reads, the template cards.

Read from the UI-format JSON the frontend loads (no server): no node drawn over another, every node tall enough
for its slots and widgets, every node inside a stage group, the output in the saved view, the model files with
their download links for the frontend's missing-models dialog, the input images shipped with the pack, the grading's
source for Layer Balance, and a thumbnail per template that is the workflow's own graph. The widget kinds (which
inputs are text boxes) come from the host's node classes, imported in this process.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import json
import re
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import pytest

from .comfy_host import ROOT, find_comfyui
from .workflow_api import FRONTEND_ONLY_NODES

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import numpy as np  # noqa: E402 - ComfyUI's own dependencies
from PIL import Image  # noqa: E402

FOLDER = ROOT / "example_workflows"
WORKFLOWS = sorted(FOLDER.glob("*.json"))
EXAMPLE_INPUTS = ROOT / "example_inputs"
Box = tuple[float, float, float, float]  # left, top, right, bottom

# Canvas geometry (LiteGraph): a node's title bar is drawn above its pos, a group's title is its font size * 1.4.
NODE_TITLE_HEIGHT = 30
GROUP_TITLE_HEIGHT = 24 * 1.4
CANVAS = (1600, 900)  # the saved view (extra.ds) is checked on a common laptop-sized canvas
MIN_VIEW_SCALE = 0.5  # below this, node text is too small to read
# Height a node needs. LiteGraph's own minimum (20 px a slot row, 24 a widget, 54 a text box, 14 of padding) leaves
# nothing to spare, and Batch Prompts at 200 px (its minimum there: 136) showed half of its style widget; so the
# rule gives 24 px to a row of either kind, 30 of padding, 120 (about five lines) to a text box and 200 to the image
# a node shows (LoadImage's preview, SaveImage's result).
ROW, PADDING, TEXT_BOX, IMAGE_AREA = 24, 30, 120, 200
SHOWS_AN_IMAGE = frozenset({"LoadImage", "SaveImage", "PreviewImage"})
# Nodes the workflows use that nodes.py does not define (the built-in extras are loaded by the server only).
EXTRA_MODULES = ("comfy_extras.nodes_mask", "comfy_extras.nodes_canny", "comfy_extras.nodes_sd3",
                 "comfy_extras.nodes_model_advanced", "comfy_extras.nodes_flux")
# The missing-models dialog: a huggingface.co download, of a file type it accepts (frontend 1.49; 1.27 took only
# .safetensors/.sft, but for a whitelist).
LOADERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet"}
MODEL_SOURCE = "https://huggingface.co/"
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
# Template cards: the file name is the title; keep it portable (Windows) and usable in a URL as the frontend builds it.
TEMPLATE_NAME = re.compile(r"[1-9][a-z]? [A-Za-z0-9][A-Za-z0-9 ,.()-]*")
METHOD_NODES = {"1": {"MultiCond_SharedAttention"}, "2": {"MultiCond_LayerBalance"},
                "3": {"MultiCond_EpsilonBlend", "MultiCond_CrossAttnBlend"}, "4": {"MultiCond_SpatialGuidance"},
                "5": {"MultiCond_MaskedAdapter"}}
COMPOSED_PREFIX = "6"  # the methods together: at least three of them
STAGES = {"Model": "CheckpointLoaderSimple", "Sample": "KSampler", "Output": "SaveImage"}
THUMBNAIL_SIZE = (512, 384)
THUMBNAIL_MAX_BYTES = 60_000
# Compared on a 128x96 reduction, a thumbnail differs from a fresh drawing by JPEG noise (at most ~35 of 255 in a
# pixel); one node moved by 100 graph units makes 70 and more.
THUMBNAIL_CHECK_SIZE = (128, 96)
THUMBNAIL_TOLERANCE = 50.0
GRADING_SOURCE = "https://github.com/Nadavc220/conditional-balance"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def node_box(node: dict) -> Box:
    """The node as drawn, title bar included."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - NODE_TITLE_HEIGHT, x + width, y + height


def group_body(group: dict) -> Box:
    """The part of a group below its title, where its nodes belong."""
    x, y, width, height = group["bounding"]
    return x, y + GROUP_TITLE_HEIGHT, x + width, y + height


def group_box(group: dict) -> Box:
    x, y, width, height = group["bounding"]
    return x, y, x + width, y + height


def overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share an area (touching edges do not)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(inner: Box, outer: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def saved_view(workflow: dict, canvas: tuple[int, int] = CANVAS) -> Box:
    """The graph area the canvas shows at the saved offset and scale (screen = (graph + offset) * scale)."""
    ds = workflow["extra"]["ds"]
    (dx, dy), scale = ds["offset"], ds["scale"]
    return -dx, -dy, canvas[0] / scale - dx, canvas[1] / scale - dy


def slot_rows(node: dict) -> int:
    """Rows of connection slots: inputs drawn as sockets (not widgets) beside the outputs."""
    sockets = [slot for slot in node.get("inputs", []) if "widget" not in slot]
    return max(len(sockets), len(node.get("outputs", [])), 1)


def required_height(node: dict, text_boxes: int) -> int:
    widget_rows = len(node.get("widgets_values") or []) - text_boxes  # includes control_after_generate, upload
    return (PADDING + ROW * (slot_rows(node) + widget_rows) + TEXT_BOX * text_boxes
            + IMAGE_AREA * (node["type"] in SHOWS_AN_IMAGE))


def v3_classes(entrypoint) -> dict[str, type]:
    extension = asyncio.run(entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def node_classes() -> dict[str, type]:
    """The host's node classes by type: nodes.py, the extras the workflows use, and this pack."""
    import nodes

    from multicond import comfy_entrypoint

    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    for name in EXTRA_MODULES:
        module = importlib.import_module(name)
        classes.update(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})
        if hasattr(module, "comfy_entrypoint"):  # newer hosts define these nodes as V3 extensions
            classes.update(v3_classes(module.comfy_entrypoint))
    classes.update(v3_classes(comfy_entrypoint))
    return classes


def text_box_count(node_class: type) -> int:
    """Inputs the frontend draws as a multi-line text box."""
    inputs = node_class.INPUT_TYPES()
    specs = [spec for section in ("required", "optional") for spec in inputs.get(section, {}).values()]
    return sum(1 for spec in specs if spec[0] == "STRING" and len(spec) > 1 and spec[1].get("multiline"))


def nodes_of(workflow: dict, *types: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] in types]


@pytest.fixture(scope="module")
def text_boxes() -> dict[str, int]:
    classes = node_classes()
    used = {node["type"] for path in WORKFLOWS for node in load(path)["nodes"]} - FRONTEND_ONLY_NODES
    assert used <= set(classes), f"node types not found in the host: {sorted(used - set(classes))}"
    return {kind: text_box_count(classes[kind]) for kind in used}


def test_the_template_folder_holds_the_workflows() -> None:
    assert len(WORKFLOWS) >= 14
    assert not (ROOT / "workflows").exists(), "ComfyUI prefers example_workflows/; the old folder is gone"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_no_node_is_drawn_over_another(path: Path) -> None:
    workflow = load(path)
    clashes = [(a["id"], b["id"]) for a, b in itertools.combinations(workflow["nodes"], 2)
               if overlap(node_box(a), node_box(b))]
    assert not clashes, f"overlapping nodes (ids) in {path.name}: {clashes}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_every_node_is_tall_enough_for_its_slots_and_widgets(path: Path, text_boxes: dict[str, int]) -> None:
    short = [f"#{node['id']} {node['type']}: {node['size'][1]} < {required_height(node, text_boxes[node['type']])}"
             for node in load(path)["nodes"] if node["type"] not in FRONTEND_ONLY_NODES
             and node["size"][1] < required_height(node, text_boxes[node["type"]])]
    assert not short, f"{path.name}: node heights below the rule: {short}"


def test_the_height_rule_flags_a_batch_prompts_node_that_hides_its_style() -> None:
    """The size the workflows had before: Batch Prompts at 200 px showed half of its style widget."""
    node = {"type": "MultiCond_BatchPrompts", "size": [420, 200], "inputs": [{"name": "clip", "type": "CLIP"}],
            "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "widgets_values": ["a\nb", 2, "style"]}
    assert required_height(node, text_boxes=1) > 200


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_every_node_sits_in_one_stage_group(path: Path) -> None:
    workflow = load(path)
    groups = workflow["groups"]
    homeless = [node["id"] for node in workflow["nodes"]
                if not any(inside(node_box(node), group_body(group)) for group in groups)]
    assert not homeless, f"{path.name}: nodes outside every group's body (ids): {homeless}"
    crossing = [(a["title"], b["title"]) for a, b in itertools.combinations(groups, 2)
                if overlap(group_box(a), group_box(b))]
    assert not crossing, f"{path.name}: overlapping groups {crossing}"
    empty = [g["title"] for g in groups if not any(inside(node_box(n), group_body(g)) for n in workflow["nodes"])]
    assert not empty, f"{path.name}: empty groups {empty}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_model_sample_and_output_stages_are_named_groups(path: Path) -> None:
    workflow = load(path)
    for stage, kind in STAGES.items():
        homes = [g for g in workflow["groups"] if g["title"].startswith(stage)]
        assert len(homes) == 1, f"{path.name}: {len(homes)} groups titled {stage!r}"
        assert all(inside(node_box(node), group_body(homes[0])) for node in nodes_of(workflow, kind)), \
            f"{path.name}: a {kind} outside the {stage!r} group"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_output_and_the_note_are_in_the_saved_view(path: Path) -> None:
    workflow = load(path)
    assert workflow["extra"]["ds"]["scale"] >= MIN_VIEW_SCALE
    view = saved_view(workflow)
    shown = nodes_of(workflow, "SaveImage", "PreviewImage", *FRONTEND_ONLY_NODES)
    outside = [node["id"] for node in shown if not inside(node_box(node), view)]
    assert shown and not outside, f"{path.name}: outputs/notes outside the view {view}: {outside}"


def test_the_saved_view_is_where_the_canvas_draws() -> None:
    """A graph point p shows at (p + offset) * scale: offset (-100, 50) at scale 0.5 shows x 100..3300, y -50..1750."""
    assert saved_view({"extra": {"ds": {"offset": [-100, 50], "scale": 0.5}}}) == (100, -50, 3300, 1750)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_each_model_file_names_its_official_download(path: Path) -> None:
    loaders = nodes_of(load(path), *LOADERS)
    assert loaders
    for node in loaders:
        (name,) = node["widgets_values"]
        models = node.get("properties", {}).get("models", [])
        assert [model["name"] for model in models] == [name], f"{path.name} #{node['id']}: {models} for {name}"
        (model,) = models
        assert model["directory"] == LOADERS[node["type"]]
        assert model["url"].startswith(MODEL_SOURCE) and "/resolve/" in model["url"], model["url"]
        assert name.endswith(MODEL_SUFFIXES), name
        assert Path(urlparse(model["url"]).path).suffix == Path(name).suffix, (model["url"], name)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_each_loaded_image_is_shipped_with_the_pack(path: Path) -> None:
    from multicond.nodes.assets import INPUT_PREFIX

    for node in nodes_of(load(path), "LoadImage"):
        name = node["widgets_values"][0]
        assert name.startswith(INPUT_PREFIX) and (EXAMPLE_INPUTS / name).is_file(), f"{path.name}: {name}"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if nodes_of(load(p), "MultiCond_LayerBalance")],
                         ids=lambda path: path.stem)
def test_a_workflow_that_needs_a_grading_links_where_it_comes_from(path: Path) -> None:
    workflow = load(path)
    (balance,) = nodes_of(workflow, "MultiCond_LayerBalance")
    source, grading = balance["widgets_values"][:2]
    assert source == "grading"
    notes = [node["widgets_values"][0] for node in nodes_of(workflow, "MarkdownNote")]
    assert any(f"]({GRADING_SOURCE}" in text and f"`{grading}`" in text and "models/multicond_gradings/" in text
               for text in notes), f"{path.name}: no Markdown note linking {GRADING_SOURCE} for {grading}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_template_name_is_portable_and_ordered_by_method(path: Path) -> None:
    assert TEMPLATE_NAME.fullmatch(path.stem), path.stem
    types = {node["type"] for node in load(path)["nodes"]}
    prefix = path.stem[0]
    if prefix == COMPOSED_PREFIX:
        assert sum(bool(nodes & types) for nodes in METHOD_NODES.values()) >= 3
    else:
        assert METHOD_NODES[prefix] & types, f"{path.stem}: none of {METHOD_NODES[prefix]}"


def reduced(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB").resize(THUMBNAIL_CHECK_SIZE, Image.Resampling.BOX), dtype=np.float32)


def largest_difference(a: Image.Image, b: Image.Image) -> float:
    return float(abs(reduced(a) - reduced(b)).max())


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_thumbnail_is_the_workflows_current_graph(path: Path) -> None:
    thumbnails = load_script("make_template_thumbnails")
    picture = thumbnails.thumbnail_path(path)
    assert picture.is_file() and picture.stat().st_size <= THUMBNAIL_MAX_BYTES, picture
    with Image.open(picture) as shipped:
        assert shipped.format == "JPEG" and shipped.size == THUMBNAIL_SIZE
        difference = largest_difference(shipped, thumbnails.draw_workflow(load(path)))
    assert difference < THUMBNAIL_TOLERANCE, f"{picture.name} is out of date ({difference:.0f}): run " \
                                             "scripts/make_template_thumbnails.py"


def test_a_thumbnail_changes_when_one_node_moves() -> None:
    """The tolerance above is tight enough to see a layout change."""
    thumbnails = load_script("make_template_thumbnails")
    workflow = load(WORKFLOWS[0])
    before = thumbnails.draw_workflow(workflow)
    workflow["nodes"][0]["pos"][1] += 100
    assert largest_difference(before, thumbnails.draw_workflow(workflow)) > THUMBNAIL_TOLERANCE


def test_the_example_inputs_are_the_scripts_drawings(tmp_path: Path) -> None:
    from multicond.nodes.assets import INPUT_PREFIX

    inputs = load_script("make_example_inputs")
    written = inputs.write_inputs(tmp_path)
    assert sorted(path.name for path in written) == sorted(path.name for path in EXAMPLE_INPUTS.iterdir())
    assert all(path.name.startswith(INPUT_PREFIX) for path in written)  # they land in the user's shared input folder
    for path in written:
        with Image.open(path) as fresh, Image.open(EXAMPLE_INPUTS / path.name) as shipped:
            same = np.asarray(fresh.convert("RGB")) == np.asarray(shipped.convert("RGB"))
        assert same.all(axis=-1).mean() > 0.995, f"{path.name} differs from scripts/make_example_inputs.py's drawing"
