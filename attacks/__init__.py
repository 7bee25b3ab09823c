"""Data-, model- and protocol-level attacks applied inside malicious clients (``securefml.attacks``)."""

from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.model_poisoning import SignFlip
from securefml.registry import Registry, parse_spec

__all__ = ["Attack", "AttackContext", "SignFlip", "ATTACKS", "make_attack"]

ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("none")(Attack)
ATTACKS.register("signflip")(SignFlip)


def make_attack(spec: str) -> Attack:
    """Build an attack from a CLI spec such as ``"signflip:scale=2"``."""
    name, kwargs = parse_spec(spec)
    if "_" in kwargs:
        raise_positional = kwargs.pop("_")
        kwargs["scale"] = raise_positional
    return ATTACKS.create(name, **kwargs)
