"""Draw each example workflow's graph as its template thumbnail (example_workflows/<name>.jpg).

    python scripts/make_template_thumbnails.py [--folder example_workflows]

ComfyUI's template browser shows `<workflow name>.jpg` next to a custom node pack's workflow as its card picture.
The picture here is the workflow itself, read from its JSON: the stage groups with their titles, the nodes as
boxes with their titles (the pack's nodes highlighted, a loader's model file named), and the links coloured by type,
as the canvas draws them.
It is not a generated result: it shows what the workflow wires together.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 384)
SUPERSAMPLE = 2  # drawn at twice the size and reduced: smooth lines and text
MARGIN = 10  # pixels of the final picture around the graph
TITLE_HEIGHT = 30  # LiteGraph's node title bar, drawn above the node's pos
SLOT_HEIGHT = 20  # LiteGraph's slot row; slot i sits at pos.y + (i + 0.5) * SLOT_HEIGHT
GROUP_TITLE_HEIGHT = 34  # a group's 24 px title font * 1.4
GROUP_FONT_PX = 10  # text sizes in the final picture: readable on a template card whatever the graph's scale
NODE_FONT_PX = 8
JPEG_QUALITY = 85
BACKGROUND = (32, 32, 32)
NODE_BODY = (53, 53, 53)
NODE_TITLE = (34, 34, 34)
PACK_TITLE = (92, 52, 120)  # the pack's own nodes stand out
TEXT = (222, 222, 222)
MODEL_TEXT = (150, 200, 255)
PACK_PREFIX = "MultiCond_"
LINK_COLOURS = {"MODEL": (179, 157, 219), "CLIP": (255, 213, 0), "VAE": (255, 110, 110),
                "CONDITIONING": (255, 169, 49), "LATENT": (255, 156, 249), "IMAGE": (100, 181, 246),
                "MASK": (129, 199, 132), "CONTROL_NET": (0, 214, 141)}
OTHER_LINK = (160, 160, 160)
DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "example_workflows"

Box = tuple[float, float, float, float]  # left, top, right, bottom in graph units


def hex_colour(value: str, fallback: tuple[int, int, int]) -> tuple[int, int, int]:
    """'#3f789e' or the short '#8A8' as RGB; the fallback for anything else."""
    digits = value.lstrip("#") if isinstance(value, str) else ""
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4)) if re.fullmatch(r"[0-9a-fA-F]{6}", digits) else fallback


def node_box(node: dict) -> Box:
    """The node's rectangle with its title bar."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def group_box(group: dict) -> Box:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def graph_bounds(workflow: dict) -> Box:
    boxes = [node_box(n) for n in workflow["nodes"]] + [group_box(g) for g in workflow.get("groups", [])]
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def fit(bounds: Box, size: tuple[int, int], margin: float) -> tuple[float, float, float]:
    """Scale and offsets that map graph units into `size` pixels, centred, keeping the aspect ratio."""
    left, top, right, bottom = bounds
    scale = min((size[0] - 2 * margin) / (right - left), (size[1] - 2 * margin) / (bottom - top))
    dx = (size[0] - scale * (right - left)) / 2 - scale * left
    dy = (size[1] - scale * (bottom - top)) / 2 - scale * top
    return scale, dx, dy


def slot_point(node: dict, index: int, output: bool) -> tuple[float, float]:
    (x, y), (w, _) = node["pos"], node["size"]
    return (x + w if output else x), y + (index + 0.5) * SLOT_HEIGHT


def link_curve(start: tuple[float, float], end: tuple[float, float], steps: int = 24) -> list[tuple[float, float]]:
    """The canvas's link shape: a cubic Bezier leaving and entering horizontally."""
    reach = max(40.0, abs(end[0] - start[0]) * 0.4)
    c1, c2 = (start[0] + reach, start[1]), (end[0] - reach, end[1])
    points = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        points.append(tuple(a * p0 + b * p1 + c * p2 + d * p3 for p0, p1, p2, p3 in zip(start, c1, c2, end)))
    return points


def readable_type(node_type: str) -> str:
    """'MultiCond_AdaINStyle' -> 'Ada IN Style', 'KSampler' stays: a title for a node saved without one."""
    name = node_type.removeprefix(PACK_PREFIX)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z]{2})(?=[A-Z][a-z])", " ", name)


