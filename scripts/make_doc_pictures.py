"""Make the pictures of the nodes' help pages: web/docs/images/*.png.

    .venv/bin/python scripts/make_doc_pictures.py          # from the repository root (scripts/test.sh makes .venv)

Every picture is drawn or computed here, from the project's own files and functions; none is a
model's output:

- `<node id>.png`: how the node is wired, drawn from a shipped example workflow
  (example_workflows/*.json, the pack's templates) that uses it: its nodes, sockets and links as the
  JSON has them, up to the sampler, the node of the page highlighted;
- `MultiCond_LayerBalance_preview.png`: the node's `preview` output (`selection_chart`, as
  nodes/balance.py calls it) for a grading that `analyze` computes here on the pack's tiny random
  SDXL-shaped UNet, and for the preset of IPAdapter's style blocks on SDXL's real layer table;
- `MultiCond_EpsilonBlend_profile.png`, `MultiCond_CrossAttnBlend_layers.png`: the blend weights from
  core/blend.py (`profile_weights`, `layer_weights`) at the node defaults;
- `MultiCond_SpatialGuidance_relation.png`: two synthetic Gaussian maps (said on the picture), their
  centroids and the relation hinge from core/spatial.py at the node defaults;
- `MultiCond_MaskedAdapter_mask.png`: the example workflow's mask resized to each residual size by
  core/adapter.py (`resize_mask`), hard and feathered;
- `MultiCond_StyleReference_pins.png`: which inverted latent the reference row holds at each step
  (core/inversion.py, `pinned_step`).

Node titles come from the `display_name` in nodes/*.py (read without importing ComfyUI), so a
renamed node gets redrawn under its new name. PNGs are palette images, a few tens of KiB each.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "web" / "docs" / "images"
WORKFLOWS = ROOT / "example_workflows"

if "multicond" not in sys.modules:  # the repository root is the package `multicond` (pyproject's package-dir)
    import importlib.util

    _spec = importlib.util.spec_from_file_location("multicond", ROOT / "__init__.py",
                                                   submodule_search_locations=[str(ROOT)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["multicond"] = _module
    _spec.loader.exec_module(_module)

from multicond.core import adapter, blend, inversion, layers, spatial  # noqa: E402

# ---------------------------------------------------------------- drawing basics

BACKGROUND = (255, 255, 255)
INK = (34, 34, 34)
MUTED = (120, 120, 120)
GRID = (225, 225, 225)
ACCENT = (37, 99, 235)
FIRST_COLOUR = (230, 126, 34)   # the first prompt / object A
SECOND_COLOUR = (52, 120, 200)  # the second prompt / object B
# Link colours close to ComfyUI's default palette, so a wire reads as the type it carries.
TYPE_COLOURS = {
    "MODEL": (157, 129, 214), "CLIP": (214, 178, 0), "VAE": (230, 90, 90), "CONDITIONING": (240, 150, 40),
    "LATENT": (222, 110, 210), "IMAGE": (80, 160, 230), "MASK": (90, 175, 95), "CONTROL_NET": (0, 170, 120),
    "MULTICOND_LAYERS": (110, 110, 110),
}
# Display names of the core nodes the example workflows use (ComfyUI's NODE_DISPLAY_NAME_MAPPINGS; V3 nodes
# without a display_name show their id).
CORE_TITLES = {
    "CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "EmptyLatentImage": "Empty Latent Image", "KSampler": "KSampler", "VAEDecode": "VAE Decode",
    "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
    "ImageScale": "Upscale Image",
    "ControlNetLoader": "Load ControlNet Model", "ControlNetApplyAdvanced": "Apply ControlNet", "Canny": "Canny",
    "SolidMask": "SolidMask", "MaskComposite": "MaskComposite",
}


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> float:
    return draw.textlength(text, font=font(size))


GLYPHS = {"≈": "~", "−": "-", "→": "->", "×": "x", "λ": "lambda "}  # characters the bundled font lacks


def fitted(draw: ImageDraw.ImageDraw, text: str, size: int, width: float) -> str:
    """`text` (characters the font lacks spelled out) cut with an ellipsis to fit `width` pixels."""
    text = "".join(GLYPHS.get(ch, ch) for ch in text)
    if text_width(draw, text, size) <= width:
        return text
    while text and text_width(draw, text + "…", size) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def save(image: Image.Image, name: str) -> Path:
    """A palette PNG (small, lossless for these flat drawings)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)
    return path


