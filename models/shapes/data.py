"""Synthetic "one coloured shape on a noisy grey background" images with questions and captions.

Everything is drawn from a `numpy.random.Generator`, so a seed fully determines the pixels,
questions and answers. Training and held-out evaluation use different seeds.

Answers come in two forms (`ANSWER_FORMS`):

    question   base (the trained LLaVA)      terse (the LoRA adapter in weights/lora-terse)
    shape      a circle                      circle
    color      red                           circle red
    position   left                          circle left
    describe   a red circle on the left      circle red left

A terse answer is the shape, then the attribute asked about (all three for describe: shape,
colour, position), with no articles or prepositions; no terse answer equals a base answer. It
uses only words the base model already answers with: the word-level tokenizer has no comma, and
a word the base never produced (say "color") keeps a near-zero output weight that a LoRA on the
language model's projections cannot lift (such a first answer token stayed at p ~0.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

QUESTION_TYPES = ("shape", "color", "position", "describe")

SHAPES = ("circle", "square", "triangle", "cross")
# Saturated and far apart in RGB so that colour is unambiguous after resizing and noise, and
# none of them is close to the grey background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
# Shape centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# The first question of each type is the canonical one; the others are accepted paraphrases.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is this?", "What is the shape?", "Which shape is it?"),
    "color": ("What color is the shape?", "What colour is it?", "Which color is it?"),
    "position": ("Where is the shape?", "Where is it?"),
    "describe": ("Describe the image.", "What is in the image?"),
}
# Seed of the held-out set used by tests and the `eval` commands; training seeds must differ.
HELD_OUT_SEED = 20_240_917


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    caption: str
    # What was drawn, so an answer can be put in another form (`in_form`).
    shape: str = ""
    color: str = ""
    position: str = ""


def caption(shape: str, color: str, position: str) -> str:
    where = "in the center" if position == "center" else f"on the {position}"
    return f"a {color} {shape} {where}"


def answer(qtype: str, shape: str, color: str, position: str) -> str:
    if qtype == "shape":
        return f"a {shape}"
    if qtype == "color":
        return color
    if qtype == "position":
        return position
    if qtype == "describe":
        return caption(shape, color, position)
    raise ValueError(f"unknown question type {qtype!r}")


def terse_answer(qtype: str, shape: str, color: str, position: str) -> str:
    """The LoRA adapter's form: "circle", "circle red", "circle left", "circle red left"."""
    if qtype == "describe":
        return f"{shape} {color} {position}"
    attribute = {"shape": None, "color": color, "position": position}
    if qtype not in attribute:
        raise ValueError(f"unknown question type {qtype!r}")
    value = attribute[qtype]
    return shape if value is None else f"{shape} {value}"


AnswerFn = Callable[[str, str, str, str], str]
# Answer form name -> answer(qtype, shape, color, position).
ANSWER_FORMS: dict[str, AnswerFn] = {"base": answer, "terse": terse_answer}


def in_form(sample: Sample, form: str) -> Sample:
    """The same image and question with the answer in another form (see the module docstring)."""
    if form not in ANSWER_FORMS:
        raise ValueError(f"answer form must be one of {sorted(ANSWER_FORMS)}, not {form!r}")
    if not sample.shape:
        raise ValueError("the sample does not record what was drawn (shape, color, position)")
    fields = (sample.qtype, sample.shape, sample.color, sample.position)
    return replace(sample, answer=ANSWER_FORMS[form](*fields))


def all_captions() -> list[str]:
    """Every caption the generator can produce: the candidate set for retrieval."""
    return [caption(s, c, p) for s in SHAPES for c in COLORS for p in POSITIONS]


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def render(
    shape: str, color: str, position: str, size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw one shape on a `size` x `size` noisy grey background."""
    grey = rng.uniform(100, 160)
    # Grey (channel-equal) noise keeps the background colourless, so colour only comes from
    # the shape.
    noise = rng.normal(0.0, 12.0, size=(size, size, 1))
    background = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(background)

    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.03, 0.03)) * size
    cy = (fy + rng.uniform(-0.03, 0.03)) * size
    # Radius 5.4-7 px at 32 px: smaller shapes leave circle/square/cross too few pixels apart
    # for the 4-px patches (shape accuracy stalled around 70% at 4-6 px).
    r = rng.uniform(0.17, 0.22) * size
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.3  # thin arms keep the cross distinct from a circle at 4-px patches
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def random_sample(
    rng: np.random.Generator, qtype: str, size: int, *, paraphrase: bool = True
) -> Sample:
    """One sample of the given question type with a random shape, colour and position."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    questions = QUESTIONS[qtype]
    question = questions[rng.integers(len(questions))] if paraphrase else questions[0]
    return Sample(
        image=render(shape, color, position, size, rng),
        question=question,
        answer=answer(qtype, shape, color, position),
        qtype=qtype,
        caption=caption(shape, color, position),
        shape=shape,
        color=color,
        position=position,
    )


def make_samples(n: int, seed: int, size: int = 32, form: str = "base") -> list[Sample]:
    """`n` samples cycling through the question types, so the set is balanced; answers in
    `form` (the same images and questions for every form)."""
    rng = np.random.default_rng(seed)
    samples = [
        random_sample(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)], size) for i in range(n)
    ]
    return samples if form == "base" else [in_form(s, form) for s in samples]
