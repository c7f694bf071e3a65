"""Writing a checkpoint folder safely, shared by convert, build and export.

`staged_output` writes under a hidden name next to the output and moves the folder into place only when everything
passed, removing it on any failure (Ctrl-C included; `sigterm_as_exit` makes `kill` behave the same); `check_output`
refuses a file or a non-empty folder unless overwriting; `upload` pushes a finished folder to the Hub.
"""

import argparse
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import HfApi

from .sources import CheckpointError


logger = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--output {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CheckpointError(f"--output {output} is not empty; pass --overwrite to replace it.")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` by `staging` with renames only (the old folder is removed once the new one is in place)."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden staging folder next to `output`, moved into place when the block ends without error.

    On any failure, including Ctrl-C, the staging folder and the parent folders this created are removed, so nothing
    half-written is left. `output` is checked again just before the move (nobody may have filled it meanwhile).
    """
    created = [folder for folder in [output.parent, *output.parent.parents] if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
        yield staging
        check_output(output, overwrite)
        move_into_place(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A hidden file next to `path` to write, moved onto `path` (atomically, by `os.replace`) when the block ends
    without error and removed on any failure, including Ctrl-C: `path` is either untouched or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~current_umask())  # mkstemp makes it private; the result should not be
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def parse_size(size: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", size.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{size!r} is not a size like 5GB, 500MB or 2GiB.")
    number, unit, suffix = match.groups()
    base = 1024 if suffix == "IB" else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the staged writing, which removes its staging folder


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside the block, a termination signal (`kill`) exits the way Ctrl-C does, so staged writing cleans up."""
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def upload(
    folder: Path, repo_id: str, private: bool = False, original: str = "", commit_message: str | None = None
) -> str:
    """Upload the finished folder to the Hub in one commit; returns the repository id."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if commit_message is None:
        commit_message = f"Dense Connector converted from {original}" if original else "Dense Connector conversion"
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id