def weight_image(weights: torch.Tensor, first=FIRST_COLOUR, second=SECOND_COLOUR) -> Image.Image:
    """An (H, W) weight map in [0, 1] as colours: 1 = `first`, 0 = `second`."""
    w = weights.clamp(0, 1).double()[..., None]
    rgb = w * torch.tensor(first, dtype=torch.float64) + (1 - w) * torch.tensor(second, dtype=torch.float64)
    return Image.fromarray(rgb.round().byte().numpy(), "RGB")


@dataclass
class Axes:
    """A plot area at (left, top, width, height) in pixels for data x in [x0, x1] and y in [y0, y1]."""

    draw: ImageDraw.ImageDraw
    left: int
    top: int
    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float, y: float) -> tuple[float, float]:
        return (self.left + (x - self.x0) / (self.x1 - self.x0) * self.width,
                self.top + (self.y1 - y) / (self.y1 - self.y0) * self.height)

    def frame(self, xticks: Iterable[float], yticks: Iterable[float], xlabel: str, ylabel: str,
              fmt: Callable[[float], str] = lambda v: f"{v:g}") -> None:
        d = self.draw
        for x in xticks:
            px, _ = self.px(x, self.y0)
            d.line([(px, self.top), (px, self.top + self.height)], fill=GRID)
            label = fmt(x)
            d.text((px - text_width(d, label, 11) / 2, self.top + self.height + 4), label, fill=MUTED, font=font(11))
        for y in yticks:
            _, py = self.px(self.x0, y)
            d.line([(self.left, py), (self.left + self.width, py)], fill=GRID)
            label = fmt(y)
            d.text((self.left - 6 - text_width(d, label, 11), py - 7), label, fill=MUTED, font=font(11))
        d.rectangle([self.left, self.top, self.left + self.width, self.top + self.height], outline=MUTED)
        d.text((self.left + self.width / 2 - text_width(d, xlabel, 12) / 2, self.top + self.height + 20), xlabel,
               fill=INK, font=font(12))
        d.text((self.left, self.top - 18), ylabel, fill=INK, font=font(12))

    def curve(self, xs: Sequence[float], ys: Sequence[float], colour, width: int = 2) -> None:
        points = [self.px(x, max(self.y0, min(self.y1, y))) for x, y in zip(xs, ys)]
        self.draw.line(points, fill=colour, width=width, joint="curve")


def legend(draw: ImageDraw.ImageDraw, x: float, y: float, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    for label, colour in entries:
        draw.line([(x, y + 7), (x + 22, y + 7)], fill=colour, width=3)
        draw.text((x + 28, y), label, fill=INK, font=font(12))
        y += 18


# ---------------------------------------------------------------- node titles from nodes/*.py

def pack_titles() -> dict[str, str]:
    """node id -> display_name, read from the `io.Schema(...)` calls in nodes/*.py without importing ComfyUI."""
    titles: dict[str, str] = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for target in node.targets if isinstance(target, ast.Name)}

        def value(expr: ast.expr, constants: dict[str, str] = constants, path: Path = path) -> str:
            if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
                return expr.value
            if isinstance(expr, ast.Name) and expr.id in constants:
                return constants[expr.id]
            raise ValueError(f"{path.name}: cannot read {ast.unparse(expr)!r} without running the module")

        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema":
                keywords = {k.arg: k.value for k in call.keywords}
                if "node_id" in keywords:
                    node_id = value(keywords["node_id"])
                    titles[node_id] = value(keywords["display_name"]) if "display_name" in keywords else node_id
    return titles


# ---------------------------------------------------------------- wiring diagrams from the example workflows

@dataclass
class Box:
    node: dict
    title: str
    subtitle: str
    inputs: list[dict]
    outputs: list[dict]
    column: int = 0
    x: float = 0
    y: float = 0
    width: float = 0

    HEADER = 22
    SUB = 15
    ROW = 15

    @property
    def height(self) -> float:
        rows = max(len(self.inputs), len(self.outputs), 1)
        return self.HEADER + (self.SUB if self.subtitle else 0) + self.ROW * rows + 6

    def socket(self, side: str, index: int) -> tuple[float, float]:
        y = self.y + self.HEADER + (self.SUB if self.subtitle else 0) + self.ROW * index + self.ROW / 2 + 2
        return (self.x if side == "in" else self.x + self.width, y)


