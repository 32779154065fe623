"""Draw the input images the example workflows load (example_inputs/), deterministically.

    python scripts/make_example_inputs.py [--out example_inputs]

Each picture is drawn here from shapes and a seeded random pattern, nothing is copied from elsewhere:

* multicond_living_room.png - a living room with a large window in the centre, clean outlines for the canny
  edges of the Masked Adapter workflows (their mask is the centred box around the window);
* multicond_car_and_house.png - a toy car on the left and a house on the right, the structure image of the
  ControlNet workflows (the composed one masks the ControlNet to the left half: the car);
* multicond_stained_glass.png - an abstract stained glass window (seeded Voronoi cells with dark leading), the
  style reference of the StyleAligned reference-image workflow.

The pack copies the files into ComfyUI's input folder when it loads (nodes/assets.py), where LoadImage lists them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 1024  # pixels: SDXL's native size; the SD1.5 workflows' ControlNet resizes the hint to their latent
OUTLINE = (58, 47, 40)
LINE = 6  # outline width: clear canny edges after resizing to 512
GLASS_CELLS = 90
GLASS_SEED = 20240611
GLASS_LEADING = 4  # half-width of the dark lines between the glass cells
GLASS_PALETTE = ((176, 32, 48), (32, 72, 160), (236, 184, 40), (40, 132, 72), (120, 48, 140), (220, 110, 36),
                 (60, 160, 190), (200, 200, 170))
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "example_inputs"


def living_room(size: int = SIZE) -> Image.Image:
    """Back wall, side walls, floor, a large centred window with curtains, a sofa, a floor lamp and a rug."""
    image = Image.new("RGB", (size, size), (243, 234, 216))
    draw = ImageDraw.Draw(image)
    s = size / 1024  # all coordinates below are on a 1024 grid
    box = lambda *xy: [round(v * s) for v in xy]  # noqa: E731 - a scaled coordinate list
    width = max(2, round(LINE * s))
    draw.polygon(box(0, 0, 120, 120, 120, 760, 0, 1024), fill=(222, 208, 184), outline=OUTLINE, width=width)
    draw.polygon(box(1024, 0, 904, 120, 904, 760, 1024, 1024), fill=(222, 208, 184), outline=OUTLINE, width=width)
    draw.polygon(box(0, 1024, 120, 760, 904, 760, 1024, 1024), fill=(196, 156, 116), outline=OUTLINE, width=width)
    draw.line(box(120, 120, 904, 120), fill=OUTLINE, width=width)
    draw.rectangle(box(330, 230, 694, 600), fill=(188, 220, 240), outline=OUTLINE, width=2 * width)
    draw.line(box(512, 230, 512, 600), fill=OUTLINE, width=width)
    draw.line(box(330, 415, 694, 415), fill=OUTLINE, width=width)
    draw.rectangle(box(310, 600, 714, 628), fill=(236, 226, 206), outline=OUTLINE, width=width)
    for side in (-1, 1):  # curtains: a wavy inner edge on each side of the window
        x0 = 512 + side * 182
        edge = [(x0 + side * (40 + 14 * np.sin(y / 38)), y) for y in range(200, 660, 20)]
        outer = [(x0 + side * 120, 660), (x0 + side * 120, 200)]
        draw.polygon([(round(x * s), round(y * s)) for x, y in edge + outer], fill=(176, 74, 60), outline=OUTLINE,
                     width=width)
    draw.rounded_rectangle(box(150, 560, 520, 680), radius=round(30 * s), fill=(92, 120, 150), outline=OUTLINE,
                           width=width)
    draw.rounded_rectangle(box(130, 650, 540, 800), radius=round(24 * s), fill=(108, 138, 170), outline=OUTLINE,
                           width=width)
    draw.line(box(335, 680, 335, 800), fill=OUTLINE, width=width)
    draw.line(box(820, 470, 820, 790), fill=OUTLINE, width=width)
    draw.polygon(box(770, 470, 870, 470, 845, 390, 795, 390), fill=(246, 214, 140), outline=OUTLINE, width=width)
    draw.ellipse(box(780, 780, 860, 810), fill=(90, 80, 70), outline=OUTLINE, width=width)
    draw.ellipse(box(300, 830, 760, 950), fill=(170, 60, 52), outline=OUTLINE, width=width)
    draw.ellipse(box(380, 860, 680, 920), outline=OUTLINE, width=width)
    return image


def car_and_house(size: int = SIZE) -> Image.Image:
    """A red toy car standing on the left half and a wooden house on the right half, on a green ground."""
    image = Image.new("RGB", (size, size), (232, 240, 248))
    draw = ImageDraw.Draw(image)
    s = size / 1024
    box = lambda *xy: [round(v * s) for v in xy]  # noqa: E731 - a scaled coordinate list
    width = max(2, round(LINE * s))
    draw.rectangle(box(0, 780, 1024, 1024), fill=(185, 211, 160))
    draw.line(box(0, 780, 1024, 780), fill=OUTLINE, width=width)
    draw.polygon(box(150, 580, 210, 470, 380, 470, 440, 580), fill=(217, 70, 59), outline=OUTLINE, width=width)
    draw.polygon(box(225, 570, 265, 495, 310, 495, 310, 570), fill=(188, 220, 240), outline=OUTLINE, width=width)
    draw.polygon(box(330, 570, 330, 495, 368, 495, 408, 570), fill=(188, 220, 240), outline=OUTLINE, width=width)
    draw.rounded_rectangle(box(70, 570, 480, 710), radius=round(28 * s), fill=(217, 70, 59), outline=OUTLINE,
                           width=width)
    draw.rectangle(box(60, 640, 90, 670), fill=(246, 214, 140), outline=OUTLINE, width=width)
    for x in (170, 380):  # wheels with hubs
        draw.ellipse(box(x - 62, 668, x + 62, 792), fill=(50, 50, 56), outline=OUTLINE, width=width)
        draw.ellipse(box(x - 24, 706, x + 24, 754), fill=(200, 200, 206), outline=OUTLINE, width=width)
    draw.rectangle(box(860, 280, 905, 390), fill=(150, 90, 70), outline=OUTLINE, width=width)
    draw.polygon(box(550, 440, 760, 250, 970, 440), fill=(139, 74, 43), outline=OUTLINE, width=width)
    draw.rectangle(box(585, 440, 935, 780), fill=(200, 146, 90), outline=OUTLINE, width=width)
    draw.rectangle(box(720, 620, 800, 780), fill=(120, 70, 40), outline=OUTLINE, width=width)
    draw.ellipse(box(778, 696, 790, 708), fill=OUTLINE)
    for x in (615, 835):  # two cross-barred windows
        draw.rectangle(box(x, 500, x + 70, 580), fill=(188, 220, 240), outline=OUTLINE, width=width)
        draw.line(box(x + 35, 500, x + 35, 580), fill=OUTLINE, width=width)
        draw.line(box(x, 540, x + 70, 540), fill=OUTLINE, width=width)
    return image


def nearest_seed(size: int, seeds: np.ndarray) -> np.ndarray:
    """Voronoi labels: for every pixel the index of its nearest seed point."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    best = np.full((size, size), np.inf, dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.int32)
    for index, (x, y) in enumerate(seeds):
        distance = (xs - x) ** 2 + (ys - y) ** 2
        closer = distance < best
        best[closer], labels[closer] = distance[closer], index
    return labels


