"""Synthetic visual question answering: coloured shapes in the quadrants of a small image.

A scene puts one to four shapes, of different kinds and colours, in different quadrants of a dark image. Questions
ask for the number of shapes or a short caption (any scene), or for the color, kind and position of the shape (scenes
with one shape); every answer is one short phrase from a small vocabulary ("red", "circle", "top left", "3", "a red
circle in the top left", "3 shapes"), so exact match is a fair score. Each question type is asked in several
phrasings: training draws from `TRAIN_PHRASINGS`, and `HELDOUT_PHRASINGS` are never trained on, so that the tests can
ask questions the model has not seen worded that way. Generation is deterministic given a seed, and the held-out
split draws from a different random stream than the training split. The bundled demo checkpoint
(`examples/train_demo.py`) is trained on this data.

Questions that pick one shape out of several ("What color is the circle?") need a two-step lookup that a from-scratch
two-layer model did not learn within the few minutes of CPU training the demo allows, so they are left out.
"""

import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw


COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("color", "shape", "position", "count", "caption")
SINGLE_SHAPE_TYPES = ("color", "shape", "position")  # asked only about scenes with one shape
# The first phrasing of each type is the canonical one (the evaluation sets' default).
TRAIN_PHRASINGS = {
    "color": ("What color is the shape?", "What colour is it?", "Which color is the object?",
              "What is the color of the shape?", "Name the color.", "What color do you see in the image?"),
    "shape": ("What shape is it?", "What kind of shape is this?", "Which shape is in the image?",
              "What is the object?", "Name the shape.", "What shape do you see in this picture?"),
    "position": ("Where is the shape?", "Where is it?", "In which part of the image is the object?",
                 "Where is the object located?", "Which corner is the shape in?", "Name the position."),
    "count": ("How many shapes are there?", "How many shapes do you see?", "How many objects are in the image?",
              "Count the objects.", "What is the number of shapes?", "How many things does this picture show?"),
    "caption": ("Describe this picture.", "Describe what you see.", "What is in the image?",
                "Give a short caption.", "Caption this image.", "What does the picture show?"),
}  # fmt: skip
HELDOUT_PHRASINGS = {
    "color": ("What color is the object in the picture?", "Which colour is the shape?"),
    "shape": ("What shape is in the picture?", "Which shape is it?"),
    "position": ("Where is the shape in the picture?", "Where is the object?"),
    "count": ("How many shapes are in the picture?", "Count the shapes.", "How many objects can you see?"),
    "caption": ("Describe the image.", "Write a short caption for the picture."),
}
PHRASINGS = {"canonical": {kind: texts[:1] for kind, texts in TRAIN_PHRASINGS.items()},
             "train": TRAIN_PHRASINGS, "heldout": HELDOUT_PHRASINGS}  # fmt: skip
IMAGE_SIZE = 64
TRAIN_SEED = 0
HELDOUT_SEED = 1


@dataclass(frozen=True)
class PlacedShape:
    kind: str
    color: str
    position: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float


@dataclass(frozen=True)
class VQAExample:
    """One image with one or more questions about it."""

    image: Image.Image
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_types: tuple[str, ...]


def random_scene(rng: random.Random, num_shapes: int, image_size: int = IMAGE_SIZE) -> list[PlacedShape]:
    """Shapes of distinct kinds and colours, each in its own quadrant, jittered in place and size."""
    kinds = rng.sample(SHAPES, num_shapes)
    colors = rng.sample(sorted(COLORS), num_shapes)
    positions = rng.sample(POSITIONS, num_shapes)
    half = image_size / 2
    shapes = []
    for kind, color, position in zip(kinds, colors, positions):
        radius = rng.uniform(0.26, 0.4) * half
        margin = radius + 1
        left = half if position.endswith("right") else 0.0
        top = half if position.startswith("bottom") else 0.0
        center = (left + rng.uniform(margin, half - margin), top + rng.uniform(margin, half - margin))
        shapes.append(PlacedShape(kind, color, position, center, radius))
    return shapes