def workflow_boxes(workflow: dict, titles: dict[str, str]) -> tuple[list[Box], list[tuple]]:
    """The workflow's nodes up to the sampler (the decoding after it is left out), in link-depth columns."""
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    links = [tuple(link[:6]) for link in workflow["links"]]  # (id, from node, from slot, to node, to slot, type)
    samplers = {i for i, n in nodes.items() if n["type"] == "KSampler"}
    after: set[int] = set()
    frontier = set(samplers)
    while frontier:  # everything downstream of a sampler
        frontier = {to for _, src, _, to, _, _ in links if src in frontier} - after
        after |= frontier
    keep = {i for i in nodes if i not in after and any(i in (src, to) for _, src, _, to, _, _ in links)}
    links = [link for link in links if link[1] in keep and link[3] in keep]
    depth = {i: 0 for i in keep}
    for _ in keep:  # longest path from a source
        for _, src, _, to, _, _ in links:
            depth[to] = max(depth[to], depth[src] + 1)
    for i in sorted(keep, key=lambda i: -depth[i]):  # sources sit just before their first consumer
        consumers = [depth[to] for _, src, _, to, _, _ in links if src == i]
        if not any(to == i for _, _, _, to, _, _ in links) and consumers:
            depth[i] = min(consumers) - 1
    boxes = []
    for i in sorted(keep, key=lambda i: (depth[i], nodes[i]["pos"][1])):
        node = nodes[i]
        kind = node["type"]
        title = titles.get(kind) or CORE_TITLES.get(kind, kind)
        subtitle = node.get("title") or ""
        inputs = [slot for slot in node.get("inputs", []) if slot.get("link") is not None or kind in titles
                  and slot["type"] in TYPE_COLOURS and not slot.get("widget")]
        outputs = list(node.get("outputs", []))
        boxes.append(Box(node, title, subtitle if subtitle != title else "", inputs, outputs, depth[i]))
    return boxes, links


def draw_workflow(workflow_path: Path, highlight: str, titles: dict[str, str]) -> Image.Image:
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    boxes, links = workflow_boxes(workflow, titles)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for box in boxes:
        sockets = max((text_width(probe, s["name"], 11) for s in box.inputs), default=0) + \
            max((text_width(probe, s["name"], 11) for s in box.outputs), default=0)
        box.width = max(text_width(probe, box.title, 13) + 16, sockets + 36, 120)
        box.width = min(box.width, 330)
    columns = sorted({box.column for box in boxes})
    margin, gap_x, gap_y = 20, 56, 18
    by_id = {box.node["id"]: box for box in boxes}
    placed: set[int] = set()
    x = margin
    for column in columns:
        def feeds(box: Box) -> float:
            """Where the box's inputs come from, on average (a column is ordered by it: fewer crossings)."""
            ys = [by_id[src].socket("out", slot)[1] for _, src, slot, to, _, _ in links
                  if to == box.node["id"] and src in placed]
            return sum(ys) / len(ys) if ys else math.inf

        members = sorted((box for box in boxes if box.column == column), key=lambda b: (feeds(b), b.node["pos"][1]))
        width = max(box.width for box in members)
        y = margin + 26
        for box in members:
            box.x, box.y, box.width = x, y, width
            y += box.height + gap_y
            placed.add(box.node["id"])
        x += width + gap_x
    used_types = sorted({link[5] for link in links}, key=list(TYPE_COLOURS).index)
    width = int(x - gap_x + margin)
    height = int(max(box.y + box.height for box in boxes) + margin + 34)
    image = Image.new("RGBA", (width, height), BACKGROUND + (255,))
    d = ImageDraw.Draw(image)
    d.text((margin, margin - 6), f"Example workflow \"{workflow_path.stem}\" (up to the sampler)", fill=MUTED,
           font=font(12))
    for _, src, src_slot, to, to_slot, kind in links:
        start = by_id[src].socket("out", src_slot)
        target = by_id[to]
        end = target.socket("in", [id(s) for s in target.inputs].index(id(target.node["inputs"][to_slot])))
        bend = max(30.0, (end[0] - start[0]) / 2)
        points = []
        for step in range(41):  # a cubic Bezier, as ComfyUI draws links
            t = step / 40
            c = [start, (start[0] + bend, start[1]), (end[0] - bend, end[1]), end]
            points.append(tuple((1 - t) ** 3 * c[0][k] + 3 * (1 - t) ** 2 * t * c[1][k] + 3 * (1 - t) * t ** 2 * c[2][k]
                                + t ** 3 * c[3][k] for k in range(2)))
        d.line(points, fill=TYPE_COLOURS.get(kind, MUTED), width=3, joint="curve")
    # Boxes are slightly see-through, so a link passing behind one stays visible, faintly.
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for box in boxes:
        mine = box.node["type"] == highlight
        pack = box.node["type"] in titles
        header = ACCENT if mine else ((205, 222, 250) if pack else (228, 228, 228))
        d.rounded_rectangle([box.x, box.y, box.x + box.width, box.y + box.height], radius=6,
                            fill=(250, 250, 250, 215), outline=ACCENT if mine else (170, 170, 170),
                            width=3 if mine else 1)
        d.rounded_rectangle([box.x, box.y, box.x + box.width, box.y + Box.HEADER], radius=6, fill=header + (235,),
                            corners=(True, True, False, False))
        d.text((box.x + 8, box.y + 4), fitted(d, box.title, 13, box.width - 12), fill=(255, 255, 255) if mine else INK,
               font=font(13))
        if box.subtitle:
            d.text((box.x + 8, box.y + Box.HEADER + 1), fitted(d, box.subtitle, 11, box.width - 12), fill=MUTED,
                   font=font(11))
        for index, slot in enumerate(box.inputs):
            sx, sy = box.socket("in", index)
            connected = slot.get("link") is not None
            colour = TYPE_COLOURS.get(slot["type"], MUTED)
            d.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], fill=colour if connected else BACKGROUND, outline=colour)
            d.text((sx + 8, sy - 7), slot["name"] + ("" if connected else " (optional)"),
                   fill=INK if connected else MUTED, font=font(11))
        for index, slot in enumerate(box.outputs):
            sx, sy = box.socket("out", index)
            colour = TYPE_COLOURS.get(slot["type"], MUTED)
            d.ellipse([sx - 4, sy - 4, sx + 4, sy + 4], fill=colour)
            label = slot["name"]
            d.text((sx - 8 - text_width(d, label, 11), sy - 7), label, fill=INK, font=font(11))
    x, y = margin, height - margin - 8
    for kind in used_types:
        d.line([(x, y + 7), (x + 18, y + 7)], fill=TYPE_COLOURS[kind], width=3)
        d.text((x + 22, y), kind, fill=INK, font=font(11))
        x += 22 + text_width(d, kind, 11) + 16
    return Image.alpha_composite(image, layer).convert("RGB")


