"""CKKS on Flower: each party in its own place, the key holder on a SuperNode of its own.

How it is deployed (``docs/flower.md``):

- **Keys** are made before the run by ``securefml.flower.provision`` (in its own process), one
  file per secret, and copied out of band: the secret context to the key holder only, each
  signing key to its client only, the public context and manifest to everyone.
- **The ServerApp** builds ``PublicCKKS`` from ``public.ckks`` and ``manifest.json``: the CKKS
  server half with the public context only (``is_private()`` is False; there is no key holder
  object in its process and ``service_halves`` refuses to make one).
- **The key holder** is a SuperNode started with ``--node-config "securefml-role='key-holder'"``;
  it announces party ``KEY_HOLDER_PARTY`` to the strategy (``SecureStrategy`` maps that party to
  it with ``service_nodes``), loads ``key-holder.secret`` in its own process and answers the
  ``gram`` and ``decrypt`` stages with ``CKKSKeyHolderHalf``; its policy and per-round ledger
  (what was decrypted) persist in that process across rounds.
- **A client** SuperNode loads its own ``signing/<id>.key`` and the public context, and answers
  ``announce`` and ``update`` with ``CKKSClientHalf``.

``CKKSDeployment`` names a provisioned directory (a frozen dataclass of one path: what a Flower
runtime ships to its ClientApp processes, never a key) and plays both roles of
``securefml.flower.client.securefml_mod``: ``client_half`` (a client node) and ``service_half``
(the key-holder node).  Everything is loaded lazily, once per process, from the files.

Threat model: the CKKS protocol's (``securefml.protocols.ckks``), with the key holder as a
separate, non-colluding party; Flower's SuperLink and the ServerApp relay its messages and see
only what the server half sees.  Only a node whose own configuration says it is the key holder
ever loads the secret key; a message for ``KEY_HOLDER_PARTY`` reaching any other node is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context

from securefml.errors import ConfigError
from securefml.flower.provision import PUBLIC, REGISTRY, SECRET, Manifest, read_manifest, signing_key_path
from securefml.protocols.base import HalvesSetup
from securefml.protocols.ckks import CKKS
from securefml.protocols.ckks_auth import UploadSigner
from securefml.protocols.ckks_client import CKKSClient
from securefml.protocols.ckks_client_half import CKKSClientHalf
from securefml.protocols.ckks_key_holder_half import CKKSKeyHolderHalf
from securefml.protocols.ckks_keys import CKKSKeyHolder, context_fingerprint, get_preset
from securefml.protocols.ckks_params import KEY_HOLDER_PARTY
from securefml.protocols.ckks_policy import DecryptionPolicy
from securefml.protocols.ckks_server import CKKSServer
from securefml.protocols.ckks_stats import check_zero_floor
from securefml.protocols.halves import ClientHalf
from securefml.rounds import ClientUpdate
from securefml.updates import LayerLayout

__all__ = ["PublicCKKS", "CKKSDeployment", "ROLE_KEY", "KEY_HOLDER_ROLE", "KEYS_KEY", "LEDGER_KEY", "node_role",
           "forget_parties"]

log = logging.getLogger(__name__)

#: node_config key naming a SuperNode's securefml role, and the key holder's role value.
ROLE_KEY = "securefml-role"
KEY_HOLDER_ROLE = "key-holder"
#: node_config key of the provisioned directory on that node (overrides the run's own).
KEYS_KEY = "securefml-keys"
#: ``Context.state`` key of the key holder's ledger (``CKKSDeployment.save_state``).
LEDGER_KEY = "securefml.key-holder-ledger"

#: per-process caches, keyed by the provisioned directory (see the module docstring)
_PUBLIC: dict[str, PublicCKKS] = {}
_KEY_HOLDERS: dict[str, CKKSKeyHolder] = {}


def forget_parties() -> None:
    """Drop every loaded key holder and public protocol of this process (tests; a new run)."""
    _PUBLIC.clear()
    _KEY_HOLDERS.clear()


def node_role(context: Context, key_holder_partition: int | None = None) -> str:
    """This SuperNode's securefml role: ``"client"`` unless its node config says otherwise.

    A deployment names the role in ``--node-config`` (``securefml-role``); Flower's simulation
    assigns node configs itself (``partition-id``), so there the key holder is the node whose
    partition id is ``key_holder_partition``.
    """
    if ROLE_KEY in context.node_config:
        return str(context.node_config[ROLE_KEY])
    if key_holder_partition is not None and context.node_config.get("partition-id") == key_holder_partition:
        return KEY_HOLDER_ROLE
    return "client"


class PublicCKKS(CKKS):
    """The CKKS protocol as the ServerApp (and a client) holds it: public context, no key holder.

    Parameters
    ----------
    public_context:
        The key holder's public context (``public.ckks``).
    preset, policy:
        The provisioned preset name and the key holder's ``DecryptionPolicy`` (``manifest.json``).
    signer_for:
        ``signer_for(client_id) -> UploadSigner`` on a client node (its provisioned key); ``None``
        in the ServerApp, which signs nothing.
    replay_window:
        Rounds of ciphertext digests the server half remembers.
    zero_floor:
        The decode's resolution floor, as ``CKKS(zero_floor=...)`` (None: the preset's default).
    """

    def __init__(
        self,
        public_context: bytes,
        preset: str,
        policy: DecryptionPolicy,
        *,
        signer_for: Callable[[int], UploadSigner] | None = None,
        replay_window: int = 8,
        zero_floor: float | None = None,
    ) -> None:
        p = get_preset(preset)
        self.zero_floor = None if zero_floor is None else check_zero_floor(zero_floor)
        self.key_holder = None  # type: ignore[assignment]  # on its own SuperNode, never here
        self.preset = p
        self._policy = policy
        self._public = bytes(public_context)
        self.fingerprint = context_fingerprint(self._public)
        self.server = CKKSServer(self._public, p, replay_window=replay_window)
        self.client = CKKSClient(self._public, p)
        self._signers: dict[int, UploadSigner] = {}
        self._signer_for = signer_for

    @property
    def min_contributors(self) -> int:
        return self._policy.min_contributors

    @property
    def policy(self) -> DecryptionPolicy:
        return self._policy

    def enroll(self, party_id: int) -> UploadSigner:
        """This node's provisioned signing key (enrolment happened out of band, at provisioning)."""
        pid = int(party_id)
        if pid not in self._signers:
            if self._signer_for is None:
                raise ConfigError("this CKKS driver holds no signing keys (the ServerApp's): "
                                  f"party {pid} signs on its own node")
            signer = self._signer_for(pid)
            if signer.party_id != pid:
                raise ConfigError(f"the signing key loaded for party {pid} is party {signer.party_id}'s")
            self._signers[pid] = signer
        return self._signers[pid]

    def service_halves(self, round_idx: int, layout: LayerLayout, *, setup: HalvesSetup) -> dict[int, ClientHalf]:
        """Refused: the key holder is a SuperNode of its own (``CKKSDeployment.service_half``)."""
        raise ConfigError("the CKKS key holder runs on its own SuperNode, not beside the server half: "
                          "drive this protocol with SecureStrategy(service_nodes={KEY_HOLDER_PARTY: ...})")


