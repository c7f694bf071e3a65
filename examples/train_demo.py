"""Train the bundled demo checkpoint: a tiny Dense Connector (DCI) model, from scratch, on synthetic shapes VQA.

It generates the data (`dense_connector.demo_data`: varied phrasings of each question type, short captions), trains a
Llama-style SentencePiece tokenizer on its text (`tokenizer.model`, byte fallback, as Vicuna's) and converts it with
the package's converter (`tokenizer.json`, the same ids), builds a tiny CLIP-like tower + tiny Llama with random
weights, trains every part (tower included) with `dense-connector train` (whose `train` function it calls
on LLaVA-format JSON and PNG files, as users' data would come), prints the exact-match accuracy on held-out images
in the canonical and in held-out phrasings, and saves model + processor (vicuna_v1 chat template) + tokenizer.model
to `dense_connector/demo/checkpoint/` and the sample image to `dense_connector/demo/sample.png`. A few minutes of
training on two CPU cores.

    python examples/train_demo.py                                                   # the committed checkpoint
    python examples/train_demo.py --connector none --output_dir /tmp/demo_none --no_sample  # LLaVA-1.5 baseline
"""

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaImageProcessorPil, PreTrainedTokenizerFast

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES, VICUNA_V1_SYSTEM, stop_token_ids
from dense_connector.demo_data import (
    HELDOUT_SEED,
    IMAGE_SIZE,
    demo_sample,
    evaluate,
    make_examples,
    make_splits,
    to_conversation,
)
from dense_connector.training import command as finetune
from dense_connector.writing.tokenizer import convert_tokenizer


DEMO_DIR = Path(__file__).resolve().parents[1] / "dense_connector" / "demo"
PATCH_SIZE = 16  # a 4x4 grid of image tokens: each quadrant of the scene is 2x2 tokens
VOCAB_SIZE = 640  # 3 special and 256 byte pieces, the demo's characters, words and word pieces


def train_sentencepiece(texts: list[str], folder: Path) -> None:
    """A SentencePiece BPE `tokenizer.model` trained on the demo's text with Llama's (and so Vicuna's) settings:
    byte fallback (any text tokenises, byte by byte where no piece fits), digits split, no normalisation, spaces
    kept, a dummy prefix, `<unk>` `<s>` `</s>` at ids 0, 1, 2 and no pad piece; and Vicuna's slow-tokenizer config
    (`LlamaTokenizer`, `legacy: false`). Every frequent word of the prompts and answers becomes one piece, which
    keeps sequences short enough to train on two CPU cores in minutes."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "clean_up_tokenization_spaces": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_tokenizer(texts: list[str], folder: Path) -> PreTrainedTokenizerFast:
    """The demo's SentencePiece tokenizer (`train_sentencepiece`, written to `folder`) as the fast tokenizer that
    `dense-connector convert` makes of a Vicuna one: the package's converter, so the fast tokenizer gives the
    SentencePiece model's ids (the original slow tokenizer's), with `<image>` / `<video>` after the vocabulary,
    `<unk>` as the pad token (as Vicuna's training pads) and left padding."""
    train_sentencepiece(texts, folder)
    return convert_tokenizer(folder, {})


def build_processor(tokenizer: PreTrainedTokenizerFast, connector: str) -> DenseConnectorProcessor:
    image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return DenseConnectorProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES["vicuna_v1"],
        patch_size=PATCH_SIZE,
        dense_connector_type=connector,
    )


def build_model(
    processor: DenseConnectorProcessor, connector: str, seed: int
) -> DenseConnectorForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = DenseConnectorConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 512,
            # 0.02 (the default, tuned for wide models) leaves attention uniform for hundreds of steps at this width
            "initializer_range": 0.08,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        dense_connector_type=connector,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = DenseConnectorForConditionalGeneration(config)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, "vicuna_v1")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.max_new_tokens = 16
    return model


def write_training_data(examples, folder: Path) -> Path:
    """Images as PNG files and records in the LLaVA conversation JSON format, as users' data would come."""
    (folder / "images").mkdir(parents=True)
    records = []
    for index, example in enumerate(examples):
        name = f"{index:05d}.png"
        example.image.save(folder / "images" / name)
        records.append(to_conversation(example, name))
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connector", default="dci", choices=["dci", "sci", "sti", "none"])
    parser.add_argument("--output_dir", default=str(DEMO_DIR / "checkpoint"))
    parser.add_argument("--num_train", type=int, default=12000, help="training images")
    parser.add_argument("--num_heldout", type=int, default=400, help="held-out questions")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one more core prepares batches)")
    parser.add_argument("--no_sample", action="store_true", help="do not write dense_connector/demo/sample.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_examples, heldout_examples = make_splits(args.num_train, args.num_heldout)
    texts = [
        f"{VICUNA_V1_SYSTEM} USER: {question} ASSISTANT: {answer}"
        for example in train_examples
        for question, answer in zip(example.questions, example.answers)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = build_processor(build_tokenizer(texts, tmp / "tokenizer"), args.connector)
        model = build_model(processor, args.connector, args.seed)
        data_path = write_training_data(train_examples, tmp / "data")
        model.save_pretrained(tmp / "init")
        processor.save_pretrained(tmp / "init")
        start = time.perf_counter()
        trainer = finetune.train(
            [
                "--model_name_or_path", str(tmp / "init"),
                "--data_path", str(data_path),
                "--image_folder", str(tmp / "data" / "images"),
                "--tune", "projector+lm",
                "--freeze_vision_tower", "false",
                "--model_max_length", "256",
                "--output_dir", str(tmp / "run"),
                "--num_train_epochs", str(args.epochs),
                "--per_device_train_batch_size", str(args.batch_size),
                "--learning_rate", str(args.learning_rate),
                "--lr_scheduler_type", "cosine",
                "--warmup_steps", "30",
                "--weight_decay", "0.0",
                "--logging_steps", "50",
                "--save_strategy", "no",
                "--report_to", "none",
                "--dataloader_num_workers", "1",
                "--seed", str(args.seed),
                "--use_cpu",
            ]
        )  # fmt: skip
        train_seconds = time.perf_counter() - start
        trainer.model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        # The SentencePiece model beside its fast conversion, as in a Vicuna repository, for tools that read it.
        shutil.copy(tmp / "tokenizer" / "tokenizer.model", args.output_dir)

    model = AutoModelForImageTextToText.from_pretrained(args.output_dir).eval()
    processor = AutoProcessor.from_pretrained(args.output_dir)
    if not args.no_sample:
        demo_sample().image.save(DEMO_DIR / "sample.png")
    print(f"connector={args.connector}: trained in {train_seconds:.0f} s on {torch.get_num_threads()} CPU threads")
    heldout_phrasings = make_examples(args.num_heldout, HELDOUT_SEED + 1, phrasings="heldout")
    for name, examples in (("canonical", heldout_examples), ("held-out", heldout_phrasings)):
        accuracy, per_type = evaluate(model, processor, examples)
        print(f"held-out images, {name} phrasings: exact match {accuracy:.1%} on {len(examples)} questions; "
              + ", ".join(f"{kind} {value:.1%}" for kind, value in per_type.items()))  # fmt: skip
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
