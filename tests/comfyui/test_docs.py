"""The nodes' help pages (web/docs/): one per node, every input with its schema default, pictures that exist.

ComfyUI's frontend looks a custom node's help up at `/extensions/<pack>/docs/<node id>/<locale>.md`,
then `/extensions/<pack>/docs/<node id>.md`, both served from the pack's WEB_DIRECTORY, and resolves
a relative image link against `/extensions/<pack>/docs/` (frontend 1.27 with ComfyUI 0.3.64 and
1.49 with 0.33.0 alike). The tests read the schemas from the host, as it serves them (GET_SCHEMA),
so a page must follow a changed default, a new option or a renamed node.

Page conventions the tests read: the first `# ` heading holds the node's display name; the
`## Inputs` section has one bullet per input, `- **name** ...`, which says `(optional)` for an
optional input, `default `value`` for a declared default (JSON spelling: `true`, `0.43`, `"text"`;
a plain word is read as a string) and lists every option of a fixed option list; the `## Outputs`
section has one bullet per output, `- **name** ...`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from .comfy_host import ROOT, find_comfyui

if find_comfyui() is None:
    pytest.skip("no ComfyUI found (see tests/comfyui/conftest.py)", allow_module_level=True)

import folder_paths  # noqa: E402
from comfy_api.latest import io  # noqa: E402

import multicond  # noqa: E402
from multicond.nodes.extension import MultiCondExtension  # noqa: E402

DOCS = ROOT / multicond.WEB_DIRECTORY / "docs"
LOCALE = "en"
MAX_PICTURE_BYTES = 150 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
DEFAULT = re.compile(r"\bdefault\s+`([^`]*)`")
PROJECT_PATH = re.compile(r"`((?:example_workflows|workflows|scripts|core|nodes|web|tests)/[^`]*)`")
# A template named in italics, *1a StyleAligned - ...*, is example_workflows/<name>.json.
TEMPLATE = re.compile(r"(?<![*\w])\*(\d+[a-z]? [^*\n]+)\*(?!\*)")


def pack_nodes() -> list[type[io.ComfyNode]]:
    return asyncio.run(MultiCondExtension().get_node_list())


def schema(node: type[io.ComfyNode]) -> io.Schema:
    return node.GET_SCHEMA()


NODES = pack_nodes()
NODE_IDS = [schema(node).node_id for node in NODES]


def help_page(node_id: str) -> Path | None:
    """The file the frontend shows for `node_id`: the locale's page first, then the plain one."""
    for path in (DOCS / node_id / f"{LOCALE}.md", DOCS / f"{node_id}.md"):
        if path.is_file():
            return path
    return None


def page_text(node_id: str) -> str:
    path = help_page(node_id)
    assert path is not None, f"{node_id} has no help page: write {DOCS.relative_to(ROOT)}/{node_id}.md"
    return path.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the `## title` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^##\s+{re.escape(title)}\s*$(.*?)(?=^#{{1,2}}\s|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {title}' section"
    return match.group(1)


def bullets(body: str) -> dict[str, str]:
    """`- **name** ...` items of a section, each with its indented continuation lines, by name."""
    items: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        match = re.match(r"^[-*]\s+\*\*([^*]+)\*\*(.*)$", line)
        if match:
            current = match.group(1).strip()
            assert current not in items, f"'{current}' is listed twice"
            items[current] = match.group(2)
        elif current is not None and line.startswith((" ", "\t")) and line.strip():
            items[current] += " " + line.strip()
        elif line.strip():
            current = None  # a paragraph or a plain bullet ends the item
    return items


def shown_default(spec: io.Input) -> object:
    """The value a fresh node shows: the declared default, or the first option of a list without one."""
    default = getattr(spec, "default", None)
    if default is None and isinstance(spec, io.Combo.Input) and spec.options:
        return spec.options[0]
    return default


def same_value(expected: object, written: str) -> bool:
    if isinstance(expected, bool):
        return written == json.dumps(expected)
    if isinstance(expected, (int, float)):
        try:
            return math.isclose(float(written), float(expected), rel_tol=1e-12, abs_tol=0.0)
        except ValueError:
            return False
    if isinstance(expected, str):
        if written.startswith('"'):
            try:
                return json.loads(written) == expected
            except json.JSONDecodeError:
                return False
        return written != "" and written == expected  # an empty default is written `""`
    return False


def fixed_options(node: type[io.ComfyNode]) -> dict[str, list[str]]:
    """The option lists that do not come from the user's files (a probe file added to every folder shows which do)."""
    probe = "docs-probe-file.safetensors"
    lists = {spec.id: list(spec.options) for spec in schema(node).inputs if isinstance(spec, io.Combo.Input)}
    with pytest.MonkeyPatch.context() as patch:
        real = folder_paths.get_filename_list
        patch.setattr(folder_paths, "get_filename_list", lambda *args, **kwargs: [*real(*args, **kwargs), probe])
        probed = {spec.id: list(spec.options) for spec in schema(node).inputs if isinstance(spec, io.Combo.Input)}
    return {name: options for name, options in lists.items() if probe not in probed[name]}


def image_links(text: str) -> list[str]:
    return IMAGE_LINK.findall(text) + HTML_IMAGE.findall(text)


def test_the_web_directory_is_where_the_pages_are():
    assert (ROOT / multicond.WEB_DIRECTORY).resolve() == DOCS.parent.resolve()
    assert DOCS.is_dir()


