"""A seeded image dataset tunelab draws itself: scenes of coloured shapes on a 2x2 grid.

Each scene holds 1-3 shapes (circle, square, triangle in red, green, blue, yellow) in distinct
cells. Per scene: one question of each type — ``count`` ("How many shapes are there?"),
``colour`` (the colour at a position), ``shape`` (the shape at a position), ``yesno`` ("Is there
a blue triangle?", "yes" for every other scene) — and a templated ``report`` ("Findings: ...").
The test split is made of scenes holding at least one colour-shape combination that no
training scene has, so a model must read the image rather than recall scenes. Nothing is
downloaded; the same seed draws the same pixels.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.errors import TunelabError

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 70), "blue": (45, 75, 215), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "square")}
"""Colour-shape combinations that appear only in test scenes."""
SIZE = 224
QUESTION_TYPES = ("count", "colour", "shape", "yesno", "report")


def _draw(objects: list[tuple[str, str, int]], rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    for shape, colour, cell in objects:
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        r = rng.randint(28, 40)
        cx, cy = x0 + half // 2 + rng.randint(-8, 8), y0 + half // 2 + rng.randint(-8, 8)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _scene(rng: random.Random, test: bool) -> list[tuple[str, str, int]]:
    while True:
        cells = rng.sample(range(4), rng.randint(1, 3))
        objects = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), cell) for cell in sorted(cells)]
        held = any((c, s) in HELD_OUT for s, c, _ in objects)
        if held == test:
            return objects


def report(objects: list[tuple[str, str, int]]) -> str:
    """The templated findings of a scene, cells in reading order."""
    parts = [f"{CELLS[cell]}: {colour} {shape}" for shape, colour, cell in objects]
    return f"Findings: {len(objects)} shape{'s' if len(objects) > 1 else ''}. " + "; ".join(parts) + "."


def questions(objects: list[tuple[str, str, int]], rng: random.Random, test: bool = False, yes: bool = True
              ) -> list[tuple[str, str, str]]:
    """``(type, question, answer)`` for one scene; ``yes``: the yes/no question asks of a shape the
    scene holds, else of one it does not (``test``: a test scene, which may be asked of a held-out
    combination)."""
    shape, colour, cell = rng.choice(objects)
    there = {(s, c) for s, c, _ in objects}
    # build_shapes alternates yes and no: asked at random, ~83% would be "no", the score of a model
    # that never looked. Training scenes are never asked of a held-out combination: it would be
    # "no" every time, a prior the test scenes contradict.
    if yes:
        ask_shape, ask_colour, _ = rng.choice(objects)
    else:
        ask_shape, ask_colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in there
                                            and (test or (c, s) not in HELD_OUT)])
    present = (ask_shape, ask_colour) in there
    return [
        ("count", "How many shapes are there?", str(len(objects))),
        ("colour", f"What colour is the shape in the {CELLS[cell]}?", colour),
        ("shape", f"What shape is in the {CELLS[cell]}?", shape),
        ("yesno", f"Is there a {ask_colour} {ask_shape}?", "yes" if present else "no"),
        ("report", "Describe the findings.", report(objects)),
    ]


def build_shapes(out: str | Path, n_train: int = 200, n_test: int = 40, seed: int = 0,
                 views: int = 1) -> dict[str, Path]:
    """Draw the scenes into ``out/images`` and write ``out/train.jsonl`` and ``out/test.jsonl``.

    Rows are openai-style ``messages`` with an ``images`` list (relative to ``out``) and the
    question ``type``; returns the two file paths. ``views=2`` draws every scene twice (the
    shapes placed anew within their cells) and puts both views side by side in each question,
    R2GenGPT's two-view input (``model.vision.multi_image: mean``).
    """
    from tunelab.io import write_jsonl

    if views < 1:
        raise TunelabError(f"views: must be at least 1, got {views}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(count):
            objects = _scene(rng, split == "test")
            names = [f"images/{split}_{i:04d}.png" if views == 1 else f"images/{split}_{i:04d}_v{v}.png"
                     for v in range(views)]
            for name in names:
                _draw(objects, rng).save(out / name)
            for kind, question, answer in questions(objects, rng, split == "test", yes=i % 2 == 0):
                rows.append({"messages": [{"role": "user", "content": "<image>" * views + question},
                                          {"role": "assistant", "content": answer}],
                             "images": names, "type": kind})
        paths[split] = write_jsonl(out / f"{split}.jsonl", rows)
    return paths


def without_images(path: str | Path, out: str | Path) -> Path:
    """The same rows with the images and their placeholders removed (the text-only baseline's data)."""
    from tunelab.io import write_jsonl

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row.pop("images", None)
        for message in row["messages"]:
            message["content"] = message["content"].replace("<image>", "")
    return write_jsonl(out, rows)
