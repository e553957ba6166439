"""Every `python -m ...` command in the README and the docs/ pages names a module that exists and options that
parse: a newcomer copying a command never meets an unknown option or a renamed module."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from common.cli import apply_overrides, parse_args

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = {"pytest", "venv", "pip"}  # other tools' commands


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each `python -m` command in the page's code blocks (continuations joined)."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            m = re.search(r"python3? -m ([\w.]+)(.*)", line)
            if not m or m.group(1) in SKIP:
                continue
            rest = re.split(r"\s(?:>|2>|&&|\||&)\s?", m.group(2) + " ")[0]
            out.append((m.group(1), shlex.split(rest)))
    return out


ALL = [(page.name, module, argv) for page in PAGES for module, argv in commands(page)]


def test_the_pages_hold_commands_and_the_readme_is_short():
    assert len(ALL) > 30
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    for page in PAGES[1:]:  # every page is linked from the README
        assert f"docs/{page.name}" in (REPO / "README.md").read_text(), page.name


@pytest.mark.parametrize("page, module, argv", ALL, ids=[f"{p}:{m}:{i}" for i, (p, m, _) in enumerate(ALL)])
def test_each_command_names_a_module_and_options_that_parse(page, module, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an --out naming an existing result of this checkout must not matter
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: python -m runs its __main__
        mod = importlib.import_module(f"{module}.__main__")
    if module in ("llama.convert", "eval.lm_eval_cli", "eval.harness") or not argv:
        assert callable(getattr(mod, "main", None)), f"{module} has no main()"
        return  # subcommands, lm-eval's own parser, or nothing to parse
    if callable(getattr(mod, "config", None)):
        apply_overrides(mod.config(), list(argv))  # a runner: its config's fields
    elif module == "data":
        from data.config import DataConfig

        parse_args(DataConfig(), list(argv))
    else:
        parse_args(mod.Args(), list(argv))


def test_the_readmes_parameter_counts_are_the_runners():
    """The README's "# N.NM parameters" beside a runner's command is what that runner builds (on the meta device)."""
    import importlib
    import re
    from pathlib import Path

    import torch

    from llama.model import Transformer, count_params

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.findall(r"-m runners\.(\w+)\s+#\s*([\d.]+)M parameters", readme)
    assert quoted, "the README quotes no runner's parameter count"
    for runner, millions in quoted:
        cfg = importlib.import_module(f"runners.{runner}").config()
        with torch.device("meta"):
            n = count_params(Transformer(cfg.model))["total"]
        assert f"{n / 1e6:.1f}" == millions, (runner, n)


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (REPO / "docs" / "results").glob("*/table.md")))
def test_the_results_page_quotes_each_committed_study_table_as_it_is(study):
    """bench/RESULTS.md quotes the figures of each study table committed under docs/results/ row for row: a rerun
    that replaces the folder and not the page (or the other way round) fails here."""
    results = (REPO / "bench" / "RESULTS.md").read_text()
    rows = (REPO / "docs" / "results" / study / "table.md").read_text().splitlines()
    rows = [line for line in rows if line.startswith("|")][2:]  # the figures (a header may carry a correction)
    assert rows and "\n".join(rows) in results, f"bench/RESULTS.md does not quote docs/results/{study}"