def node_title(node: dict) -> str:
    if node["type"] in ("Note", "MarkdownNote"):
        return "Read me"
    return node.get("title") or readable_type(node["type"])


def clipped(text: str, font: ImageFont.ImageFont, width: float) -> str:
    """The text, shortened with an ellipsis to fit `width` pixels (empty when not even that fits)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def draw_workflow(workflow: dict, size: tuple[int, int] = SIZE) -> Image.Image:
    big = (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE)
    scale, dx, dy = fit(graph_bounds(workflow), big, MARGIN * SUPERSAMPLE)
    to_px = lambda x, y: (dx + scale * x, dy + scale * y)  # noqa: E731 - graph units to pixels
    image = Image.new("RGB", big, BACKGROUND)
    draw = ImageDraw.Draw(image, "RGBA")
    group_font = ImageFont.load_default(size=GROUP_FONT_PX * SUPERSAMPLE)
    node_font = ImageFont.load_default(size=NODE_FONT_PX * SUPERSAMPLE)
    for group in workflow.get("groups", []):
        left, top, right, bottom = group_box(group)
        colour = hex_colour(group.get("color"), (68, 68, 68))
        draw.rectangle([*to_px(left, top), *to_px(right, bottom)], fill=(*colour, 70), outline=(*colour, 255),
                       width=SUPERSAMPLE)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow.get("links", []):
        start = slot_point(nodes[source], source_slot, output=True)
        end = slot_point(nodes[target], target_slot, output=False)
        draw.line([to_px(*p) for p in link_curve(start, end)], fill=LINK_COLOURS.get(kind, OTHER_LINK),
                  width=2 * SUPERSAMPLE)
    for node in workflow["nodes"]:
        left, top, right, bottom = node_box(node)
        body = hex_colour(node.get("bgcolor"), NODE_BODY)
        bar = PACK_TITLE if node["type"].startswith(PACK_PREFIX) else hex_colour(node.get("color"), NODE_TITLE)
        draw.rectangle([*to_px(left, top), *to_px(right, bottom)], fill=body, outline=(0, 0, 0), width=SUPERSAMPLE)
        draw.rectangle([*to_px(left, top), *to_px(right, top + TITLE_HEIGHT)], fill=bar)
        text_x, text_y = to_px(left + 6, top + TITLE_HEIGHT * 0.2)
        draw.text((text_x, text_y), clipped(node_title(node), node_font, scale * (right - left - 12)), font=node_font,
                  fill=TEXT)
        for line, model in enumerate(node.get("properties", {}).get("models", [])):  # which model: SD1.5 or SDXL
            model_x, model_y = to_px(left + 6, top + TITLE_HEIGHT * 1.3)
            draw.text((model_x, model_y + line * node_font.size * 1.2),
                      clipped(model["name"], node_font, scale * (right - left - 12)), font=node_font, fill=MODEL_TEXT)
    for group in workflow.get("groups", []):  # last: a group's title stays readable over its nodes
        left, top, right, _ = group_box(group)
        title = clipped(group["title"], group_font, scale * (right - left) - 4 * SUPERSAMPLE)
        x, y = to_px(left, top)
        draw.rectangle([x, y, x + group_font.getlength(title) + 4 * SUPERSAMPLE, y + 1.3 * group_font.size],
                       fill=(*hex_colour(group.get("color"), (68, 68, 68)), 235))
        draw.text((x + 2 * SUPERSAMPLE, y + 0.1 * group_font.size), title, font=group_font, fill=TEXT)
    return image.resize(size, Image.Resampling.LANCZOS)


def thumbnail_path(workflow_path: Path) -> Path:
    """Where the template browser looks: the workflow's name with .jpg, in the same folder."""
    return workflow_path.with_suffix(".jpg")


def write_thumbnails(folder: Path) -> list[Path]:
    written = []
    for path in sorted(folder.glob("*.json")):
        picture = draw_workflow(json.loads(path.read_text(encoding="utf-8")))
        picture.save(thumbnail_path(path), quality=JPEG_QUALITY, optimize=True)
        written.append(thumbnail_path(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="folder of the workflow JSON files")
    for path in write_thumbnails(parser.parse_args().folder):
        print(f"{path.name} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
