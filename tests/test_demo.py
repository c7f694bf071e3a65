"""The bundled demo checkpoint (trained by examples/train_demo.py): small, loads through the Auto classes, answers
held-out questions about held-out images, in phrasings it was not trained on, and has a standard Llama SentencePiece
tokenizer (`tokenizer.model`, byte fallback) whose ids its fast tokenizer gives."""

import random

import numpy as np
import pytest
from original_tokenization import SlowLlamaTokenizer, tokenizer_image_token
from PIL import Image
from tiny import REPO
from transformers import AutoModelForImageTextToText, AutoProcessor

from dense_connector.chat_templates import CHAT_TEMPLATES
from dense_connector.demo_data import (
    HELDOUT_PHRASINGS,
    HELDOUT_SEED,
    QUESTION_TYPES,
    TRAIN_PHRASINGS,
    TRAIN_SEED,
    answer,
    ask,
    caption,
    demo_sample,
    draw_scene,
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
    assert [e.question_types for e in heldout][:5] == [(kind,) for kind in QUESTION_TYPES]
    assert not any(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(train, heldout))
    with pytest.raises(ValueError, match="must differ"):
        make_splits(2, 2, train_seed=3, heldout_seed=3)
    with pytest.raises(ValueError, match="scenes with one shape"):
        ask(random_scene(random.Random(0), 2), "color")


def test_held_out_phrasings_are_never_trained_on():
    assert set(TRAIN_PHRASINGS) == set(HELDOUT_PHRASINGS) == set(QUESTION_TYPES)
    trained = {question for e in make_splits(300, 1)[0] for question in e.questions}
    assert trained == {question for texts in TRAIN_PHRASINGS.values() for question in texts}
    assert not trained & {question for texts in HELDOUT_PHRASINGS.values() for question in texts}
    heldout = make_examples(50, seed=TEST_SEED, phrasings="heldout")
    assert {q for e in heldout for q in e.questions} <= {q for texts in HELDOUT_PHRASINGS.values() for q in texts}


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT).eval()
    return model, AutoProcessor.from_pretrained(CHECKPOINT)


def test_checkpoint_is_small_and_complete(demo):
    size = sum(path.stat().st_size for path in CHECKPOINT.rglob("*") if path.is_file())
    assert size < 4 * 2**20, f"the committed demo checkpoint is {size / 2**20:.1f} MiB"
    model, processor = demo
    assert model.config.dense_connector_type == "dci"
    assert processor.chat_template == CHAT_TEMPLATES["vicuna_v1"]


def test_answers_held_out_questions(demo):
    """Images from a seed used neither in training nor in train_demo.py's evaluation, in the canonical phrasings."""
    assert TEST_SEED not in (TRAIN_SEED, HELDOUT_SEED, HELDOUT_SEED + 1)
    accuracy, per_type = evaluate(*demo, make_examples(100, seed=TEST_SEED))
    assert accuracy >= 0.85 and min(per_type.values()) >= 0.7, f"held-out accuracy {accuracy:.0%} ({per_type})"


def test_answers_held_out_phrasings(demo):
    """The same in phrasings never trained on: counts and captions (a newcomer's first questions) nearly always; the
    single-shape questions less often ("Which colour is the shape?" gets a shape's kind: docs/demo-checkpoint.md)."""
    accuracy, per_type = evaluate(*demo, make_examples(100, seed=TEST_SEED, phrasings="heldout"))
    assert accuracy >= 0.75 and min(per_type["count"], per_type["caption"]) >= 0.9, f"{accuracy:.0%} ({per_type})"


def test_sample_image_and_its_answers(demo):
    """What a newcomer asks first, in the CLI or the browser, about the bundled sample image (three shapes)."""
    sample = Image.open(DEMO / "sample.png").convert("RGB")
    example = demo_sample()
    assert np.array_equal(np.asarray(sample), np.asarray(example.image))
    count = example.answers[0]
    questions = {
        "How many shapes are there?": count,  # the canonical phrasing
        "How many shapes are in the picture?": count,  # the rest are held-out phrasings
        "Count the shapes.": count,
        "How many objects can you see?": count,
        "Describe the image.": f"{count} shapes",
        "Write a short caption for the picture.": f"{count} shapes",
    }
    assert answer(*demo, [sample] * len(questions), list(questions)) == list(questions.values())


def test_describes_single_shapes(demo):
    rng = random.Random(TEST_SEED)
    scenes = [random_scene(rng, 1) for _ in range(8)]
    predicted = answer(*demo, [draw_scene(scene) for scene in scenes], ["Describe the image."] * len(scenes))
    expected = [caption(scene) for scene in scenes]
    assert sum(p == e for p, e in zip(predicted, expected)) >= len(scenes) - 2, list(zip(predicted, expected))


def test_tokenizer_is_a_llama_sentencepiece_one_with_the_same_ids(demo):
    """tokenizer.model as Vicuna's (BPE, byte fallback, <unk> <s> </s> at 0 1 2), and the fast tokenizer gives the
    ids the original's slow tokenizer and `tokenizer_image_token` give, on held-out prompts and unseen text."""
    from dense_connector.writing.tokenizer import sentencepiece_model

    proto = sentencepiece_model(CHECKPOINT / "tokenizer.model")
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert [piece.piece for piece in proto.pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    _, processor = demo
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(proto.pieces) and tokenizer.pad_token == "<unk>"
    slow = SlowLlamaTokenizer(CHECKPOINT / "tokenizer.model", legacy=False)
    texts = [q for texts in HELDOUT_PHRASINGS.values() for q in texts] + ["Zebra ünïcode 😀 12345", "  two  spaces "]
    for text in texts:
        prompt = question_prompts(processor, [text])[0].removeprefix(tokenizer.bos_token)
        ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False).input_ids
        expected = tokenizer_image_token(slow, prompt, tokenizer.bos_token_id)
        assert [-200 if i == image_id else i for i in ids] == expected, text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


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