# Which shipped workflow shows each node's wiring (the pages name the same files).
WIRING = {
    "MultiCond_SharedAttention": "1a StyleAligned - SDXL batch in one style.json",
    "MultiCond_AdaINStyle": "1b StyleAligned - SD1.5 batch in one style.json",
    "MultiCond_StyleReference": "1c StyleAligned - SDXL style from a reference image.json",
    "MultiCond_BatchPrompts": "1b StyleAligned - SD1.5 batch in one style.json",
    "MultiCond_LayerBalance": "2a Conditional Balance - SDXL style on the graded layers.json",
    "MultiCond_EpsilonBlend": "3b Epsilon Blend - SDXL two styles in one image.json",
    "MultiCond_CrossAttnBlend": "3c Cross-Attention Blend - SD1.5 two styles in one image.json",
    "MultiCond_SpatialGuidance": "4a Spatial Guidance - SD1.5 cat left of dog.json",
    "MultiCond_MaskedAdapter": "5a Masked Adapter - SD1.5 canny edges only in a box.json",
}
MASK_WORKFLOW = WIRING["MultiCond_MaskedAdapter"]


# ---------------------------------------------------------------- computed pictures

def layer_balance_preview() -> Image.Image:
    """The preview output for a grading computed on the tiny SDXL-shaped UNet, and for IPAdapter's style blocks."""
    from multicond.core.balance import Grading, graded_selection, style_layer_count
    from multicond.core.diffusers_binding.analysis import Series, analyze_jobs, grade_series
    from multicond.core.diffusers_binding.style_aligned import unet_layout
    from multicond.core.diffusers_binding.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    series = Series("a rabbit", "a dark brown rabbit", ("in Van Gogh style", "in Monet style", "in Seurat style"), 2)
    stats = analyze_jobs(pipe, series, series.jobs, steps=50)  # the paper's 50 steps: columns 981 ... 1
    full = grade_series(stats, "tiny")
    grading = Grading(full.family, full.layers, full.timesteps, {f: full.grades[f] for f in "qk"}, full.name)  # q, k
    layout = unet_layout(pipe.unet)
    count = style_layer_count(0.43, len(layout.layers), "LayerBalance")
    selection = graded_selection(grading, count)
    # As LayerBalance.execute: columns are the graded timesteps, noisiest first; rows the model's layers.
    graded = layers.selection_chart(selection, layout.layers, sorted(selection.schedule, reverse=True))
    sdxl_blocks = layers.select_blocks(layers.SDXL, "output.1")  # the style-blocks preset on SDXL (nodes/balance.py)
    static = layers.selection_chart(sdxl_blocks, layers.SDXL.layers, inversion.ddim_timesteps(50), cell=3)

    def as_image(chart: torch.Tensor) -> Image.Image:
        return Image.fromarray((chart * 255).round().byte().numpy(), "RGB")

    panels = [(as_image(graded), [f"source grading, lambda_s 0.43: {count} of {len(layout.layers)} layers per step",
                                  "tiny random SDXL-shaped UNet; its grading computed",
                                  "here by analyze (3 styles x 2 samples, 50 steps)"], layout.layers),
              (as_image(static), ["source preset, 'style blocks (IPAdapter)' on SDXL:",
                                  (f"output.1, {len(sdxl_blocks.layers)} of {len(layers.SDXL.layers)} layers, the "
                                   "same at every step; the style"),
                                  "nodes' own q/k/v switches decide what they do there"],
               layers.SDXL.layers)]
    width = 40 + sum(max(panel.width + 110, 330) + 40 for panel, *_ in panels)
    height = 80 + max(panel.height for panel, *_ in panels) + 80
    image = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(image)
    x = 20
    for panel, notes, rows in panels:
        top = 76
        for line, note in enumerate(notes):
            d.text((x, 8 + 18 * line), note, fill=INK if line == 0 else MUTED, font=font(12 if line == 0 else 11))
        image.paste(panel, (x + 110, top))
        d.rectangle([x + 109, top - 1, x + 110 + panel.width, top + panel.height], outline=MUTED)
        cell = panel.height / len(rows)
        step = max(1, math.ceil(12 / cell))
        for i in range(0, len(rows), step):
            label = layers.LayerId.__str__(rows[i])
            d.text((x + 104 - text_width(d, label, 10), top + i * cell + cell / 2 - 6), label, fill=MUTED,
                   font=font(10))
        d.text((x + 110, top + panel.height + 4), "t = 981", fill=MUTED, font=font(10))
        d.text((x + 110 + panel.width - text_width(d, "1", 10), top + panel.height + 4), "1", fill=MUTED, font=font(10))
        d.text((x + 110, top + panel.height + 18), "timestep (noisiest left)", fill=INK, font=font(11))
        x += max(panel.width + 110, 330) + 40
    legend_items = [("AdaIN on q", (255, 0, 0)), ("AdaIN on k", (0, 0, 255)), ("q and k", (255, 0, 255)),
                    ("q, k, v allowed", (255, 255, 255)), ("off", (0, 0, 0))]
    lx, ly = 20, height - 26
    for label, colour in legend_items:
        d.rectangle([lx, ly, lx + 14, ly + 14], fill=colour, outline=MUTED)
        d.text((lx + 20, ly), label, fill=INK, font=font(11))
        lx += 20 + text_width(d, label, 11) + 18
    return image