def boundaries(labels: np.ndarray) -> np.ndarray:
    """True where a pixel's right or lower neighbour belongs to another cell."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by `radius` pixels in x and y (a square structuring element, no wrap-around)."""
    grown = mask.copy()
    for _ in range(radius):
        step = grown.copy()
        step[1:, :] |= grown[:-1, :]
        step[:-1, :] |= grown[1:, :]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def stained_glass(size: int = SIZE, cells: int = GLASS_CELLS, seed: int = GLASS_SEED) -> Image.Image:
    """Flat-coloured glass cells of a seeded Voronoi diagram, dark leading between them and a dark frame."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, size=(cells, 2)).astype(np.float32)
    colours = np.array(GLASS_PALETTE, dtype=np.uint8)[rng.integers(0, len(GLASS_PALETTE), size=cells)]
    labels = nearest_seed(size, seeds)
    pixels = colours[labels]
    leading = dilate(boundaries(labels), GLASS_LEADING)
    frame = max(4, size // 64)
    leading[:frame], leading[-frame:], leading[:, :frame], leading[:, -frame:] = True, True, True, True
    pixels[leading] = (28, 24, 22)
    return Image.fromarray(pixels, "RGB")


EXAMPLE_INPUTS: dict[str, Callable[[], Image.Image]] = {
    "multicond_living_room.png": living_room,
    "multicond_car_and_house.png": car_and_house,
    "multicond_stained_glass.png": stained_glass,
}


def write_inputs(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in EXAMPLE_INPUTS.items():
        path = out / name
        draw().save(path, optimize=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the PNGs to")
    for path in write_inputs(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
