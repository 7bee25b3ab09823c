"""Protocol-level attacks: ``Transport`` subclasses that corrupt chosen senders' messages.

Every protocol carries its messages as bytes over a ``Transport`` (``securefml.protocols.base``),
so these attacks work against any protocol without hooks in its code.  Each one acts on the
messages of chosen ``senders`` (None = every sender) at a chosen ``stage`` (None = every
stage), leaves the rest untouched, and records what it did in ``log`` so a test can check it
really fired.  They can be chained through ``inner`` (the inner transport delivers first).

What a robust protocol must do with each (DESIGN.md, "Every message crosses a wire codec"):

=================  ===================================================  ==========================
attack             what it sends                                        expected rejection
=================  ===================================================  ==========================
``Truncate``       the first part of the message                        ``MalformedMessageError``
``Oversize``       the message followed by extra bytes                  ``MalformedMessageError``
``Malformed``      random bytes, a bad magic or an unknown version      ``MalformedMessageError``
``Tamper``         random byte flips (optionally in one named field)    a ``ProtocolError``
``Replay``         a message recorded in an earlier round               ``ReplayError``
``WrongSender``    the message relabelled as another sender's           ``ReplayError``
``WrongRound``     the message relabelled with another round            ``ReplayError``
``Duplicate``      a copy of another client's message, or one framed    ``ReplayError`` /
                   twice                                                ``MalformedMessageError``
``Drop``           nothing (the client drops out)                       dropout handling
``LieAbout...``   a server survivor list that omits live clients      protocol-specific
=================  ===================================================  ==========================

Threat model: Byzantine clients (or a network adversary) control the bytes of their own
messages; ``LieAboutDropouts`` models an active server.  Payload tampering is only detectable
where the protocol authenticates the payload (AES-GCM sealed shares, signatures).  The
plaintext protocol has no integrity protection, so byte flips that still decode to a finite,
well-formed update are accepted there by design.  CKKS ciphertexts carry no tag, but each
client signs the SHA-256 of its ciphertexts (Ed25519): structural damage fails to load, and a
flip that still loads fails the signature; both are rejected naming the sender.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from securefml.attacks.registry import PROTOCOL_ATTACKS
from securefml.errors import ConfigError, SecureFMLError
from securefml.protocols.base import Transport
from securefml.protocols.wire import Envelope, decode, encode, pack_array, unpack_array

__all__ = [
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
]


@dataclass(frozen=True)
class TamperEvent:
    """One message an attack changed: who sent it, at which stage, and what was done."""

    sender: int
    stage: str
    action: str


def _peek(data: bytes) -> Envelope | None:
    """Decode an envelope, or None if the bytes are not one (then attacks that need it pass)."""
    try:
        return decode(data)
    except SecureFMLError:
        return None


class TamperingTransport(Transport):
    """Base class: apply ``tamper`` to the messages of ``senders`` at ``stage``.

    Parameters
    ----------
    senders:
        Ids whose messages are attacked; None attacks every sender.
    stage:
        The protocol stage to attack (``"update"`` for ``Plaintext``); None attacks every stage.
    seed:
        Seed of the attack's own random generator (byte positions, garbage).
    inner:
        A transport that delivers first (to chain attacks or combine them with dropouts).
    """

    action = "tamper"

    def __init__(
        self,
        senders: Iterable[int] | None,
        *,
        stage: str | None = "update",
        seed: int = 0,
        inner: Transport | None = None,
    ) -> None:
        self.senders = None if senders is None else frozenset(int(s) for s in senders)
        self.stage = stage
        self.seed = int(seed)
        self.inner = inner
        self.log: list[TamperEvent] = []
        self._generator = torch.Generator().manual_seed(self.seed)

    def targets(self, sender: int, stage: str) -> bool:
        """Whether this message is one the attack acts on."""
        return (self.senders is None or sender in self.senders) and (self.stage is None or stage == self.stage)

    def deliver(self, sender: int, stage: str, data: bytes) -> bytes | None:
        if self.inner is not None:
            passed = self.inner.deliver(sender, stage, data)
            if passed is None:
                return None
            data = passed
        if not self.targets(sender, stage):
            self.observe(sender, stage, data)
            return data
        out = self.tamper(sender, stage, data)
        if out is not data:
            self.log.append(TamperEvent(sender, stage, self.action))
        return out

    def observe(self, sender: int, stage: str, data: bytes) -> None:
        """See an untouched message (attacks that record others' messages override this)."""

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes | None:
        """Return the bytes to deliver instead of ``data`` (return ``data`` itself to leave it)."""
        return data

    def _randint(self, high: int, size: int = 1) -> list[int]:
        return torch.randint(0, high, (size,), generator=self._generator).tolist()

    def __repr__(self) -> str:
        senders = "all" if self.senders is None else sorted(self.senders)
        return f"{type(self).__name__}(senders={senders}, stage={self.stage!r})"


@PROTOCOL_ATTACKS.register("truncate")
class Truncate(TamperingTransport):
    """Deliver only the first ``keep`` fraction of the message (at least one byte is cut)."""

    action = "truncate"

    def __init__(self, senders: Iterable[int] | None, *, keep: float = 0.5, **kwargs: Any) -> None:
        if not 0 <= keep < 1:
            raise ConfigError(f"Truncate keep must be in [0, 1), got {keep}")
        super().__init__(senders, **kwargs)
        self.keep = float(keep)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        return bytes(data[: min(len(data) - 1, int(len(data) * self.keep))])


@PROTOCOL_ATTACKS.register("oversize")
class Oversize(TamperingTransport):
    """Append ``extra`` random bytes (a padded or oversized message)."""

    action = "oversize"

    def __init__(self, senders: Iterable[int] | None, *, extra: int = 64, **kwargs: Any) -> None:
        if int(extra) < 1:
            raise ConfigError(f"Oversize extra must be at least 1 byte, got {extra}")
        super().__init__(senders, **kwargs)
        self.extra = int(extra)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        pad = torch.randint(0, 256, (self.extra,), generator=self._generator, dtype=torch.uint8)
        return bytes(data) + pad.numpy().tobytes()


@PROTOCOL_ATTACKS.register("malformed")
class Malformed(TamperingTransport):
    """Replace the message by random bytes (``"garbage"``), or break its magic or version."""

    action = "malformed"

    def __init__(self, senders: Iterable[int] | None, *, mode: str = "garbage", **kwargs: Any) -> None:
        if mode not in ("garbage", "magic", "version"):
            raise ConfigError(f"unknown Malformed mode {mode!r}; choose one of: garbage, magic, version")
        super().__init__(senders, **kwargs)
        self.mode = mode

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        raw = bytearray(data)
        if self.mode == "garbage":
            garbage = torch.randint(0, 256, (max(1, len(raw)),), generator=self._generator, dtype=torch.uint8)
            out = bytearray(garbage.numpy().tobytes())
            if out[:4] == b"SFML":  # astronomically unlikely, but never deliver a valid header
                out[0] ^= 0xFF
            return bytes(out)
        if self.mode == "magic":
            raw[:4] = b"JUNK"  # not the SFML magic
        else:
            raw[4] = 255
        return bytes(raw)


@PROTOCOL_ATTACKS.register("tamper")
class Tamper(TamperingTransport):
    """Flip ``n_bytes`` random bytes, anywhere or inside one named envelope ``field``.

    With ``field`` set, the message is decoded, the field's value is corrupted and the
    envelope re-encoded (so framing stays valid and only the content check can catch it): a
    tampered share or ciphertext.  Messages lacking that field are left untouched.
    """

    action = "tamper"

    def __init__(
        self, senders: Iterable[int] | None, *, field: str | None = None, n_bytes: int = 1, **kwargs: Any
    ) -> None:
        if int(n_bytes) < 1:
            raise ConfigError(f"Tamper n_bytes must be at least 1, got {n_bytes}")
        super().__init__(senders, **kwargs)
        self.field = field
        self.n_bytes = int(n_bytes)

    def _flip(self, raw: bytes) -> bytes:
        buf = bytearray(raw)
        positions: set[int] = set()
        while len(positions) < min(self.n_bytes, len(buf)):  # distinct positions: no flip undoes another
            positions.add(self._randint(len(buf))[0])
        for pos in sorted(positions):
            buf[pos] ^= 1 + self._randint(255)[0]  # a non-zero xor: the byte really changes
        return bytes(buf)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        if self.field is None:
            return self._flip(data) if data else data
        env = _peek(data)
        if env is None or not env.fields.get(self.field):
            return data
        fields = dict(env.fields)
        fields[self.field] = self._flip(fields[self.field])
        return encode(replace(env, fields=fields))


@PROTOCOL_ATTACKS.register("replay")
class Replay(TamperingTransport):
    """Record each target's first message and resend it in every later round.

    The round is read from the envelope; within the recorded round the genuine message
    passes (so the first round looks normal), afterwards the stale one is delivered.
    """

    action = "replay"

    def __init__(self, senders: Iterable[int] | None, **kwargs: Any) -> None:
        super().__init__(senders, **kwargs)
        self._recorded: dict[tuple[int, str], tuple[int, bytes]] = {}

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        env = _peek(data)
        if env is None:
            return data
        key = (sender, stage)
        if key not in self._recorded:
            self._recorded[key] = (env.round, bytes(data))
            return data
        rnd, old = self._recorded[key]
        return old if env.round != rnd else data


@PROTOCOL_ATTACKS.register("wrong-sender")
class WrongSender(TamperingTransport):
    """Relabel the message's sender field as ``claim`` (default: the sender's id + 1)."""

    action = "wrong-sender"

    def __init__(self, senders: Iterable[int] | None, *, claim: int | None = None, **kwargs: Any) -> None:
        super().__init__(senders, **kwargs)
        self.claim = None if claim is None else int(claim)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        env = _peek(data)
        if env is None:
            return data
        claim = self.claim if self.claim is not None and self.claim != env.sender else env.sender + 1
        return encode(replace(env, sender=claim))


@PROTOCOL_ATTACKS.register("wrong-round")
class WrongRound(TamperingTransport):
    """Relabel the message's round field as ``round + offset``."""

    action = "wrong-round"

    def __init__(self, senders: Iterable[int] | None, *, offset: int = 1, **kwargs: Any) -> None:
        if int(offset) == 0:
            raise ConfigError("WrongRound offset must be non-zero")
        super().__init__(senders, **kwargs)
        self.offset = int(offset)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        env = _peek(data)
        if env is None:
            return data
        return encode(replace(env, round=(env.round + self.offset) % (1 << 32)))


@PROTOCOL_ATTACKS.register("duplicate")
class Duplicate(TamperingTransport):
    """Send a copy of ``source``'s latest message at this stage, or (no ``source``) one's own
    message framed twice in one delivery.

    Copying another client's message (free-riding on its update, or doubling its weight) is
    caught by the sender binding; a doubled frame by the length checks.  If ``source`` has not
    sent anything yet in this stage, the message is left untouched (nothing to copy).
    """

    action = "duplicate"

    def __init__(self, senders: Iterable[int] | None, *, source: int | None = None, **kwargs: Any) -> None:
        super().__init__(senders, **kwargs)
        self.source = None if source is None else int(source)
        self._latest: dict[tuple[int, str], bytes] = {}

    def observe(self, sender: int, stage: str, data: bytes) -> None:
        self._latest[(sender, stage)] = bytes(data)

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        if self.source is None:
            return bytes(data) + bytes(data)
        return self._latest.get((self.source, stage), data)


@PROTOCOL_ATTACKS.register("drop")
class Drop(TamperingTransport):
    """The targets drop out: their messages at ``stage`` never arrive."""

    action = "drop"

    def tamper(self, sender: int, stage: str, data: bytes) -> None:
        return None


class LieAboutDropouts(TamperingTransport):
    """Active-server attack: remove live clients from a survivor list the server sends.

    In SecAgg the server tells the survivors which clients dropped so that they reveal the
    dropped clients' mask seeds.  A malicious server that calls a *live* client "dropped"
    could learn both that client's self-mask share and its pairwise seeds, and unmask its
    individual update; SecAgg's consistency round (signed survivor lists) must refuse.  This
    transport rewrites the id-list ``field`` of every envelope that carries it (optionally only
    envelopes of ``kind``) so that the ids in ``claim_dropped`` are gone.  It acts wherever the
    protocol routes the server's messages through a ``Transport``.

    Parameters
    ----------
    claim_dropped:
        Live clients the server pretends have dropped out.
    field:
        Name of the survivor-list field (``"alive"`` in securefml's SecAgg messages).
    encoding:
        ``"u32be"`` (concatenated big-endian u32 ids) or ``"array"`` (``wire.pack_array``).
    kind:
        Only envelopes of this kind (None: any envelope carrying ``field``).
    stage, senders:
        As for ``TamperingTransport`` (default: every stage, every sender).
    """

    action = "lie-about-dropouts"

    def __init__(
        self,
        claim_dropped: Iterable[int],
        *,
        field: str = "alive",
        encoding: str = "u32be",
        kind: str | None = None,
        stage: str | None = None,
        senders: Iterable[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if encoding not in ("u32be", "array"):
            raise ConfigError(f"unknown id-list encoding {encoding!r}; choose u32be or array")
        super().__init__(senders, stage=stage, **kwargs)
        self.claim_dropped = frozenset(int(c) for c in claim_dropped)
        if not self.claim_dropped:
            raise ConfigError("LieAboutDropouts needs at least one client to claim dropped")
        self.field = field
        self.encoding = encoding
        self.kind = kind

    def tamper(self, sender: int, stage: str, data: bytes) -> bytes:
        env = _peek(data)
        if env is None or self.field not in env.fields or (self.kind is not None and env.kind != self.kind):
            return data
        raw = env.fields[self.field]
        if self.encoding == "array":
            ids = unpack_array(raw)
            kept = np.array([i for i in ids.tolist() if int(i) not in self.claim_dropped], dtype=ids.dtype)
            new_raw, changed = pack_array(kept), kept.size != ids.size
        else:
            if len(raw) % 4:
                return data
            ids_be = [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]
            kept_be = [i for i in ids_be if i not in self.claim_dropped]
            new_raw, changed = b"".join(i.to_bytes(4, "big") for i in kept_be), len(kept_be) != len(ids_be)
        if not changed:
            return data
        fields = dict(env.fields)
        fields[self.field] = new_raw
        return encode(replace(env, fields=fields))