def draw_scene(shapes: list[PlacedShape], image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render the shapes on a dark background."""
    image = Image.new("RGB", (image_size, image_size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        x, y = shape.center
        r = shape.radius
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            side = r * 0.85
            draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:
            arm = r * 0.35
            draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
            draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    return image


def caption(shapes: list[PlacedShape]) -> str:
    """A short caption: "a red circle in the top left" for one shape, "3 shapes" for more."""
    if len(shapes) == 1:
        return f"a {shapes[0].color} {shapes[0].kind} in the {shapes[0].position}"
    return f"{len(shapes)} shapes"


def ask(shapes: list[PlacedShape], question_type: str, question: str | None = None) -> tuple[str, str]:
    """A question of the given type about the scene (`question`, or the type's canonical phrasing), and its answer."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"Unknown question_type {question_type!r}; use one of {QUESTION_TYPES}.")
    question = question or TRAIN_PHRASINGS[question_type][0]
    if question_type == "count":
        return question, str(len(shapes))
    if question_type == "caption":
        return question, caption(shapes)
    if len(shapes) != 1:
        raise ValueError(f"{question_type!r} questions are asked about scenes with one shape, not {len(shapes)}.")
    shape = shapes[0]
    return question, {"color": shape.color, "shape": shape.kind, "position": shape.position}[question_type]


def make_examples(
    num_images: int,
    seed: int,
    all_questions: bool = False,
    image_size: int = IMAGE_SIZE,
    phrasings: str = "canonical",
) -> list[VQAExample]:
    """`num_images` scenes and questions; the same seed gives the same data.

    With `all_questions=False`, one question per image, the types in turn (count and caption questions about one to
    four shapes). With `all_questions=True` (training), two images in three have one shape and all five questions in
    random order, the third two to four shapes and the count and caption questions. Each question is worded by a
    random choice among `PHRASINGS[phrasings]`: "canonical" (one wording per type), "train" or "heldout".
    """
    wordings = PHRASINGS[phrasings]
    rng = random.Random(seed)
    examples = []
    for index in range(num_images):
        if all_questions:
            single = index % 3 != 2
            types = QUESTION_TYPES if single else [t for t in QUESTION_TYPES if t not in SINGLE_SHAPE_TYPES]
            types = rng.sample(types, len(types))
            num_shapes = 1 if single else rng.randint(2, len(POSITIONS))
        else:
            types = [QUESTION_TYPES[index % len(QUESTION_TYPES)]]
            num_shapes = 1 if types[0] in SINGLE_SHAPE_TYPES else rng.randint(1, len(POSITIONS))
        shapes = random_scene(rng, num_shapes, image_size)
        questions, answers = zip(*(ask(shapes, kind, rng.choice(wordings[kind])) for kind in types))
        examples.append(VQAExample(draw_scene(shapes, image_size), questions, answers, tuple(types)))
    return examples


def make_splits(
    num_train: int, num_heldout: int, train_seed: int = TRAIN_SEED, heldout_seed: int = HELDOUT_SEED
) -> tuple[list[VQAExample], list[VQAExample]]:
    """Training images (several questions each, in the training phrasings) and held-out images (one question each,
    in the canonical phrasings), from two independent random streams."""
    if train_seed == heldout_seed:
        raise ValueError("train_seed and heldout_seed must differ, or the held-out split repeats the training one.")
    train = make_examples(num_train, train_seed, all_questions=True, phrasings="train")
    return train, make_examples(num_heldout, heldout_seed)


def demo_sample() -> VQAExample:
    """The bundled sample image's scene: the first held-out count question about three shapes."""
    return next(e for e in make_examples(100, HELDOUT_SEED) if e.question_types == ("count",) and e.answers == ("3",))


def question_prompts(processor, questions: list[str]) -> list[str]:
    """The chat prompt of each question about one image, ready for the assistant's answer."""
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]


@torch.no_grad()
def answer(model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of a model to one question per image, in one left-padded batch."""
    prompts = question_prompts(processor, questions)
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def evaluate(model, processor, examples: list[VQAExample], batch_size: int = 100) -> tuple[float, dict[str, float]]:
    """Exact-match accuracy of greedy answers to every question (asked alone), overall and per question type."""
    items = [(e.image, q, a, t) for e in examples for q, a, t in zip(e.questions, e.answers, e.question_types)]
    correct: dict[str, list[bool]] = {kind: [] for kind in QUESTION_TYPES}
    for start in range(0, len(items), batch_size):
        images, questions, answers, types = zip(*items[start : start + batch_size])
        for predicted, expected, kind in zip(answer(model, processor, list(images), list(questions)), answers, types):
            correct[kind].append(predicted == expected)
    hits = [hit for kind_hits in correct.values() for hit in kind_hits]
    per_type = {kind: sum(kind_hits) / len(kind_hits) for kind, kind_hits in correct.items() if kind_hits}
    return sum(hits) / len(hits), per_type


def to_conversation(example: VQAExample, image_file: str) -> dict:
    """The example as one record of the LLaVA conversation JSON format (one turn per question)."""
    turns = []
    for index, (question, answer_text) in enumerate(zip(example.questions, example.answers)):
        turns.append({"from": "human", "value": f"<image>\n{question}" if index == 0 else question})
        turns.append({"from": "gpt", "value": answer_text})
    return {"image": image_file, "conversations": turns}


__all__ = [
    "COLORS",
    "HELDOUT_PHRASINGS",
    "HELDOUT_SEED",
    "IMAGE_SIZE",
    "PHRASINGS",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "SINGLE_SHAPE_TYPES",
    "TRAIN_PHRASINGS",
    "TRAIN_SEED",
    "PlacedShape",
    "VQAExample",
    "answer",
    "ask",
    "caption",
    "demo_sample",
    "draw_scene",
    "evaluate",
    "make_examples",
    "make_splits",
    "random_scene",
    "to_conversation",
]
