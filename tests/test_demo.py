"""The bundled demo checkpoint (trained by examples/train_demo.py): small, loads through the Auto classes, and answers
held-out questions about synthetic shapes."""

import random

import numpy as np
import pytest
from PIL import Image
from tiny import REPO
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.demo_data import (
    HELDOUT_SEED,
    QUESTION_TYPES,
    TRAIN_SEED,
    answer,
    ask,
    demo_sample,
    evaluate,
    make_examples,
    make_splits,
    question_prompts,
    random_scene,
)


DEMO = REPO / "dense_connector" / "demo"
CHECKPOINT = DEMO / "checkpoint"
TEST_SEED = 2024


def test_data_is_deterministic_and_splits_differ():
    first, again = make_examples(8, seed=5, all_questions=True), make_examples(8, seed=5, all_questions=True)
    assert [e.answers for e in first] == [e.answers for e in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    train, heldout = make_splits(8, 8)
    assert [e.question_types for e in heldout][:4] == [(kind,) for kind in QUESTION_TYPES]
    assert not any(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(train, heldout))
    with pytest.raises(ValueError, match="must differ"):
        make_splits(2, 2, train_seed=3, heldout_seed=3)
    with pytest.raises(ValueError, match="scenes with one shape"):
        ask(random_scene(random.Random(0), 2), "color")


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT).eval()
    return model, AutoProcessor.from_pretrained(CHECKPOINT)


def test_checkpoint_is_small_and_complete(demo):
    size = sum(path.stat().st_size for path in CHECKPOINT.rglob("*") if path.is_file())
    assert size < 10 * 2**20, f"the committed demo checkpoint is {size / 2**20:.1f} MiB"
    model, processor = demo
    assert model.config.dense_connector_type == "dci"
    assert processor.chat_template == CHAT_TEMPLATES["vicuna_v1"]


def test_answers_held_out_questions(demo):
    assert TEST_SEED not in (TRAIN_SEED, HELDOUT_SEED)
    accuracy, per_type = evaluate(*demo, make_examples(100, seed=TEST_SEED))
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.0%} ({per_type})"


def test_sample_image_and_its_answer(demo):
    sample = Image.open(DEMO / "sample.png").convert("RGB")
    example = demo_sample()
    assert np.array_equal(np.asarray(sample), np.asarray(example.image))
    assert answer(*demo, [sample], ["How many shapes are there?"]) == [example.answers[0]]


def test_pads_on_the_left_for_batched_generation(demo):
    """A generic harness batches without naming a padding side: the checkpoint's own must be left, so that a batch
    answers as each question alone does."""
    model, processor = demo
    assert processor.tokenizer.padding_side == "left"
    examples = make_examples(6, seed=TEST_SEED)
    images, questions = [e.image for e in examples], [e.questions[0] for e in examples]
    inputs = processor(images=images, text=question_prompts(processor, questions), padding=True, return_tensors="pt")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1, "the batch should need padding"
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    batched = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    alone = [answer(model, processor, [image], [question])[0] for image, question in zip(images, questions)]
    assert [text.strip() for text in batched] == alone


@pytest.mark.parametrize("name", ["configuration", "connector", "modeling", "processing"])
def test_checkpoint_code_is_the_package_code(name):
    """The checkpoint ships copies of the package's files for trust_remote_code; they must not go stale."""
    shipped = (CHECKPOINT / f"{name}_dense_connector.py").read_text()
    assert shipped == (REPO / "dense_connector" / f"{name}_dense_connector.py").read_text(), (
        f"dense_connector/demo/checkpoint/{name}_dense_connector.py is stale: copy the package's file there"
    )