def epsilon_profile() -> Image.Image:
    """Epsilon Blend's weight of the first prompt across a 1344x768 image (latent 168x96) at the node defaults."""
    height, width = 96, 168
    sigmoid = blend.profile_weights(blend.Profile("sigmoid", 20.0), height, width)
    image = Image.new("RGB", (800, 470), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((20, 10), "Epsilon Blend, defaults: profile sigmoid, sharpness 20, direction left to right, center 0.5",
           fill=INK, font=font(13))
    d.text((20, 30), "first prompt's weight w at every latent pixel of a 1344x768 image (168x96 latent); "
                     "computed by core/blend.py", fill=MUTED, font=font(11))
    strip = weight_image(sigmoid).resize((504, 288), Image.NEAREST)
    image.paste(strip, (60, 56))
    d.text((66, 62), "first (w = 1)", fill=(255, 255, 255), font=font(12))
    d.text((60 + 504 - 6 - text_width(d, "second (w = 0)", 12), 62), "second (w = 0)", fill=(255, 255, 255),
           font=font(12))
    axes = Axes(d, 60, 372, 504, 60, 0.0, 1.0, 0.0, 1.0)
    xs = [i / (width - 1) for i in range(width)]
    profiles = [("sigmoid, sharpness 20", blend.Profile("sigmoid", 20.0), FIRST_COLOUR),
                ("linear, ramp_width 1", blend.Profile("linear"), (90, 90, 90)),
                ("cosine, ramp_width 1", blend.Profile("cosine"), (60, 160, 90))]
    axes.frame([0, 0.25, 0.5, 0.75, 1], [0, 1], "position across the image (0 = left edge, 1 = right edge)", "w")
    for _, profile, colour in profiles:
        axes.curve(xs, blend.profile_weights(profile, 1, width)[0].tolist(), colour)
    legend(d, 590, 360, [(label, colour) for label, _, colour in profiles])
    return image


def cross_attention_layers() -> Image.Image:
    """Cross-Attention Blend's weight at each cross-attention layer's own size (SD1.5, 768x512, defaults)."""
    latent = (64, 96)
    sizes = [(64, 96), (32, 48), (16, 24), (8, 12)]
    profile = blend.Profile("sigmoid", 30.0)
    image = Image.new("RGB", (760, 300), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((20, 10), "Cross-Attention Blend, defaults: sigmoid, sharpness 30, left to right: the weight per image "
                     "token", fill=INK, font=font(13))
    d.text((20, 30), "evaluated on each layer's own grid (SD1.5 at 768x512: 96x64 latent, layers at 1/1, 1/2, 1/4, "
                     "1/8); computed by core/blend.py", fill=MUTED, font=font(11))
    x = 20
    for size in sizes:
        weights = blend.layer_weights(profile, latent, size)[0]
        panel = weight_image(weights).resize((168, 112), Image.NEAREST)
        image.paste(panel, (x, 70))
        d.rectangle([x - 1, 69, x + 168, 182], outline=MUTED)
        d.text((x, 188), f"layer {size[1]}x{size[0]} tokens", fill=INK, font=font(12))
        x += 184
    axes = Axes(d, 60, 222, 420, 44, 0.0, 1.0, 0.0, 1.0)
    axes.frame([0, 0.5, 1], [0, 1], "position across the image", "w")
    xs = [i / 95 for i in range(96)]
    axes.curve(xs, blend.profile_weights(profile, 1, 96)[0].tolist(), FIRST_COLOUR)
    axes.curve(xs, blend.profile_weights(blend.Profile("sigmoid", 20.0), 1, 96)[0].tolist(), (150, 150, 150))
    legend(d, 510, 220, [("sharpness 30 (this node)", FIRST_COLOUR), ("sharpness 20 (Epsilon Blend)", (150, 150, 150))])
    return image


def gaussian_map(cx: float, cy: float, spread: float, size: int = spatial.MAP_SIZE) -> torch.Tensor:
    ys = torch.linspace(0, 1, size)[:, None]
    xs = torch.linspace(0, 1, size)[None, :]
    return torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * spread**2))


