"""SecAgg+ as two halves over bytes (the contract of ``securefml.protocols.halves``).

The stages are SecAgg+'s (``secagg_messages.Stage``): ``advertise`` (the server's message is the
public ``RoundPlan`` as bytes; the client builds its ``SecAggClient`` from it), ``share``,
``complaints``, ``masked``, ``consistency`` (signed mode only) and ``unmask``.  Each stage's
server message is exactly what ``SecAggServer`` produces for that client, and each reply is what
``SecAggClient`` answers, so every check of those two classes (signed exclusions, the ``|U_i| >=
t`` floors, blame of inconsistent shares, the range check of the decoded sum) runs unchanged.

One server half runs one secure sum and reveals it (``Reveals.SUM``).  Bucketed mode is one
server half per bucket; ``SecAggPlus.run_round`` remains the optimized in-process driver (it
spreads mask expansion over worker processes), and a test checks both give the same sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefml.errors import InvalidUpdateError, ProtocolError
from securefml.protocols.halves import ClientHalf, ServerHalf, StageMessages
from securefml.protocols.secagg_client import SecAggClient
from securefml.protocols.secagg_messages import Stage
from securefml.protocols.secagg_plan import RoundPlan
from securefml.protocols.secagg_server import SecAggServer
from securefml.reveals import RevealedSums, Reveals

__all__ = ["SecAggClientHalf", "SecAggServerHalf"]


class SecAggServerHalf(ServerHalf):
    """The aggregator's half of one SecAgg+ secure sum, stage by stage."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.server = SecAggServer(plan)
        self._stages = [Stage.ADVERTISE, Stage.SHARE, Stage.COMPLAINTS, Stage.MASKED]
        if plan.signatures:
            self._stages.append(Stage.CONSISTENCY)
        self._stages.append(Stage.UNMASK)
        self._at = -1
        self._answered: set[int] = set(plan.cohort)  # who answered the previous stage
        self._replied: set[int] = set()
        self._result: RevealedSums | None = None

    @property
    def stage(self) -> Stage | None:
        return self._stages[self._at] if 0 <= self._at < len(self._stages) else None

    def next_stage(self) -> StageMessages | None:
        self._at += 1
        stage = self.stage
        if stage is None:
            return None
        self._replied = set()
        srv, st = self.server, self.server.state
        parties = sorted(self._answered)
        if stage is Stage.ADVERTISE:
            plan = self.plan.to_bytes()
            return StageMessages(stage.value, dict.fromkeys(parties, plan))
        if stage is Stage.SHARE:
            return StageMessages(stage.value, {c: srv.keys_for(c) for c in parties})
        if stage is Stage.COMPLAINTS:
            return StageMessages(stage.value, {c: srv.shares_for(c) for c in parties})
        if stage is Stage.MASKED:
            live = [c for c in parties if c not in st.excluded]
            return StageMessages(stage.value, {c: srv.exclusions_for(c) for c in live})
        if stage is Stage.CONSISTENCY:
            live = [c for c in st.contributors if c in self._answered]
            return StageMessages(stage.value, {c: srv.survivors_for(c) for c in live})
        askers = [c for c in (st.sigs if self.plan.signatures else st.contributors) if c in self._answered]
        return StageMessages(stage.value, {c: srv.request_for(c) for c in sorted(askers)})

    def receive(self, party: int, data: bytes) -> None:
        stage = self.stage
        srv = self.server
        receive: Mapping[Stage, Callable[[int, bytes], None]] = {
            Stage.ADVERTISE: srv.receive_advertise,
            Stage.SHARE: srv.receive_share,
            Stage.COMPLAINTS: srv.receive_complaints,
            Stage.MASKED: srv.receive_masked,
            Stage.CONSISTENCY: srv.receive_consistency,
            Stage.UNMASK: srv.receive_unmask,
        }
        if stage is None:
            raise ProtocolError("no stage is open", sender=party)
        receive[stage](party, data)
        self._replied.add(party)

    def reject(self, party: int, error: ProtocolError | InvalidUpdateError) -> None:
        typed = error if isinstance(error, ProtocolError) else ProtocolError(str(error), sender=party)
        self.server.reject(party, typed)
        self._replied.discard(party)

    def close_stage(self) -> None:
        stage = self.stage
        self._answered = set(self._replied)
        if stage is Stage.COMPLAINTS:
            self.server.close_complaints()
        elif stage is Stage.MASKED:
            self.server.close_masked()
        elif stage is Stage.UNMASK:
            self._finish()

    def _finish(self) -> None:
        plan, st = self.plan, self.server.state
        total = self.server.finish()
        weighted_sum, total_weight = plan.fixed_point.decode_sum(total)
        contributors = st.contributors
        plan.fixed_point.check_sum(weighted_sum, total_weight, len(contributors))
        self._result = RevealedSums(
            kind=Reveals.SUM,
            layers=plan.layers,
            sums=(torch.from_numpy(np.asarray(weighted_sum, dtype=np.float64)),),
            total_weights=(float(total_weight),),
            contributors=(tuple(contributors),),
            error_bound=plan.fixed_point.error_bound(len(contributors), float(total_weight)),
            rejected={c: f"{type(e).__name__}: {e}" for c, e in st.rejected.items()},
        )

    def revealed(self) -> RevealedSums:
        if self._result is None:
            raise ProtocolError("the round has not finished", sender=None)
        return self._result


