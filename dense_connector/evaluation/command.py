"""`dense-connector eval`: the paper's benchmarks through lmms-eval, or the authors' LLaVA question files.

    dense-connector eval --model DIR [--benchmarks paper|pope,mme,...] [--data-dir DIR] [--output DIR] [--limit N]
    dense-connector eval --model DIR --question-file Q.jsonl --image-folder DIR --answers-file A.jsonl
    dense-connector eval --write-demo-data DIR        (synthetic data in both formats, to try the commands offline)

`--gpus 0,1,...` runs on those GPUs: data-parallel lmms-eval under `accelerate launch`, or one chunk of the question
file per GPU, merged in order, as the original scripts do.
"""

import argparse
from pathlib import Path

from ..checkpoints import DEFAULT_MAX_NEW_TOKENS, MODEL_HELP, UsageError, check_checkpoint, install_hint
from .generator import GenerationSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    parser.add_argument("--gpus", help="comma-separated GPU ids to spread the work over, e.g. 0,1,2,3")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="torch device for one process (default: cuda if available)")

    lmms = parser.add_argument_group("benchmarks through lmms-eval (needs the eval extra)")
    lmms.add_argument("--benchmarks", default="paper", help="'paper' (default) or a comma-separated list")
    lmms.add_argument(
        "--data-dir", type=Path, help="folder with local copies of the datasets, one per task name (e.g. DIR/pope)"
    )
    lmms.add_argument(
        "--output", type=Path, default=Path("eval-results"), help="results folder (default eval-results)"
    )
    lmms.add_argument("--limit", type=int, help="evaluate only the first N questions of each task")
    lmms.add_argument("--release", help="compare with the numbers reported for this release of the authors")

    llava = parser.add_argument_group("the authors' LLaVA format (model_vqa_loader)")
    llava.add_argument("--question-file", type=Path, help="LLaVA question file (.jsonl: question_id, image, text)")
    llava.add_argument("--image-folder", type=Path, default=Path("."), help="folder the questions' images are in")
    llava.add_argument("--answers-file", type=Path, help="answer file to write (.jsonl)")
    llava.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    llava.add_argument("--chunk-idx", type=int, default=0, help="answer only this chunk (0-based)")
    llava.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"longest answer in tokens (default: the checkpoint's generation config, else {DEFAULT_MAX_NEW_TOKENS})",
    )
    llava.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    llava.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser.add_argument("--write-demo-data", type=Path, metavar="DIR", help="write the synthetic demo data and exit")


def run(args: argparse.Namespace) -> int:
    if args.write_demo_data:
        from .demo_tasks import write_demo_data

        folders = write_demo_data(args.write_demo_data)
        print("wrote " + ", ".join(str(folder) for folder in folders))
        if len(folders) == 1:
            print(f"(the lmms-eval datasets need the eval extra: {install_hint('eval')})")
        return 0
    if not args.model:
        raise UsageError("give --model (a converted checkpoint folder or Hub id)")
    check_checkpoint(args.model)  # a clear message for a folder that is not a converted checkpoint
    gpus = [gpu.strip() for gpu in args.gpus.split(",")] if args.gpus else []
    if args.question_file:
        return answer_questions(args, gpus)
    return run_lmms_eval(args, gpus)


def answer_questions(args: argparse.Namespace, gpus: list[str]) -> int:
    from .generator import Answerer, load_pretrained
    from .llava_format import answer_file, check_images, chunk, model_id, read_questions, run_on_gpus

    if not args.answers_file:
        raise UsageError("give --answers-file for the answers to --question-file")
    if not args.question_file.is_file():
        raise UsageError(f"question file not found: {args.question_file}")
    try:
        questions = read_questions(args.question_file)
        check_images(questions, args.image_folder)  # before any model loads
        questions = chunk(questions, args.num_chunks, args.chunk_idx)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    if len(gpus) > 1:
        base = ["--model", args.model, "--question-file", str(args.question_file)]
        base += ["--image-folder", str(args.image_folder), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
        base += ["--temperature", str(args.temperature)]
        base += ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
        run_on_gpus(base + (["--no-progress"] if args.no_progress else []), gpus, args.answers_file)
        return 0
    device = f"cuda:{gpus[0]}" if gpus else args.device
    try:
        answerer = Answerer(*load_pretrained(args.model, device, args.dtype))
    except ValueError as error:  # an incomplete checkpoint, or a processor without a chat template
        raise UsageError(str(error)) from error
    longest = args.max_new_tokens or answerer.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    settings = GenerationSettings(max_new_tokens=longest, temperature=args.temperature)
    count = answer_file(
        answerer,
        questions,
        args.image_folder,
        args.answers_file,
        model_id(args.model),
        settings,
        args.batch_size,
        progress=not args.no_progress,
    )
    print(f"wrote {count} answers to {args.answers_file}")
    return 0


def run_lmms_eval(args: argparse.Namespace, gpus: list[str]) -> int:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as error:
        raise UsageError(f"lmms-eval is not installed; install the eval extra: {install_hint('eval')}") from error
    from .benchmarks import identify_release, parse_benchmarks, run_benchmarks

    try:
        names = parse_benchmarks(args.benchmarks)
        identify_release(args.model, args.release)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if args.data_dir and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a folder")
    model_args = f"dtype={args.dtype}" + (f",device={args.device}" if args.device != "auto" and not gpus else "")
    scores = run_benchmarks(
        args.model, names, args.output, args.data_dir, args.batch_size, args.limit, gpus, model_args, args.release
    )
    print((args.output / "scores.md").read_text(), end="")
    print(f"scores: {args.output / 'scores.md'}, {args.output / 'scores.json'}, chart {args.output / 'scores.png'}")
    return 0 if scores else 1
