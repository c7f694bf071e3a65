"""Finding and loading Dense Connector checkpoints for the command-line tools (chat, demo, eval, web).

A folder or Hub id that is not a converted checkpoint (an original one, another model type, an incomplete folder)
gives a `UsageError` with one line saying what is wrong and what to do; the tools print it without a traceback.
"""

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from dense_connector.writing.sources import is_hub_id
from dense_connector.writing.verify import loading_problems


PROG = "dense-connector"
DEFAULT_MAX_NEW_TOKENS = 512  # chat, demo, web and eval, when the checkpoint's generation config sets none
MODEL_HELP = "Dense Connector checkpoint (converted, built or trained): a local folder or a Hub id (owner/name)"


def install_hint(extra: str) -> str:
    """How to install an optional extra: from the clone, as the README says (the package is not on PyPI)."""
    return f'pip install -e ".[{extra}]" in a clone of the repository'


class UsageError(Exception):
    """A problem with what the user asked for, shown as one line without a traceback."""


def status(message: str) -> None:
    """Progress for long steps, on stderr so that stdout holds only the answers."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def bundled_demo() -> Iterator[tuple[Path, Path]]:
    """Paths of the demo checkpoint and sample image shipped as package data."""
    with resources.as_file(resources.files("dense_connector") / "demo") as folder:
        yield folder / "checkpoint", folder / "sample.png"


def read_config(model_id: str) -> dict:
    """The `config.json` of a local folder or a Hub repository, as a dict."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model_id} is not a Hugging Face checkpoint folder (it has no config.json)")
        return json.loads((path / "config.json").read_text())
    if not is_hub_id(model_id):
        raise UsageError(f"no such folder: {model_id} (and not a Hub id, owner/name)")
    try:
        return json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as error:
        raise UsageError(f"cannot load {model_id} from the Hugging Face Hub: {one_line(error)}") from error


def check_checkpoint(model_id: str) -> None:
    """Raise a UsageError saying why `model_id` is not a converted Dense Connector checkpoint, if it is not one."""
    config = read_config(model_id)
    if "mm_dense_connector_type" in config:
        raise UsageError(
            f"{model_id} is an original Dense Connector checkpoint; convert it first with `{PROG} convert` and "
            "chat with the converted folder"
        )
    if config.get("model_type") != "dense_connector":
        raise UsageError(f"{model_id} is a {config.get('model_type')!r} checkpoint, not a Dense Connector one")


def check_loading_info(model_id: str, info: dict) -> None:
    """Refuse a checkpoint with missing or unexpected tensors, naming them.

    transformers only warns (and initialises missing tensors at random); chatting with such a model would give
    meaningless answers, so the CLI stops instead.
    """
    problems = loading_problems(info)
    if problems:
        raise UsageError(
            f"{model_id} is incomplete or does not match its config ({'; '.join(problems)}); convert the original "
            f"checkpoint again with `{PROG} convert`"
        )


def load_checkpoint(model_id: str, device: str):
    """Model (in eval mode, on `device`) and processor of a converted Dense Connector checkpoint.

    The package's own classes load it (importing the package registers them with the Auto classes), so no remote
    code runs.
    """
    status(f"loading {model_id} ...")
    start = time.perf_counter()
    check_checkpoint(model_id)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report would repeat what check_loading_info says
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model, info = AutoModelForImageTextToText.from_pretrained(model_id, dtype="auto", output_loading_info=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load {model_id}: {one_line(error)}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(model_id, info)
    model = model.to(device).eval()
    status(f"loaded in {time.perf_counter() - start:.1f} s on {device}")
    return model, processor
