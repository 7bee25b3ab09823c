"""The documentation stays true to the code: the protocol x defense page and the API pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefml.errors import ConfigError
from securefml.protocols import PROTOCOLS
from securefml.registry import parse_spec
from securefml.support import PROTOCOL_COLUMNS, _instance, document, support_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_support_page_is_current() -> None:
    page = (ROOT / "docs" / "support.md").read_text()
    assert page == document(), "regenerate: python -m securefml.support > docs/support.md"


@pytest.mark.parametrize("spec", PROTOCOL_COLUMNS)
def test_the_table_is_what_the_protocols_accept(spec: str) -> None:
    table = support_table()
    name, options = parse_spec(spec)
    protocol = PROTOCOLS.create(name, **options)
    checked = 0
    for defense_name, _ in table.defenses:
        defense = _instance(defense_name)
        if defense is None:
            continue  # needs options to exist at all
        checked += 1
        if table.runs(defense_name, spec):
            protocol.check_defense(defense)
        else:
            with pytest.raises(ConfigError):
                protocol.check_defense(defense)
    assert checked >= 10


def _public_subpackages() -> set[str]:
    names = set()
    for folder in ("securefml", "protocols", "defenses", "attacks"):
        if folder != "securefml":
            names.add(folder)
            continue
        names |= {p.parent.name for p in (ROOT / folder).glob("*/__init__.py") if not p.parent.name.startswith("_")}
    return names


def test_every_public_subpackage_has_an_api_page() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in sorted(_public_subpackages()):
        page = ROOT / "docs" / "api" / f"{name}.md"
        assert page.is_file(), f"add docs/api/{name}.md (':::' securefml.{name}) and list it in mkdocs.yml"
        assert f"::: securefml.{name}" in page.read_text()
        assert f"api/{name}.md" in nav
