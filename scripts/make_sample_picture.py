"""Draw examples/sample.png: a house, a tree and the sun on a meadow, made offline with PIL.

The picture the README's examples ask about. Drawn rather than photographed so that the
project ships no third-party image; kept small (a 64-colour palette, well under 50 KB).

    python scripts/make_sample_picture.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (480, 320)


def draw() -> Image.Image:
    image = Image.new("RGB", SIZE, (135, 200, 245))  # sky
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, 220, 480, 320), fill=(90, 170, 70))  # meadow
    pen.ellipse((380, 25, 450, 95), fill=(255, 210, 40))  # sun
    for dx, dy in ((0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)):
        pen.line((415 + 45 * dx, 60 + 45 * dy, 415 + 60 * dx, 60 + 60 * dy), fill=(255, 210, 40), width=4)
    pen.rectangle((140, 150, 290, 260), fill=(225, 95, 70), outline=(90, 40, 30), width=3)  # walls
    pen.polygon([(125, 152), (215, 80), (305, 152)], fill=(120, 60, 40))  # roof
    pen.rectangle((195, 200, 235, 260), fill=(110, 70, 40))  # door
    pen.ellipse((224, 228, 230, 234), fill=(240, 200, 80))  # door knob
    for x in (155, 250):  # windows with crossbars
        pen.rectangle((x, 170, x + 30, 195), fill=(200, 230, 255), outline=(255, 255, 255), width=3)
        pen.line((x + 15, 170, x + 15, 195), fill=(255, 255, 255), width=2)
    pen.rectangle((60, 170, 76, 262), fill=(110, 75, 45))  # tree trunk
    for box in ((25, 95, 110, 180), (40, 70, 100, 130), (15, 125, 70, 175), (65, 120, 120, 175)):
        pen.ellipse(box, fill=(40, 130, 50))  # crown
    pen.rectangle((330, 258, 470, 262), fill=(150, 120, 90))  # a path to the edge
    pen.text((12, 296), "a house, a tree and the sun", fill=(255, 255, 255))
    return image.quantize(64)


def main() -> None:
    out = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "examples/sample.png"
    )
    draw().save(out, optimize=True)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