def spatial_relation() -> Image.Image:
    """Two synthetic maps, their centroids, d for "A left of B" and the hinge phi(alpha (margin - d)), node defaults."""
    settings = spatial.SpatialSettings()  # the node defaults: left of, gelu, alpha 0.75, margin 0.25
    map_a = gaussian_map(0.62, 0.55, 0.10)  # "cat": placed right of the dog, so the relation does not hold yet
    map_b = gaussian_map(0.40, 0.50, 0.13)  # "dog"
    ax, ay, var_a = spatial.centroid_and_variance(map_a)
    bx, by, var_b = spatial.centroid_and_variance(map_b)
    d_now = float(spatial.relation_distance(settings.relation, (ax, ay), (bx, by)))
    image = Image.new("RGB", (800, 420), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((20, 10), "Spatial Guidance: \"a cat to the left of a dog\" "
                     "(object A = cat, relation left of, object B = dog)",
           fill=INK, font=font(13))
    d.text((20, 30), "SYNTHETIC maps (two Gaussians), not a model's attention; centroids, d and the loss from "
                     "core/spatial.py at the node defaults", fill=MUTED, font=font(11))
    side = 300
    a = (map_a / map_a.max()).clamp(0, 1)
    b = (map_b / map_b.max()).clamp(0, 1)
    rgb = torch.ones(spatial.MAP_SIZE, spatial.MAP_SIZE, 3)
    for weight, colour in ((a, FIRST_COLOUR), (b, SECOND_COLOUR)):
        c = torch.tensor(colour, dtype=torch.float32) / 255
        rgb = rgb * (1 - 0.75 * weight[..., None]) + 0.75 * weight[..., None] * c
    maps = Image.fromarray((rgb * 255).round().byte().numpy(), "RGB").resize((side, side), Image.BILINEAR)
    left, top = 20, 56
    image.paste(maps, (left, top))
    d.rectangle([left - 1, top - 1, left + side, top + side], outline=MUTED)

    def mark(x: float, y: float, colour, label: str) -> tuple[float, float]:
        px, py = left + x * (side - 1), top + y * (side - 1)
        d.line([(px - 7, py), (px + 7, py)], fill=colour, width=3)
        d.line([(px, py - 7), (px, py + 7)], fill=colour, width=3)
        d.text((px + 8, py - 20), label, fill=INK, font=font(12))
        return px, py

    pa = mark(float(ax), float(ay), (160, 70, 0), "cat")
    pb = mark(float(bx), float(by), (20, 70, 150), "dog")
    y_arrow = top + side - 30
    d.line([(pa[0], y_arrow), (pb[0], y_arrow)], fill=INK, width=2)
    d.line([(pa[0], y_arrow - 6), (pa[0], y_arrow + 6)], fill=INK, width=2)
    d.line([(pb[0], y_arrow - 6), (pb[0], y_arrow + 6)], fill=INK, width=2)
    d.text((min(pa[0], pb[0]), y_arrow - 20), f"d = x_dog - x_cat = {d_now:+.2f}", fill=INK, font=font(12))
    d.text((left, top + side + 6), f"var_cat {float(var_a):.3f}, var_dog {float(var_b):.3f} (image width = 1)",
           fill=MUTED, font=font(11))
    axes = Axes(d, 400, 80, 350, 230, -1.0, 1.0, -0.2, 1.0)
    axes.frame([-1, -0.5, 0, 0.25, 0.5, 1], [0, 0.5, 1], "d (positive: the relation holds)",
               "L_spatial = gelu(0.75 (0.25 - d))")
    ds = [i / 100 - 1 for i in range(201)]
    losses = spatial.spatial_term(torch.tensor(ds), settings).tolist()
    axes.curve(ds, losses, (90, 90, 90))
    loss_now = float(spatial.spatial_term(torch.tensor(d_now), settings))
    px, py = axes.px(d_now, loss_now)
    d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=FIRST_COLOUR)
    d.text((px + 8, py - 16), f"now: {loss_now:.3f}", fill=INK, font=font(12))
    mx, _ = axes.px(settings.margin, 0)
    d.text((mx + 4, axes.top + 4), "margin", fill=MUTED, font=font(11))
    for line, note in enumerate(["The gradient of this loss (plus the variance terms) with respect",
                                 "to the latent moves the cat's centroid left of the dog's, until",
                                 "they are at least the margin apart."]):
        d.text((400, 356 + 14 * line), note, fill=MUTED, font=font(11))
    return image


