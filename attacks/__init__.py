"""Data-, model- and protocol-level attacks applied inside malicious clients (``securefml.attacks``).

One module per family: ``data_poisoning`` (LabelFlip, Backdoor), ``model_poisoning`` (SignFlip,
Gaussian, Scaling, ALIE, IPM, MinMax, MinSum, Fang's attacks, Mimic), ``adaptive`` (a line
search against the server's own rule), ``meta_attacks`` (attacks on meta-learning), and
``protocol_attacks`` (``Transport`` subclasses that corrupt messages on the wire).  Subclass
``Attack`` to write your own.
"""

from securefml.attacks.adaptive import Adaptive, defense_deviation
from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.data_poisoning import Backdoor, LabelFlip, attack_success_rate
from securefml.attacks.meta_attacks import MetaBackdoor, MetaSGDLearningRate
from securefml.attacks.model_poisoning import (
    ALIE,
    IPM,
    FangKrum,
    FangTrimmedMean,
    Gaussian,
    Mimic,
    MinMax,
    MinSum,
    ModelReplacement,
    Scaling,
    SignFlip,
    alie_z,
)
from securefml.attacks.optimal import OptimalALIE, OptimalIPM
from securefml.attacks.protocol_attacks import (
    Drop,
    Duplicate,
    LieAboutDropouts,
    Malformed,
    Oversize,
    Replay,
    Tamper,
    TamperEvent,
    TamperingTransport,
    Truncate,
    WrongRound,
    WrongSender,
)
from securefml.attacks.registry import ATTACKS, PROTOCOL_ATTACKS
from securefml.registry import import_submodules

__all__ = [
    "Attack",
    "AttackContext",
    "SignFlip",
    "Gaussian",
    "Scaling",
    "ModelReplacement",
    "ALIE",
    "IPM",
    "MinMax",
    "MinSum",
    "FangKrum",
    "FangTrimmedMean",
    "Mimic",
    "alie_z",
    "LabelFlip",
    "Backdoor",
    "attack_success_rate",
    "Adaptive",
    "defense_deviation",
    "OptimalALIE",
    "OptimalIPM",
    "MetaBackdoor",
    "MetaSGDLearningRate",
    "TamperEvent",
    "TamperingTransport",
    "Truncate",
    "Oversize",
    "Malformed",
    "Tamper",
    "Replay",
    "WrongSender",
    "WrongRound",
    "Duplicate",
    "Drop",
    "LieAboutDropouts",
    "ATTACKS",
    "PROTOCOL_ATTACKS",
    "make_attack",
    "make_protocol_attack",
]

# Every module registers its own definitions (decorators beside them); import them all.
import_submodules(__name__, __path__)




def make_attack(spec: str) -> Attack:
    """Build an attack from a CLI spec such as ``"signflip:scale=2"`` or ``"ipm:epsilon=0.5"``.

    A bare value sets the attack's main option (``"ipm:0.5"``, ``"alie:1.5"``; ``scale``
    for the rest).

    >>> make_attack("ipm:0.5")
    IPM(epsilon=0.5, omniscient=True)
    """
    return ATTACKS.build(spec)


def make_protocol_attack(spec: str, senders: list[int] | None) -> TamperingTransport:
    """Build a protocol attack on ``senders`` from a spec such as ``"truncate:keep=0.3"``.

    ``LieAboutDropouts`` needs the clients it lies about and is built directly.
    """
    return PROTOCOL_ATTACKS.build(spec, senders=senders)