@pytest.mark.parametrize("node", NODES, ids=NODE_IDS)
def test_every_node_has_a_page_headed_by_its_display_name(node):
    text = page_text(schema(node).node_id)
    heading = re.search(r"^#\s+(.+?)\s*$", text, re.MULTILINE)
    assert heading, "the page has no '# ' heading"
    assert schema(node).display_name in heading.group(1), (
        f"heading {heading.group(1)!r} does not name the node as ComfyUI shows it: {schema(node).display_name!r}")


@pytest.mark.parametrize("node", NODES, ids=NODE_IDS)
def test_every_input_is_described_with_its_default_and_options(node):
    node_id = schema(node).node_id
    described = bullets(section(page_text(node_id), "Inputs"))
    options = fixed_options(node)
    problems = []
    for spec in schema(node).inputs:
        item = described.get(spec.id)
        if item is None:
            problems.append(f"input '{spec.id}' has no '- **{spec.id}**' item")
            continue
        expected = shown_default(spec)
        written = DEFAULT.findall(item)
        if expected is not None:
            if not written:
                problems.append(f"'{spec.id}': no default `{json.dumps(expected)}` in {item!r}")
            elif not any(same_value(expected, value) for value in written):
                problems.append(f"'{spec.id}': the page says default {written}, the node's is {json.dumps(expected)}")
        elif written:
            problems.append(f"'{spec.id}' declares no default but the page says {written}")
        if spec.optional and "optional" not in item:
            problems.append(f"'{spec.id}' is optional but its item does not say so")
        for option in options.get(spec.id, []):
            if option not in item:
                problems.append(f"'{spec.id}': option {option!r} is not in its item")
    unknown = sorted(set(described) - {spec.id for spec in schema(node).inputs})
    if unknown:
        problems.append(f"the page describes inputs the node does not have: {unknown}")
    assert not problems, f"{help_page(node_id).relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("node", NODES, ids=NODE_IDS)
def test_every_output_is_described(node):
    node_id = schema(node).node_id
    described = bullets(section(page_text(node_id), "Outputs"))
    names = [output.display_name or output.io_type for output in schema(node).outputs]
    assert names and set(names) == set(described), f"outputs {names}, the page describes {sorted(described)}"


@pytest.mark.parametrize("node", NODES, ids=NODE_IDS)
def test_every_picture_of_a_page_is_a_small_png_that_the_frontend_can_reach(node):
    node_id = schema(node).node_id
    links = image_links(page_text(node_id))
    assert links, f"{node_id}'s page has no picture"
    for link in links:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), (
            f"{link!r}: a picture must be a relative link, resolved against the pack's docs/ folder")
        target = (DOCS / unquote(parsed.path)).resolve()
        assert target.is_relative_to(DOCS.resolve()), f"{link!r} leaves the docs folder"
        assert target.is_file(), f"{link!r}: no file {target.relative_to(ROOT)}"
        data = target.read_bytes()
        assert data.startswith(PNG_SIGNATURE), f"{link!r} is not a PNG"
        assert len(data) <= MAX_PICTURE_BYTES, f"{link!r}: {len(data) // 1024} KiB, over {MAX_PICTURE_BYTES // 1024}"


def test_every_picture_in_the_docs_folder_is_shown_by_a_page():
    shown = {(DOCS / unquote(urlparse(link).path)).resolve() for node_id in NODE_IDS if help_page(node_id)
             for link in image_links(page_text(node_id))}
    pictures = {path.resolve() for path in DOCS.rglob("*") if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif",
                                                                                         ".webp", ".svg"}}
    orphans = sorted(str(path.relative_to(DOCS.resolve())) for path in pictures - shown)
    assert not orphans, f"pictures no page shows: {orphans}"


@pytest.mark.parametrize("node", NODES, ids=NODE_IDS)
def test_every_project_file_a_page_names_exists(node):
    """Templates (*1a StyleAligned - ...*: example_workflows/<name>.json), scripts and modules a page names."""
    text = page_text(schema(node).node_id)
    named = PROJECT_PATH.findall(text) + [f"example_workflows/{name}.json" for name in TEMPLATE.findall(text)]
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"the page names files the project does not have: {missing}"


def test_the_section_reader_finds_what_a_page_states():
    """The helpers above read a page as these tests require, and reject what they must."""
    page = ("# Node (x)\n\n## Inputs\n\n- **a** default `0.43`: a number\n- **b** (optional): wire;\n  continued\n"
            "- **c** default `\"x\\ny\"`, one of grading, preset\n\n## Outputs\n\n- **MODEL**: the model\n")
    items = bullets(section(page, "Inputs"))
    assert items.keys() == {"a", "b", "c"} and "continued" in items["b"]
    assert same_value(0.43, DEFAULT.findall(items["a"])[0]) and not same_value(0.5, DEFAULT.findall(items["a"])[0])
    assert same_value("x\ny", DEFAULT.findall(items["c"])[0]) and not same_value("x", DEFAULT.findall(items["c"])[0])
    assert same_value(True, "true") and not same_value(True, "1") and not same_value(1, "true")
    assert same_value("grading", "grading") and same_value("", '""') and not same_value("", "")
    assert bullets(section(page, "Outputs")) == {"MODEL": ": the model"}
    assert image_links('![a](images/x.png "t") <img src="images/y.png">') == ["images/x.png", "images/y.png"]
    assert PROJECT_PATH.findall("see `example_workflows/1a A - B.json` and `core/blend.py`, not `x/y`") == [
        "example_workflows/1a A - B.json", "core/blend.py"]
    assert TEMPLATE.findall("the template *1a A - B* or *6 C, D*; not **1 (white)** nor *1 x") == ["1a A - B", "6 C, D"]
