"""Which defense runs under which protocol, read from the code (``runs_on`` and ``reveals``).

A defense declares what it needs to see (``Defense.runs_on``: a set of ``Reveals`` values) and
a protocol what its server half shows (``AggregationProtocol.reveals``).  A protocol refuses a
defense whose ``runs_on`` lacks its ``reveals`` (``check_defense``), so this table is exactly
what a run accepts.  ``docs/support.md`` is this module's output (``python -m securefml.support
> docs/support.md``); a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ProtocolColumn", "SupportTable", "support_table", "PROTOCOL_COLUMNS"]


@dataclass(frozen=True)
class ProtocolColumn:
    """One column of the table: a protocol spec and what its server half reveals."""

    spec: str
    reveals: str


#: The protocol configurations shown, as CLI specs (SecAgg+ twice: one sum, and bucketed).
PROTOCOL_COLUMNS = ("plaintext", "ckks", "secagg", "secagg:buckets=2")


@dataclass(frozen=True)
class SupportTable:
    """Defense names x protocol columns -> whether the protocol can run the defense."""

    protocols: tuple[ProtocolColumn, ...]
    defenses: tuple[tuple[str, frozenset[str]], ...]

    def runs(self, defense: str, protocol: str) -> bool:
        needs = dict(self.defenses)[defense]
        column = next(p for p in self.protocols if p.spec == protocol)
        return column.reveals in needs

    def markdown(self) -> str:
        head = "| defense | needs to see | " + " | ".join(f"`{p.spec}` ({p.reveals})" for p in self.protocols) + " |"
        rule = "|---|---|" + "---|" * len(self.protocols)
        rows = [
            f"| `{name}` | {', '.join(sorted(needs))} | "
            + " | ".join("yes" if p.reveals in needs else "-" for p in self.protocols) + " |"
            for name, needs in self.defenses
        ]
        return "\n".join([head, rule, *rows])


def _plain(value: object) -> str:
    """A ``Reveals`` value as its plain string (a str constant or a str-valued enum member)."""
    return str(getattr(value, "value", value))


def _reveals(spec: str) -> str:
    from securefml.protocols import PROTOCOLS
    from securefml.registry import parse_spec

    name, options = parse_spec(spec)
    factory: Any = PROTOCOLS.get(name)
    declared = vars(factory).get("reveals") if isinstance(factory, type) else None
    if declared is not None and not options:
        return _plain(declared)  # fixed by the class itself: no need to build it (CKKS would make keys)
    return _plain(PROTOCOLS.create(name, **options).reveals)


def support_table(protocols: tuple[str, ...] = PROTOCOL_COLUMNS) -> SupportTable:
    """The table for every registered defense and the given protocol specs."""
    from securefml.defenses import DEFENSES

    columns = tuple(ProtocolColumn(spec, _reveals(spec)) for spec in protocols)
    rows = []
    for name in DEFENSES.names():
        factory: Any = DEFENSES.get(name)
        rows.append((name, frozenset(_plain(r) for r in getattr(factory, "runs_on", frozenset()))))
    return SupportTable(columns, tuple(rows))


def document() -> str:
    """The whole ``docs/support.md`` page."""
    table = support_table()
    return "\n".join([
        "# Which defense runs under which protocol",
        "",
        "Generated from the code by `python -m securefml.support > docs/support.md` (each defense's",
        "`runs_on`, each protocol's `reveals`); `tests/unit/test_docs.py` fails when it is stale.",
        "A protocol refuses a defense marked `-` with a `ConfigError` before the first round.",
        "Pre-aggregators (`nnm`, `bucketing`, `arc`, `clipping`) compose with a rule (`nnm>>krum`);",
        "the composition runs where both parts run.",
        "",
        "What each protocol shows the server: `updates` every client's vector (no secrecy);",
        "`gram` only norms and pairwise inner products, decrypted by the CKKS key holder; `sum` only",
        "the secure sum; `buckets` only the secure sums of random buckets of clients.",
        "",
        table.markdown(),
        "",
    ])


if __name__ == "__main__":  # pragma: no cover
    print(document(), end="")