def workflow_mask(path: Path) -> torch.Tensor:
    """The MASK the workflow feeds Masked Adapter: SolidMask (value, width, height) -> MaskComposite (x, y, "add")."""
    workflow = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    source_of = {(link[3], link[4]): link[1] for link in workflow["links"]}

    def build(node_id: int) -> torch.Tensor:
        node = nodes[node_id]
        values = node["widgets_values"]
        if node["type"] == "SolidMask":
            return torch.full((int(values[2]), int(values[1])), float(values[0]))
        if node["type"] == "MaskComposite" and values[2] == "add":
            destination, source = build(source_of[(node_id, 0)]), build(source_of[(node_id, 1)])
            x, y = int(values[0]), int(values[1])
            out = destination.clone()
            region = out[y:y + source.shape[0], x:x + source.shape[1]]
            region += source[:region.shape[0], :region.shape[1]]
            return out.clamp(0, 1)
        raise ValueError(f"{path.name}: the mask comes from a {node['type']} this script does not draw")

    adapter_node = next(n["id"] for n in workflow["nodes"] if n["type"] == "MultiCond_MaskedAdapter")
    mask_slot = next(i for i, slot in enumerate(nodes[adapter_node]["inputs"]) if slot["name"] == "mask")
    return build(source_of[(adapter_node, mask_slot)])


