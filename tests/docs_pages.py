r"""Reading the documentation pages for tests/test_docs.py: their fenced shell commands (joined across `\`
continuations), the script invocations in them, headings and relative links, and `--help` of a script."""

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELP_TIMEOUT_S = 180


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- reading the pages ------------------------------------------------------------------------------------------

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
REPO_FOLDERS = ("sagan", "pipelines", "preprocessing", "configs", "cluster", "benchmarks", "tests", "docs")
PYTHON = re.compile(r"(^|/)python3?$")
OVERRIDE = re.compile(r"^([A-Za-z_]\w*\.[A-Za-z_]\w*)=")
SCRIPT_MODULE = re.compile(r"\b((?:pipelines|sagan)/[\w/]+\.py)\b")


@dataclass(frozen=True)
class Command:
    """One command line shown in a page (continuation lines joined), where it is, and its simple commands."""

    page: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.page}:{self.line}: `{self.text}`"

    def simple_commands(self) -> list[list[str]]:
        """The command split at `;`, `&&`, `|`, `&`, `$(...)`, comments dropped: one token list each."""
        return split_commands(self.text)


@dataclass(frozen=True)
class Invocation:
    """A repository Python entry point run by a command: `python X.py ARGS` or `python -m X ARGS`."""

    entry: str  # "pipelines/train.py" or "-m package.module"
    args: tuple[str, ...]
    command: Command


def fenced_blocks(page: Path) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced block of `page`."""
    blocks, current = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = (match.group(1).lower(), number + 1, [])
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{rel(page)}: the code block opened at line {current[1] - 1} is never closed"
    return blocks


def shell_commands(page: Path) -> list[Command]:
    """Every command line of the page's shell blocks, continuation lines joined, comment-only lines dropped."""
    commands = []
    for lang, first, lines in fenced_blocks(page):
        if lang not in SHELL_BLOCKS:
            continue
        text, start = "", None
        for number, line in enumerate(lines, first):
            if start is None:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                start = number
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                text += stripped[:-1] + " "
                continue
            commands.append(Command(rel(page), start, " ".join((text + stripped).split())))
            text, start = "", None
        assert start is None, f"{rel(page)}:{start}: a command ends in `\\` with nothing after it"
    return commands


def shell_tokens(text: str) -> list[str]:
    """The shell words and operators of `text`; ValueError for an unclosed quote."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def split_commands(text: str) -> list[list[str]]:
    try:
        tokens = shell_tokens(text)
    except ValueError:  # test_every_documented_command_parses_as_shell names it
        return []
    commands, current = [], []
    for token in tokens:
        if token and set(token) <= set("();<>|&"):
            commands.append(current)
            current = []
            continue
        for inner in re.findall(r"\$\(([^()]*)\)", token):  # "$(python x.py env)" inside quotes
            commands.extend(split_commands(inner))
        current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def invocations(commands: list[Command]) -> list[Invocation]:
    """Every repository Python script or module the commands run, also after `ray job submit ... --`."""
    found = []
    for command in commands:
        for tokens in command.simple_commands():
            for i, token in enumerate(tokens[:-1]):
                if not PYTHON.search(token):
                    continue
                if tokens[i + 1] == "-m" and i + 2 < len(tokens):
                    module = tokens[i + 2]
                    if (ROOT / module.split(".")[0]).is_dir():  # the repository's, not `python -m pytest`
                        found.append(Invocation(f"-m {module}", tuple(tokens[i + 3 :]), command))
                elif tokens[i + 1].endswith(".py"):
                    found.append(Invocation(tokens[i + 1], tuple(tokens[i + 2 :]), command))
                break
    return found


@cache
def page_commands(page: Path) -> list[Command]:
    return shell_commands(page)


@cache
def page_invocations(page: Path) -> list[Invocation]:
    return invocations(page_commands(page))


def entry_exists(entry: str) -> bool:
    if entry.startswith("-m "):
        return importlib.util.find_spec(entry[3:]) is not None
    return (ROOT / entry).is_file()


def headings(page: Path) -> set[str]:
    """The GitHub anchors of the page's headings (outside code blocks)."""
    anchors, in_block = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image of the page outside code blocks."""
    found, in_block = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
            found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return found


# --- the scripts' help, run once per script --------------------------------------------------------------------


def run_help(entry: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *entry.split(), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
    )