@dataclass(frozen=True)
class CKKSDeployment:
    """A provisioned CKKS key set, as each Flower party loads its own part of it.

    Parameters
    ----------
    directory:
        The directory ``securefml.flower.provision`` wrote (on a node, ``node_config["securefml-keys"]``
        overrides it: each machine has its own copy holding only its own files).
    key_holder_partition:
        In Flower's simulation, the partition id of the node that plays the key holder.
    """

    directory: str
    key_holder_partition: int | None = None

    def role(self, context: Context) -> str:
        """This node's role (``node_role`` with this deployment's simulation partition)."""
        return node_role(context, self.key_holder_partition)

    def service_party(self, context: Context) -> int | None:
        """``KEY_HOLDER_PARTY`` on the key-holder node (what it announces), else ``None``."""
        return KEY_HOLDER_PARTY if self.role(context) == KEY_HOLDER_ROLE else None

    def _dir(self, context: Context | None) -> str:
        if context is not None and KEYS_KEY in context.node_config:
            return str(context.node_config[KEYS_KEY])
        return self.directory

    def manifest(self, context: Context | None = None) -> Manifest:
        return read_manifest(self._dir(context))

    def protocol(self, context: Context | None = None) -> PublicCKKS:
        """The public protocol of this process (one per directory), with this node's signing keys."""
        where = self._dir(context)
        if where not in _PUBLIC:
            man = read_manifest(where)
            public = (Path(where) / PUBLIC).read_bytes()
            if context_fingerprint(public).hex() != man.fingerprint:
                raise ConfigError(f"{where}: the public context does not match the manifest's fingerprint")

            def signer_for(pid: int) -> UploadSigner:
                path = signing_key_path(where, pid)
                if not path.exists():
                    raise ConfigError(f"party {pid} has no provisioned signing key on this node ({path})")
                return UploadSigner.from_private_bytes(pid, path.read_bytes())

            _PUBLIC[where] = PublicCKKS(public, man.preset, man.policy, signer_for=signer_for)
        return _PUBLIC[where]

    def server_protocol(self) -> PublicCKKS:
        """What the ServerApp drives: the public protocol (it never reads the secret file)."""
        return self.protocol(None)

    # -- securefml_mod's two roles ---------------------------------------------------------------
    def client_half(self, round_idx: int, layout: LayerLayout, update: ClientUpdate) -> CKKSClientHalf:
        """A client node's half, signed with its provisioned key."""
        return self.protocol(None).client_half(round_idx, layout, update)

    def service_half(self, context: Context, round_idx: int, party: int, layout: LayerLayout) -> ClientHalf | None:
        """The key holder's half on the key-holder node; ``None`` on any other node or party."""
        if party != KEY_HOLDER_PARTY or self.role(context) != KEY_HOLDER_ROLE:
            return None
        return CKKSKeyHolderHalf(self.key_holder(context), layout, round_idx=round_idx)

    def save_state(self, context: Context) -> None:
        """On the key-holder node: its ledger (what it decrypted, per round) into ``context.state``.

        A SuperNode may start a fresh process per message; the ledger is what stops a server
        from getting the same chunk, or a second Gram, decrypted twice in a round, so it must
        outlive the process.  It holds no secret (``CKKSKeyHolder.state_dict``).
        """
        where = self._dir(context)
        if self.role(context) == KEY_HOLDER_ROLE and where in _KEY_HOLDERS:
            ledger = json.dumps(_KEY_HOLDERS[where].state_dict(), sort_keys=True).encode("utf-8")
            context.state[LEDGER_KEY] = ConfigRecord({"version": 1, "ledger": ledger})

    def key_holder(self, context: Context) -> CKKSKeyHolder:
        """Load the key holder (once per process) on a node whose role is ``key-holder``."""
        if self.role(context) != KEY_HOLDER_ROLE:
            raise ConfigError(f"only a node with {ROLE_KEY}={KEY_HOLDER_ROLE!r} loads the CKKS secret key")
        where = self._dir(context)
        if where not in _KEY_HOLDERS:
            man = read_manifest(where)
            holder = CKKSKeyHolder.from_secret_context((Path(where) / SECRET).read_bytes(),
                                                       (Path(where) / PUBLIC).read_bytes(), man.preset,
                                                       policy=man.policy)
            if holder.fingerprint.hex() != man.fingerprint:
                raise ConfigError(f"{where}: the secret context does not match the manifest's fingerprint")
            holder.registry.load_state_dict(json.loads((Path(where) / REGISTRY).read_text()))
            saved = context.state.config_records.get(LEDGER_KEY)
            if saved is not None:  # this node's ledger from an earlier process
                data = saved.get("ledger")
                if saved.get("version") != 1 or not isinstance(data, bytes):
                    raise ConfigError("the key holder's saved ledger is not version-1 bytes")
                holder.load_state_dict(json.loads(data.decode("utf-8")))
            _KEY_HOLDERS[where] = holder
            log.info("key holder loaded in this process: %r", holder)
        return _KEY_HOLDERS[where]

    def client_ids(self) -> Sequence[int]:
        """The enrolled parties (``manifest.json``)."""
        return self.manifest().parties
