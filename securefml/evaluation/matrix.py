"""The attack x defense (x protocol x malicious fraction x seed) matrix: cells, keys, the runner.

Each cell is one real federated run (``run_experiment``) differing from the matrix's base
configuration only in its attack, defense, protocol, malicious fraction and seed.  A cell is
identified by a stable hash of its complete configuration (``cell_key``), so a rerun of the
same matrix into the same output folder reuses every cell already recorded there and only
runs the missing ones (resumable evaluations; change any knob and the key changes).

Users evaluate their own classes by passing ``Attack`` / ``Defense`` instances instead of spec
strings: each cell gets a deep copy (stateful rules such as CenteredClipping never leak state
between cells), and the instance's ``repr`` names it in the records and in the key.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeAlias

import torch

from securefml.attacks import Attack, make_attack
from securefml.defenses import Defense, make_defense
from securefml.errors import ConfigError
from securefml.evaluation.metrics import cell_metrics, is_backdoor
from securefml.experiment import RunConfig, run_experiment
from securefml.server import RoundRecord

__all__ = [
    "AttackLike",
    "DefenseLike",
    "Cell",
    "Matrix",
    "cell_key",
    "run_cell",
    "run_matrix",
    "label_of",
    "KEY_VERSION",
]

#: Bumped when the meaning of a record changes, so stale records are recomputed, not reused.
KEY_VERSION = 1

AttackLike: TypeAlias = str | Attack
DefenseLike: TypeAlias = str | Defense


def label_of(item: AttackLike | DefenseLike) -> str:
    """The name a spec or an instance has in records and tables (a spec is its own label)."""
    if isinstance(item, str):
        return item.strip()
    return repr(item)


def _check_spec(item: AttackLike | DefenseLike, kind: str) -> None:
    """Fail before any run starts if a spec string names no registered attack/defense."""
    if isinstance(item, str):
        (make_attack if kind == "attack" else make_defense)(item)
    elif kind == "attack" and not isinstance(item, Attack):
        raise ConfigError(f"an attack must be a spec string or an Attack instance, got {type(item).__name__}")
    elif kind == "defense" and not isinstance(item, Defense):
        raise ConfigError(f"a defense must be a spec string or a Defense instance, got {type(item).__name__}")


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: the base configuration with these five coordinates.

    Attributes
    ----------
    attack, defense:
        Spec strings or instances (instances are deep-copied for the run).
    protocol:
        Protocol spec (``"plaintext"``, ``"ckks"``, ``"secagg:buckets=2"``...).
    malicious:
        Fraction of the training clients that are malicious (0 for the ``"none"`` attack).
    seed:
        The run's seed (data split, model init, cohorts, which clients are malicious).
    config:
        The full ``RunConfig`` of the run.
    """

    attack: AttackLike
    defense: DefenseLike
    protocol: str
    malicious: float
    seed: int
    config: RunConfig = field(compare=False)

    @property
    def attack_label(self) -> str:
        return label_of(self.attack)

    @property
    def defense_label(self) -> str:
        return label_of(self.defense)

    @property
    def key(self) -> str:
        return cell_key(self.config)

    def coordinates(self) -> dict[str, Any]:
        return {
            "attack": self.attack_label,
            "defense": self.defense_label,
            "protocol": self.protocol,
            "malicious": self.malicious,
            "seed": self.seed,
        }


def cell_key(config: RunConfig) -> str:
    """A stable 16-hex-digit hash of a run's complete configuration (and ``KEY_VERSION``).

    The configuration is serialized as canonical JSON (sorted keys), so two processes, or two
    sessions days apart, compute the same key for the same cell.
    """
    payload = {"version": KEY_VERSION, "config": asdict(config)}
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Matrix:
    """The grid to evaluate, on top of a base ``RunConfig`` (dataset, algorithm, rounds, ...).

    Parameters
    ----------
    attacks, defenses:
        Spec strings (``"ipm:epsilon=0.1"``, ``"bucketing:size=2>>krum:f=5"``) or instances.
    protocols:
        Protocol specs; every defense must run on what each protocol reveals (checked when
        the cell runs; a refused combination becomes an error record, not a crash).
    malicious:
        Malicious fractions of the training clients.  The ``"none"`` attack always runs with
        0 malicious clients, once per (defense, protocol, seed): it is the clean baseline.
    seeds:
        One run per seed.
    base:
        Every other knob; its attack/defense/protocol/malicious/seed fields are overridden.
    """

    attacks: tuple[AttackLike, ...]
    defenses: tuple[DefenseLike, ...]
    protocols: tuple[str, ...] = ("plaintext",)
    malicious: tuple[float, ...] = (0.2,)
    seeds: tuple[int, ...] = (0,)
    base: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for name in ("attacks", "defenses", "protocols", "malicious", "seeds"):
            value = tuple(getattr(self, name))
            if not value:
                raise ConfigError(f"the evaluation matrix needs at least one entry in {name}")
            object.__setattr__(self, name, value)
        for a in self.attacks:
            _check_spec(a, "attack")
        for d in self.defenses:
            _check_spec(d, "defense")
        for m in self.malicious:
            if not (isinstance(m, (int, float)) and 0 <= m < 1):
                raise ConfigError(f"malicious fractions must be in [0, 1), got {m!r}")
        labels = [label_of(a) for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"attack labels must be unique, got {labels}")
        labels = [label_of(d) for d in self.defenses]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"defense labels must be unique, got {labels}")

    def cells(self) -> list[Cell]:
        """Every cell, in a stable order (attack, malicious, protocol, defense, seed)."""
        out: list[Cell] = []
        seen: set[tuple[str, str, str, float, int]] = set()
        for attack, mal, protocol, defense, seed in itertools.product(
            self.attacks, self.malicious, self.protocols, self.defenses, self.seeds
        ):
            a_label = label_of(attack)
            mal = 0.0 if a_label == "none" else float(mal)
            if a_label != "none" and mal == 0:
                continue  # an attack with no attacker is the clean baseline, which "none" covers
            ident = (a_label, label_of(defense), protocol, mal, int(seed))
            if ident in seen:
                continue
            seen.add(ident)
            config = replace(
                self.base, attack=a_label, defense=label_of(defense), protocol=protocol, malicious=mal, seed=int(seed)
            )
            out.append(Cell(attack, defense, protocol, mal, int(seed), config))
        return out


