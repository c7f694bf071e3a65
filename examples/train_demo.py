"""Train the bundled demo checkpoint: a tiny Dense Connector (DCI) model, from scratch, on synthetic shapes VQA.

It generates the data (`dense_connector.demo_data`), trains a small BPE tokenizer on its text, builds a tiny
CLIP-like tower + tiny Llama with random weights, trains every part (tower included) with `dense-connector train`
(whose `train` function it calls on LLaVA-format JSON and PNG files, as users' data would come), prints the
held-out exact-match accuracy, and saves model + processor (vicuna_v1 chat template) to
`dense_connector/demo/checkpoint/` and the sample image to `dense_connector/demo/sample.png`. About two minutes of
training on two CPU cores.

    python examples/train_demo.py                                                   # the committed checkpoint
    python examples/train_demo.py --connector none --output_dir /tmp/demo_none --no_sample  # LLaVA-1.5 baseline
"""

import argparse
import json
import string
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaImageProcessorPil, PreTrainedTokenizerFast

from dense_connector import DenseConnectorConfig, DenseConnectorForConditionalGeneration, DenseConnectorProcessor
from dense_connector.chat_templates import CHAT_TEMPLATES, VICUNA_V1_SYSTEM, stop_token_ids
from dense_connector.demo_data import IMAGE_SIZE, demo_sample, evaluate, make_splits, to_conversation
from dense_connector.training import command as finetune


DEMO_DIR = Path(__file__).resolve().parents[1] / "dense_connector" / "demo"
PATCH_SIZE = 16  # a 4x4 grid of image tokens: each quadrant of the scene is 2x2 tokens
VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]


def text_starts_after_placeholders(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with text after `<image>` / `<video>` tokenised as the start of a text, as the processor does (it
    tokenises the chunks between placeholders one by one), so that a whole prompt gets the processor's ids: a chunk
    that does not start with a space gets the "▁" Metaspace puts in front of a text. The same after a `<s>` that
    starts the text (the chat template writes it), so a chat tokenised without special tokens gets the ids of its
    prompt with the BOS added. These tokens are matched after normalisation, so that the normalizer sees them; the
    vocabulary is untouched."""
    placeholders = ("<image>", "<video>")
    ends_chunk = "|".join(placeholders)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(f"{token}(?![ ▁]|{ends_chunk}|\\z)"), token + "▁") for token in placeholders]
        + [normalizers.Replace(Regex(f"\\A<s>(?![ ▁]|{ends_chunk}|\\z)"), "<s>▁")]
    )
    state = json.loads(tokenizer.to_str())
    for token in state["added_tokens"]:
        token["normalized"] = token["content"] in (*placeholders, "<s>")
    return Tokenizer.from_str(json.dumps(state))


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on the demo's conversations, SentencePiece-like (`▁` word prefix, `<s>` BOS).

    Every frequent word of the prompts and answers becomes one token (`" ASSISTANT:"` is one token instead of nine
    with a generic 1000-piece vocabulary), which keeps sequences short enough to train on two CPU cores in minutes;
    any other printable ASCII text still tokenises, character by character.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=[*string.printable.strip(), "\n", "▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=text_starts_after_placeholders(tokenizer),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<video>"],
        padding_side="left",  # for batched generation; the training collator pads its batches itself
    )


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
    model.generation_config.max_new_tokens = 8
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
    processor = build_processor(build_tokenizer(texts), args.connector)
    model = build_model(processor, args.connector, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
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
        trained = trainer.model

    trained.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    model = AutoModelForImageTextToText.from_pretrained(args.output_dir).eval()
    processor = AutoProcessor.from_pretrained(args.output_dir)
    accuracy, per_type = evaluate(model, processor, heldout_examples)
    if not args.no_sample:
        demo_sample().image.save(DEMO_DIR / "sample.png")
    print(f"connector={args.connector}: trained in {train_seconds:.0f} s on {torch.get_num_threads()} CPU threads")
    print(f"held-out exact-match accuracy: {accuracy:.1%} on {len(heldout_examples)} questions")
    print("per question type: " + ", ".join(f"{kind} {value:.1%}" for kind, value in per_type.items()))
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
