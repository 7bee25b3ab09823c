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
    accepted: frozenset[tuple[str, str]] = frozenset()  # (defense, protocol spec) pairs check_defense accepts

    def runs(self, defense: str, protocol: str) -> bool:
        return (defense, protocol) in self.accepted

    def markdown(self) -> str:
        head = "| defense | needs to see | " + " | ".join(f"`{p.spec}` ({p.reveals})" for p in self.protocols) + " |"
        rule = "|---|---|" + "---|" * len(self.protocols)
        rows = [
            f"| `{name}` | {', '.join(sorted(needs))} | "
            + " | ".join("yes" if self.runs(name, p.spec) else "-" for p in self.protocols) + " |"
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


def _instance(name: str) -> Any:
    """The defense built with its defaults (``f=1`` where a Byzantine budget is required), or None."""
    from securefml.defenses import DEFENSES
    from securefml.errors import ConfigError

    for options in ({}, {"f": 1}):
        try:
            return DEFENSES.create(name, **options)
        except ConfigError:
            continue
    return None


def support_table(protocols: tuple[str, ...] = PROTOCOL_COLUMNS) -> SupportTable:
    """The table for every registered defense and the given protocol specs.

    Each cell is what the protocol's own ``check_defense`` says of the defense built with its
    defaults, so a refusal beyond ``runs_on`` (CKKS refuses a rule whose output is one client's
    update) shows too.
    """
    from securefml.defenses import DEFENSES
    from securefml.errors import ConfigError
    from securefml.protocols import PROTOCOLS
    from securefml.registry import parse_spec

    columns = tuple(ProtocolColumn(spec, _reveals(spec)) for spec in protocols)
    built = {spec: PROTOCOLS.create(parse_spec(spec)[0], **parse_spec(spec)[1]) for spec in protocols}
    rows, accepted = [], set()
    for name in DEFENSES.names():
        defense = _instance(name)
        source = defense if defense is not None else DEFENSES.get(name)
        runs_on: frozenset[Any] = getattr(source, "runs_on", frozenset())
        rows.append((name, frozenset(_plain(r) for r in runs_on)))
        for spec, protocol in built.items():
            if defense is None:
                if _plain(protocol.reveals) in rows[-1][1]:
                    accepted.add((name, spec))
                continue
            try:
                protocol.check_defense(defense)
            except ConfigError:
                continue
            accepted.add((name, spec))
    return SupportTable(columns, tuple(rows), frozenset(accepted))


def document() -> str:
    """The whole ``docs/support.md`` page."""
    table = support_table()
    return "\n".join([
        "# Which defense runs under which protocol",
        "",
        "Generated from the code by `python -m securefml.support > docs/support.md` (each defense's",
        "`runs_on`, each protocol's `reveals`); `tests/unit/test_docs.py` fails when it is stale.",
        "A protocol refuses a defense marked `-` with a `ConfigError` before the first round (each",
        "cell is the protocol's own `check_defense` on the defense built with its defaults, `f=1` where",
        "a Byzantine budget is required).",
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
