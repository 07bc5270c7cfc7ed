"""The documentation as a specification: README.md and docs/*.md show commands that still work.

The commands are read from the pages' fenced shell blocks (```bash, ```sh or a bare ```; a line ending in `\\`
continues on the next). Of each command: a repository script it runs exists and answers `--help`, the `--flags`
it passes are in that help, its `section.key=value` overrides name real config keys, a `make` target exists in
the Makefile and a repository path it names exists. The Python examples' imports from the repository resolve, the
pages' relative links and anchors resolve, and the README stays a front door of at most 200 lines.
"""

import ast
import importlib
import importlib.util
import re
import subprocess
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest

from tests.docs_pages import (
    OVERRIDE,
    REPO_FOLDERS,
    SCRIPT_MODULE,
    entry_exists,
    fenced_blocks,
    headings,
    links,
    page_commands,
    page_invocations,
    rel,
    run_help,
    shell_tokens,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 200
STAGE_PAGES = [
    "preprocessing",
    "training",
    "tuning",
    "evaluation",
    "generator",
    "cluster",
    "configuration",
    "reliability",
    "benchmarks",
]
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOCS_PAGES = [p for p in PAGES if p != README]


def config_keys() -> set[str]:
    """Every dotted config key ("model.ch", "train.steps", ...) of the default config."""
    from pipelines.common.config import load_config
    from sagan.config import flatten  # the config's home may move: this is the one place that imports it

    return set(flatten(load_config(None)))


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """`python SCRIPT --help` of every documented script that exists, run in parallel (each imports torch: seconds)."""
    entries = sorted({i.entry for page in PAGES for i in page_invocations(page) if entry_exists(i.entry)})
    with ThreadPool(4) as pool:
        return dict(zip(entries, pool.map(run_help, entries)))


def page_id(page: Path) -> str:
    return rel(page)


by_page = pytest.mark.parametrize("page", PAGES, ids=page_id)
by_docs_page = pytest.mark.parametrize("page", DOCS_PAGES, ids=page_id)


# --- the README and the pages ----------------------------------------------------------------------------------


def test_readme_is_at_most_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the details belong in docs/"


@pytest.mark.parametrize("stage", STAGE_PAGES)
def test_every_stage_has_its_docs_page(stage):
    assert (ROOT / "docs" / f"{stage}.md").is_file(), f"docs/{stage}.md is missing"


@pytest.mark.parametrize("stage", STAGE_PAGES)
def test_readme_links_every_stage_page(stage):
    targets = {target.split("#")[0] for _, target in links(README)}
    assert f"docs/{stage}.md" in targets, f"README.md does not link docs/{stage}.md"


def test_readme_links_only_docs_pages_that_exist():
    missing = [t for _, t in links(README) if t.startswith("docs/") and not (ROOT / t.split("#")[0]).exists()]
    assert missing == [], f"README.md links docs pages that do not exist: {missing}"


@by_page
def test_every_relative_link_and_anchor_resolves(page):
    problems = []
    for number, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{rel(page)}:{number}: link to {target}: {path} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in headings(file):
            problems.append(f"{rel(page)}:{number}: link to {target}: {rel(file)} has no heading #{anchor}")
    assert problems == [], "\n".join(problems)


@by_docs_page
def test_every_docs_page_opens_with_a_title_and_a_one_sentence_summary(page):
    paragraphs = [p.strip() for p in page.read_text().split("\n\n")]
    assert paragraphs[0].startswith("# ") and "\n" not in paragraphs[0], f"{rel(page)}: no `# Title` line first"
    summary = paragraphs[1]
    assert not summary.startswith(("#", "-", "*", "`" * 3, "|")), f"{rel(page)}: no summary under the title"
    assert summary.endswith(".") and len(summary.splitlines()) <= 3, f"{rel(page)}: the summary is not one sentence"
    assert not re.search(r"[.!?]\s+[A-Z]", summary), f"{rel(page)}: the summary is more than one sentence"


@by_page
def test_every_named_module_exists(page):
    """A module of pipelines/ or sagan/ named on a page is there: a page that outlives a move fails here."""
    problems = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for path in SCRIPT_MODULE.findall(line):
            if not (ROOT / path).is_file():
                problems.append(f"{rel(page)}:{number}: names {path}, which does not exist")
    assert problems == [], "\n".join(problems)


# --- the commands ----------------------------------------------------------------------------------------------


@by_page
def test_every_documented_command_parses_as_shell(page):
    problems = []
    for command in page_commands(page):
        try:
            shell_tokens(command.text)
        except ValueError as e:
            problems.append(f"{command.where()}: {e}")
    assert problems == [], "\n".join(problems)


@by_page
def test_every_documented_script_exists(page):
    missing = [
        f"{i.command.where()}: {i.entry} does not exist" for i in page_invocations(page) if not entry_exists(i.entry)
    ]
    assert missing == [], "\n".join(missing)


@by_page
def test_every_documented_script_answers_help(page, helps):
    problems = []
    for i in page_invocations(page):
        result = helps.get(i.entry)
        if result is not None and result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            problems.append(f"{i.command.where()}: `{i.entry} --help` exits {result.returncode}: {' / '.join(tail)}")
    assert problems == [], "\n".join(problems)


@by_page
def test_every_documented_flag_is_in_the_scripts_help(page, helps):
    problems = []
    for i in page_invocations(page):
        result = helps.get(i.entry)
        if result is None or result.returncode != 0:
            continue  # reported by the tests above
        for token in i.args:
            flag = token.split("=", 1)[0]
            if (
                flag.startswith("--")
                and flag != "--"
                and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)
            ):
                problems.append(f"{i.command.where()}: {i.entry} --help does not list {flag}")
    assert problems == [], "\n".join(problems)