def masked_adapter_mask() -> Image.Image:
    """The example workflow's effect mask at each residual size of a 512x512 SD1.5 image, hard and feathered."""
    mask = workflow_mask(WORKFLOWS / MASK_WORKFLOW)
    sizes = [64, 32, 16, 8]
    image = Image.new("RGB", (770, 430), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((20, 10), "Masked Adapter: the effect mask resized to each residual's size (white = the control acts there)",
           fill=INK, font=font(13))
    d.text((20, 30), f"the mask of \"{Path(MASK_WORKFLOW).stem}\" ({mask.shape[1]}x{mask.shape[0]}); residual "
                     "sizes of a 512x512 SD1.5 image; core/adapter.py", fill=MUTED, font=font(11))
    rows = [("resize nearest, feather 0 (defaults)", "nearest", 0.0), ("resize nearest, feather 24", "nearest", 24.0)]
    top = 60
    for label, mode, feather in rows:
        d.text((20, top), label, fill=INK, font=font(12))
        x = 20
        source = Image.fromarray((mask * 255).byte().numpy(), "L").resize((150, 150), Image.BILINEAR)
        image.paste(source.convert("RGB"), (x, top + 20))
        d.rectangle([x - 1, top + 19, x + 150, top + 170], outline=MUTED)
        d.text((x, top + 174), f"mask {mask.shape[1]}x{mask.shape[0]}", fill=MUTED, font=font(11))
        x += 170
        for size in sizes:
            resized = adapter.resize_mask(mask, (size, size), mode, feather)[0, 0]
            levels = (resized.clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(levels, "L").resize((130, 130), Image.NEAREST)
            image.paste(tile.convert("RGB"), (x, top + 30))
            d.rectangle([x - 1, top + 29, x + 130, top + 160], outline=MUTED)
            d.text((x, top + 164), f"{size}x{size} residual", fill=MUTED, font=font(11))
            x += 146
        top += 185
    return image


def style_reference_pins() -> Image.Image:
    """Which inverted latent the reference row is pinned to at each of 50 sampling steps, offset 5 (the default)."""
    steps, offset = 50, inversion.PIN_OFFSET
    image = Image.new("RGB", (620, 330), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((20, 10), f"Style Reference Image: the reference row at each sampling step (inversion_steps {steps}, "
                     f"offset {offset})", fill=INK, font=font(13))
    d.text((20, 30), "computed by core/inversion.py (pinned_step); with 50 ddim_uniform steps the sampler's steps "
                     "are the inversion's", fill=MUTED, font=font(11))
    axes = Axes(d, 70, 70, 330, 200, 0, steps - 1, 0, steps)
    axes.frame([0, 10, 20, 30, 40, 49], [0, 10, 20, 30, 40, 50], "sampling step", "inverted latent held (0 = noisiest)")
    xs = list(range(steps))
    axes.curve(xs, xs, (190, 190, 190), width=1)
    axes.curve(xs, [inversion.pinned_step(s, offset) for s in xs], FIRST_COLOUR, width=3)
    legend(d, 420, 80, [("pinned_step(step, 5)", FIRST_COLOUR), ("same step (no offset)", (190, 190, 190))])
    d.text((420, 130), "The reference starts 5 inversion", fill=MUTED, font=font(11))
    d.text((420, 144), "steps below pure noise and follows", fill=MUTED, font=font(11))
    d.text((420, 158), "the inverted trajectory from step 6.", fill=MUTED, font=font(11))
    return image


COMPUTED = {
    "MultiCond_LayerBalance_preview.png": layer_balance_preview,
    "MultiCond_EpsilonBlend_profile.png": epsilon_profile,
    "MultiCond_CrossAttnBlend_layers.png": cross_attention_layers,
    "MultiCond_SpatialGuidance_relation.png": spatial_relation,
    "MultiCond_MaskedAdapter_mask.png": masked_adapter_mask,
    "MultiCond_StyleReference_pins.png": style_reference_pins,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="file names to make (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    titles = pack_titles()
    missing = sorted(set(WIRING) - set(titles))
    if missing:
        raise SystemExit(f"no display_name found in nodes/*.py for {missing}")
    jobs: dict[str, Callable[[], Image.Image]] = {
        f"{node}.png": (lambda node=node, name=name: draw_workflow(WORKFLOWS / name, node, titles))
        for node, name in WIRING.items()}
    jobs.update(COMPUTED)
    for name, make in jobs.items():
        if args.only and name not in args.only:
            continue
        path = save(make(), name)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