def _instance(item: AttackLike | DefenseLike) -> Any:
    return None if isinstance(item, str) else copy.deepcopy(item)


def run_cell(
    cell: Cell,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> dict[str, Any]:
    """Run one cell and return its record (a flat JSON-ready dict; see ``cell_metrics``).

    A ``SecureFMLError`` raised by the run (e.g. a defense the protocol cannot run) becomes a
    record with ``"error"`` set, so one impossible combination does not stop a matrix.
    """
    from securefml.errors import SecureFMLError

    attack = _instance(cell.attack)
    defense = _instance(cell.defense)
    measured: dict[str, Any] = {}
    probe = attack if attack is not None else (make_attack(str(cell.attack)) if cell.malicious else None)

    def on_finish(server: Any, data: Any) -> dict[str, Any]:
        if probe is not None and is_backdoor(probe):
            from securefml.evaluation.metrics import backdoor_success

            steps = cell.config.resolved(data.kind)["finetune_steps"]
            measured.update(backdoor_success(server.learner, server.params, data.heldout, probe, steps=steps,
                                             device=server.device))
        return measured

    record = {"key": cell.key, **cell.coordinates()}
    try:
        if cell.config.engine == "flower":  # the [flower] extra; no per-round hook, no backdoor probe there
            result = _run_on_flower(cell.config, attack=attack, defense=defense)
        else:
            result = run_experiment(cell.config, on_round=on_round, attack=attack, defense=defense,
                                    on_finish=on_finish)
    except SecureFMLError as exc:
        record.update({"error": f"{type(exc).__name__}: {exc}"})
        return record
    record.update(cell_metrics(result))
    record["config"] = result.config
    return record


def _run_on_flower(config: RunConfig, *, attack: Any, defense: Any) -> Any:
    """A cell through ``securefml.flower.engine.run`` (``config.engine == "flower"``)."""
    try:
        from securefml.flower.engine import run
    except ImportError as exc:
        raise ConfigError(f"engine 'flower' needs Flower: pip install 'securefml[flower]' ({exc})") from None
    return run(config, attack=attack, defense=defense)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write None instead (tables show '-')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_matrix(
    matrix: Matrix,
    *,
    previous: Iterable[Mapping[str, Any]] = (),
    on_cell: Callable[[Cell, dict[str, Any], bool], None] | None = None,
    on_round: Callable[[Cell, RoundRecord], None] | None = None,
    threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Run every cell of ``matrix`` not already in ``previous`` and return all records in cell order.

    Parameters
    ----------
    previous:
        Records of an earlier (possibly interrupted) evaluation; a record whose ``key``
        matches a cell's and has no ``"error"`` is reused as is.
    on_cell:
        Called after each cell with ``(cell, record, reused)`` (progress, incremental saving).
    on_round:
        Called after each round of a running cell.
    threads:
        ``torch.set_num_threads`` for the runs (restored afterwards).  The default 1 is the
        fastest for these small models on shared CPUs, where torch's intra-op threads spin
        against each other; None keeps torch's setting.
    """
    done = {r["key"]: dict(r) for r in previous if "key" in r and not r.get("error")}
    records: list[dict[str, Any]] = []
    saved = torch.get_num_threads()
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        for cell in matrix.cells():
            reused = cell.key in done
            if reused:
                record = done[cell.key]
            else:
                hook = None if on_round is None else (lambda rec, c=cell: on_round(c, rec))
                record = {k: _finite(v) for k, v in run_cell(cell, on_round=hook).items()}
            records.append(record)
            if on_cell is not None:
                on_cell(cell, record, reused)
    finally:
        torch.set_num_threads(saved)
    return records

