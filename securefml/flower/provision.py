"""Out-of-band CKKS key provisioning for a Flower deployment: one directory, one file per secret.

On Flower the CKKS key holder is its own SuperNode (``securefml.flower.ckks_parties``), and the
ServerApp holds the public context only.  Who makes the keys, then?  A provisioning step on a
machine the operator trusts, before the run, writes:

``manifest.json``
    Version, preset name, the key holder's ``DecryptionPolicy``, the enrolled party ids and the
    public context's fingerprint (public: every party reads it).
``public.ckks``
    The public context (public key, relinearization and Galois keys): ServerApp and clients.
``key-holder.secret`` (mode 0600)
    The secret context: copy it to the key-holder SuperNode only.
``key-holder.registry.json``
    The enrolled verify keys (public): the key-holder SuperNode.
``signing/<party>.key`` (mode 0600)
    Party ``<party>``'s raw 32-byte Ed25519 signing key: copy it to that client only.

Nothing is pickled; every file is bytes or JSON.  ``provision_in_subprocess`` runs the step in a
fresh Python process (``python -m securefml.flower.provision``), so the process that later
hosts the ServerApp (``securefml run --engine flower`` runs it in-process) never holds the secret
key, not even while it is being generated.

Threat model: the provisioning machine and the channel that carries each file to its party are
trusted (this is the out-of-band enrolment ``CKKS.enroll`` models in-process); the server sees
``manifest.json`` and ``public.ckks`` only.  A server that sends clients another public context
is caught by the client half (the plan's context fingerprint must match the provisioned one).

Example (the deployment recipe in ``docs/flower.md``)::

    python -m securefml.flower.provision keys/ --parties 0-99 --preset stats --min-contributors 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from securefml.errors import ConfigError
from securefml.protocols.ckks_keys import CKKSKeyHolder, context_fingerprint, get_preset
from securefml.protocols.ckks_policy import DecryptionPolicy

__all__ = [
    "MANIFEST",
    "PUBLIC",
    "SECRET",
    "REGISTRY",
    "SIGNING",
    "VERSION",
    "Manifest",
    "provision",
    "provision_in_subprocess",
    "read_manifest",
    "signing_key_path",
]

log = logging.getLogger(__name__)

VERSION = 1
MANIFEST = "manifest.json"
PUBLIC = "public.ckks"
SECRET = "key-holder.secret"
REGISTRY = "key-holder.registry.json"
SIGNING = "signing"


@dataclass(frozen=True)
class Manifest:
    """The public facts of a provisioned key set (``manifest.json``)."""

    preset: str
    policy: DecryptionPolicy
    parties: tuple[int, ...]
    fingerprint: str
    version: int = VERSION


def signing_key_path(directory: str | Path, party: int) -> Path:
    """Where party ``party``'s signing key lives in a provisioned directory."""
    return Path(directory) / SIGNING / f"{int(party)}.key"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def provision(
    directory: str | Path,
    parties: Sequence[int],
    *,
    preset: str = "stats",
    policy: DecryptionPolicy | None = None,
) -> Manifest:
    """Generate a key holder and one signing key per party, and write them to ``directory``.

    Parameters
    ----------
    directory:
        Created if missing; must not hold a key set already (keys are never overwritten).
    parties:
        Client ids (and the reference party's id, if any) to enrol.
    preset:
        A named CKKS preset (``"stats"`` for robust rules, ``"add-only"`` for ``Mean``).
    policy:
        The key holder's decryption policy (default ``DecryptionPolicy()``).

    Raises
    ------
    ConfigError
        For an unknown preset, duplicate party ids or a directory that already holds keys.
    """
    from securefml.protocols.ckks_auth import UploadSigner  # the signing keys are made here only

    ids = tuple(int(p) for p in parties)
    if len(set(ids)) != len(ids) or not ids:
        raise ConfigError(f"parties must be distinct and non-empty, got {list(ids)[:10]}")
    p = get_preset(preset)
    pol = policy or DecryptionPolicy()
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).exists() or (root / SECRET).exists():
        raise ConfigError(f"{root} already holds a provisioned key set; provision into an empty directory")
    holder = CKKSKeyHolder.generate(p, policy=pol)
    (root / SIGNING).mkdir(exist_ok=True)
    for pid in ids:
        signer = UploadSigner.generate(pid)
        holder.registry.register(pid, signer.verify_key())
        _write_private(signing_key_path(root, pid), signer.private_bytes())
    public = holder.public_context_bytes()
    (root / PUBLIC).write_bytes(public)
    _write_private(root / SECRET, holder.secret_context_bytes())
    (root / REGISTRY).write_text(json.dumps(holder.registry.state_dict(), sort_keys=True))
    manifest = Manifest(p.name, pol, ids, context_fingerprint(public).hex())
    (root / MANIFEST).write_text(json.dumps({**asdict(manifest), "policy": asdict(pol), "parties": list(ids)},
                                            sort_keys=True))
    log.info("provisioned a %s key set for %d parties in %s", p.name, len(ids), root)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a provisioned directory, checked field by field.

    Raises
    ------
    ConfigError
        If it is missing, of another version, or a field is absent or of the wrong type.
    """
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != VERSION:
            raise ConfigError(f"{path}: manifest version {raw.get('version')!r}, this library reads {VERSION}")
        pol = raw["policy"]
        policy = DecryptionPolicy(
            min_contributors=int(pol["min_contributors"]),
            max_share=None if pol["max_share"] is None else float(pol["max_share"]),
            negligible_share=float(pol["negligible_share"]),
            reference_party=None if pol["reference_party"] is None else int(pol["reference_party"]),
        )
        return Manifest(str(raw["preset"]), policy, tuple(int(p) for p in raw["parties"]), str(raw["fingerprint"]))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: run `python -m securefml.flower.provision` first") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a valid manifest: {exc}") from None


def provision_in_subprocess(
    directory: str | Path,
    parties: Sequence[int],
    *,
    preset: str = "stats",
    min_contributors: int = 2,
    timeout: float = 600.0,
) -> Manifest:
    """``provision`` in a fresh Python process; only the public manifest is read back here."""
    ids = ",".join(str(int(p)) for p in parties)
    cmd = [sys.executable, "-m", "securefml.flower.provision", str(directory), "--parties", ids,
           "--preset", preset, "--min-contributors", str(int(min_contributors))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ConfigError(f"CKKS provisioning failed: {done.stderr.strip()[-800:]}")
    return read_manifest(directory)


def _parties(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if dash and lo:
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m securefml.flower.provision",
                                     description="Provision CKKS keys for a securefml deployment on Flower.")
    parser.add_argument("directory")
    parser.add_argument("--parties", required=True, help="client ids, e.g. 0-99 or 0,1,5 (negative: one by one)")
    parser.add_argument("--preset", default="stats")
    parser.add_argument("--min-contributors", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        provision(args.directory, _parties(args.parties), preset=args.preset,
                  policy=DecryptionPolicy(min_contributors=args.min_contributors))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through provision_in_subprocess
    raise SystemExit(main())