class SecAggClientHalf(ClientHalf):
    """A client's half of one SecAgg+ secure sum: builds its ``SecAggClient`` from the plan bytes.

    Parameters
    ----------
    party:
        This client's id.
    vector, weight:
        Its update over the plan's layers, and its aggregation weight.
    round_idx:
        The round it expects (a plan of another round is refused as a replay).
    identity:
        Its Ed25519 identity key (signed mode).
    trusted_identities:
        The public identity keys this client trusts (its PKI); when given, a plan that carries
        other keys is refused, so the server cannot substitute identities.
    noise_fn:
        Distributed-DP hook, as in ``SecAggClient.masked``.
    """

    def __init__(
        self,
        party: int,
        vector: torch.Tensor | np.ndarray,
        weight: float,
        *,
        round_idx: int,
        identity: Ed25519PrivateKey | None = None,
        trusted_identities: Mapping[int, bytes] | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.party = party
        self.vector = vector
        self.weight = float(weight)
        self.round_idx = round_idx
        self.identity = identity
        self.trusted = dict(trusted_identities) if trusted_identities is not None else None
        self.noise_fn = noise_fn
        self.client: SecAggClient | None = None

    def respond(self, stage: str, message: bytes) -> bytes:
        if stage == Stage.ADVERTISE.value:
            if self.client is not None:
                raise ProtocolError("the round plan arrived twice", sender=None)
            plan = RoundPlan.from_bytes(message, round_idx=self.round_idx)
            if self.trusted is not None and any(
                plan.identities.get(c) != key for c, key in self.trusted.items() if c in plan.cohort
            ):
                raise ProtocolError("the plan's identity keys differ from the trusted ones", sender=None)
            self.client = SecAggClient(self.party, plan, identity=self.identity)
            return self.client.advertise()
        if self.client is None:
            raise ProtocolError(f"stage {stage!r} before the round plan", sender=None)
        cl = self.client
        if stage == Stage.SHARE.value:
            return cl.share(message)
        if stage == Stage.COMPLAINTS.value:
            return cl.complain(message)
        if stage == Stage.MASKED.value:
            return cl.masked(message, self.vector, self.weight, noise_fn=self.noise_fn)
        if stage == Stage.CONSISTENCY.value:
            return cl.consistency(message)
        if stage == Stage.UNMASK.value:
            return cl.unmask(message)
        raise ProtocolError(f"unknown SecAgg+ stage {stage!r}", sender=None)