@by_page
def test_every_documented_config_key_exists(page):
    keys = config_keys()
    problems = []
    for i in page_invocations(page):
        for token in i.args:
            match = OVERRIDE.match(token)
            if match and match.group(1) not in keys:
                problems.append(f"{i.command.where()}: {match.group(1)} is not a config key")
    assert problems == [], "\n".join(problems)


@by_page
def test_config_overrides_go_only_to_scripts_that_take_them(page, helps):
    problems = []
    for i in page_invocations(page):
        result = helps.get(i.entry)
        if result is None or result.returncode != 0:
            continue
        overrides = [t for t in i.args if OVERRIDE.match(t)]
        if overrides and "key=value" not in result.stdout:
            problems.append(f"{i.command.where()}: {i.entry} takes no key=value overrides, given {overrides[0]}")
    assert problems == [], "\n".join(problems)


@by_page
def test_every_documented_make_target_exists(page):
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))
    problems = []
    for command in page_commands(page):
        for tokens in command.simple_commands():
            words = [t for t in tokens if not re.match(r"^\w+=", t)]  # leading VAR=value
            if words and words[0] == "make":
                problems += [
                    f"{command.where()}: the Makefile has no target {t}"
                    for t in words[1:]
                    if not t.startswith("-") and t not in targets
                ]
    assert problems == [], "\n".join(problems)


@by_page
def test_every_documented_repository_path_exists(page):
    problems = []
    for command in page_commands(page):
        for tokens in command.simple_commands():
            for token in tokens:
                for path in {token, token.split("=", 1)[-1]}:
                    if path.split("/")[0] not in REPO_FOLDERS or "/" not in path:
                        continue
                    if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                        problems.append(f"{command.where()}: {path} does not exist")
    assert problems == [], "\n".join(problems)


# --- the Python examples and the configuration page ------------------------------------------------------------


@by_page
def test_every_documented_python_import_resolves(page):
    problems = []
    for lang, first, lines in fenced_blocks(page):
        if lang != "python":
            continue
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError as e:
            problems.append(f"{rel(page)}:{first + (e.lineno or 1) - 1}: the Python example does not parse: {e.msg}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in REPO_FOLDERS:
                where = f"{rel(page)}:{first + node.lineno - 1}: from {node.module} import ..."
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    problems.append(f"{where}: {e}")
                    continue
                problems += [f"{where}: no {a.name} there" for a in node.names if not hasattr(module, a.name)]
    assert problems == [], "\n".join(problems)


def test_configuration_page_documents_every_config_key():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(k for k in config_keys() if f"`{k}`" not in text)
    assert missing == [], f"docs/configuration.md does not document: {', '.join(missing)}"
