"""Arguments and entry point of `dense-connector build`: a new checkpoint from a vision tower and a language model.

`cli.py` only registers the subcommand with `add_arguments` and calls `run`. The connector options are the paper's
ablations (hidden-state layers or groups, projector depth, Efficient DC's downsampling); a refused part or option is
reported as a `UsageError` (one line, no traceback), and a termination signal cleans up as Ctrl-C does.
"""

import argparse
import logging
import re

from dense_connector.checkpoints import UsageError, status
from dense_connector.writing.sources import CheckpointError
from dense_connector.writing.staging import DTYPES, parse_size, sigterm_as_exit, upload

from .builder import VERSIONS, build_checkpoint


HELP = "build a new Dense Connector checkpoint from a vision tower and a causal language model"


def layer_group(text: str) -> list[int]:
    """'0-11' (a range, both ends included) or '0,1,2' (a list) -> the hidden-state indices of one DCI group."""
    span = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if span:
        return list(range(int(span.group(1)), int(span.group(2)) + 1))
    if re.fullmatch(r"\d+(,\d+)*", text.strip()):
        return [int(part) for part in text.split(",")]
    raise argparse.ArgumentTypeError(f"{text!r} is not a group of hidden states like 0-11 or 0,1,2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vision-tower",
        required=True,
        help="folder or Hub id of a patch-token vision encoder, full (CLIPModel, SiglipModel, ...) or vision-only "
        "(CLIPVisionModel, Dinov2Model, ...); see docs/building.md",
    )
    parser.add_argument("--language-model", required=True, help="folder or Hub id of a causal LM with its tokenizer")
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--connector",
        choices=["dci", "sti", "sci", "none"],
        default="dci",
        help="connector (default dci; none: LLaVA)",
    )
    parser.add_argument(
        "--version",
        choices=sorted(VERSIONS),
        help="conversation format, as the original's --version: v1 (Vicuna), llama_3, or native (the LM's own chat "
        "template); default: from the tokenizer",
    )
    parser.add_argument(
        "--dense-connector-layers",
        type=int,
        nargs="+",
        metavar="L",
        help="STI/SCI hidden states (default: the outputs of layers L//3 and 2*(L//3), 7 15 for 24 or 26 layers)",
    )
    parser.add_argument(
        "--dense-connector-groups",
        type=layer_group,
        nargs="+",
        metavar="GROUP",
        help="DCI hidden-state groups, e.g. 0-11 12-23 (default: the tower's layers in two halves)",
    )
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        help="final feature (default: the second-to-last layer's output, -2; -1 for SigLIP, cut as the original does)",
    )
    parser.add_argument("--projector-depth", type=int, default=2, help="linear layers of the projector (default 2)")
    parser.add_argument(
        "--image-downsample-factor", type=int, default=1, help="Efficient DC: pool image tokens by this per side"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the language model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation (default 0)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the built folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=5 * 10**9, help="largest output shard (default: 5GB)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with sigterm_as_exit():
            folder = build_checkpoint(
                args.vision_tower,
                args.language_model,
                args.output,
                version=args.version,
                dtype=args.dtype,
                seed=args.seed,
                overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
                progress=not args.no_progress,
                connector=args.connector,
                dense_connector_layers=args.dense_connector_layers,
                dense_connector_groups=args.dense_connector_groups,
                vision_feature_layer=args.vision_feature_layer,
                projector_depth=args.projector_depth,
                image_downsample_factor=args.image_downsample_factor,
            )
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    status(f"built model written to {folder}")
    if args.push_to_hub:
        message = f"Dense Connector built from {args.vision_tower} and {args.language_model}"
        upload(folder, args.push_to_hub, private=args.private, commit_message=message)
    print(folder)
    return 0
