"""The docstring examples run (optax's discipline: a doctest that runs in CI), and every
relative link in the README and the docs resolves, anchors included."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import hyperopt_optim

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hyperopt_optim.__path__, prefix="hyperopt_optim.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_names_are_documented() -> None:
    for name in hyperopt_optim.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(hyperopt_optim, name)
        assert obj.__doc__, name
        assert len(obj.__doc__.strip()) > 40, name


ROOT = Path(__file__).resolve().parents[1]
LINKED = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "examples" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces to ``-``."""
    out = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"^#+\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    broken = []
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        link = match.group(1)
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{link} (no such heading)")
    assert not broken, broken


def test_the_readme_script_runs() -> None:
    """The README's complete script has no undefined names and runs as it is."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("A complete script")
    block = re.search(r"```python\n(.*?)```", readme[start:], flags=re.S)
    assert block is not None
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    opt = namespace["opt"]
    assert opt.hyper_state["hyper_steps"] > 0  # type: ignore[attr-defined]
