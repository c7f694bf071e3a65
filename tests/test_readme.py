"""Every runnable snippet of README.md and docs/*.md runs, and every relative link between them resolves, so the
documentation cannot drift from the code.

Runnable snippets are the ```python blocks and the ```bash blocks whose first command is `dense-connector ...` or
`python ...`, except those with the line `<!-- no-test -->` just before the opening fence (use it for snippets that
need the network, a GPU, a real checkpoint or a long run). Python blocks run in-process, each in a fresh namespace;
bash blocks run with `bash -eo pipefail`, the virtual environment's `bin/` first on PATH and stdin closed (so an
`--interactive` chat ends after its first answer).

Both run as written from the repository root, on the bundled demo checkpoint (`dense_connector/demo/checkpoint`,
its sample image, `examples/data/`), as each page says at its top: in a temporary working directory holding links to
the repository's `dense_connector/`, `examples/`, `conversion_scripts/` and `bench/`, and `../shared/`, a link to the
reference fixtures beside the clone (converting.md's examples), so that what the examples write lands there and not
in the repository.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import REPO


README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^```(\w+)\s*$")
RUNNABLE_BASH = re.compile(r"^(dense-connector|python3?)\b")


@dataclass(frozen=True)
class Snippet:
    page: str  # README.md or docs/NAME.md
    language: str  # "python" or "bash"
    line: int  # 1-based line of the opening fence
    code: str


def extract_snippets(markdown: str, name: str = "README.md") -> list[Snippet]:
    """The runnable snippets of a markdown text, in order (see the module docstring for which ones)."""
    lines = markdown.splitlines()
    snippets, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index].strip())
        if not match:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{name}:{index + 1}: code block without a closing fence")
        code = "\n".join(lines[index + 1 : end]) + "\n"
        language = match.group(1)
        skipped = index > 0 and lines[index - 1].strip() == NO_TEST
        commands = [line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not skipped and language == "python":
            snippets.append(Snippet(name, "python", index + 1, code))
        elif not skipped and language in ("bash", "sh") and commands and RUNNABLE_BASH.match(commands[0]):
            snippets.append(Snippet(name, "bash", index + 1, code))
        index = end + 1
    return snippets


def page_name(path: Path) -> str:
    return str(path.relative_to(REPO))


SNIPPETS = [
    snippet for page in PAGES if page.is_file() for snippet in extract_snippets(page.read_text(), page_name(page))
]


def test_snippet_extraction_rules():
    markdown = "\n".join(
        [
            "```python",
            "print(1)",
            "```",
            NO_TEST,
            "```python",
            "needs_network()",
            "```",
            "```bash",
            "# a comment first",
            "dense-connector chat --help",
            "```",
            "```bash",
            "pip install dense-connector",
            "```",
            "```bash",
            "python -c 'print(2)'",
            "```",
            "```json",
            "{}",
            "```",
        ]
    )
    snippets = extract_snippets(markdown)
    assert [(s.language, s.line) for s in snippets] == [("python", 1), ("bash", 8), ("bash", 15)]
    assert snippets[0].code == "print(1)\n"
    with pytest.raises(ValueError, match="README.md:1: code block without a closing fence"):
        extract_snippets("```python\nprint(1)\n")


def test_readme_starts_with_setup_and_test_commands():
    assert README.is_file(), "README.md is missing"
    head = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in head and "make test" in head, "the README's first lines should show `make demo`/`make test`"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme") / "repo"
    folder.mkdir()
    (folder.parent / "shared").symlink_to(REPO.parent / "shared")
    for name in ("dense_connector", "examples", "conversion_scripts", "bench"):
        (folder / name).symlink_to(REPO / name)
    return folder


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"{s.page}:{s.line}-{s.language}" for s in SNIPPETS])
def test_readme_snippet_runs(snippet, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    if snippet.language == "python":
        exec(compile(snippet.code, f"{snippet.page}:{snippet.line}", "exec"), {"__name__": "__main__"})
        return
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", snippet.code],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{snippet.page}:{snippet.line} failed:\n{result.stdout}\n{result.stderr}"


def test_what_the_examples_write_is_ignored_by_git(workdir):
    """Run from the repository root, what the snippets above wrote must not show up in `git status`."""
    written = [path.name + ("/" if path.is_dir() else "") for path in workdir.iterdir() if not path.is_symlink()]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True)
    not_ignored = set(written) - set(result.stdout.split())
    assert not not_ignored, f"add to .gitignore: {sorted(not_ignored)}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text (lower case, punctuation dropped, spaces to dashes)."""
    headings = [line.lstrip("#").strip() for line in strip_code(markdown).splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def strip_code(markdown: str) -> str:
    """The text outside fenced code blocks (whose `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file, or heading anchor, does not exist."""
    broken = []
    for target in LINK.findall(strip_code(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(target)
    return broken


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Several GPUs\n[ok](b.md) [ok](#several-gpus) [no](c.md) [no](b.md#x)\n")
    (tmp_path / "b.md").write_text("# B\n```bash\n# not a heading\n```\n")
    assert broken_links(tmp_path / "a.md") == ["c.md", "b.md#x"]


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_links_resolve(page):
    assert not broken_links(page), f"{page_name(page)} links to what does not exist: {broken_links(page)}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target.partition("#")[0] for target in LINK.findall(README.read_text())}
    missing = [page_name(page) for page in PAGES[1:] if page_name(page) not in linked]
    assert not missing, f"README.md does not link {missing}"
