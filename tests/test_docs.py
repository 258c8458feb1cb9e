"""The documentation site (docs/) stays true to the package: every jaxinfer name the porting
page shows exists, and every public name of ``jaxinfer`` is on it. (`make docs` builds the site
with ``mkdocs build --strict`` in CI; the API reference pages are generated from the sources.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import jaxinfer

DOCS = Path(__file__).resolve().parents[1] / "docs"
PORTING = (DOCS / "porting.md").read_text()


def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:  # a submodule not imported by its package
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


@pytest.mark.parametrize("name", sorted(set(re.findall(r"`(jaxinfer(?:\.\w+)+)`", PORTING))))
def test_porting_page_names_exist(name):
    _resolve(name)


def test_every_public_name_is_on_the_porting_page():
    shown = set(re.findall(r"`jaxinfer\.(\w+)", PORTING))
    assert sorted(set(jaxinfer.__all__) - shown) == []


def test_api_reference_covers_the_public_modules():
    pages = "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    for module in ("jaxinfer", "jaxinfer.sampling", "jaxinfer.fp8", "jaxinfer.nn", "jaxinfer.serve",
                   "jaxinfer.backends", "jaxinfer.apply", "jaxinfer.bench.fib"):
        assert f"::: {module}\n" in pages, module
