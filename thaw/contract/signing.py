"""Ed25519 signing keys for snapshot manifests, and the trusted public keys a node accepts.

``thaw keys generate --out DIR`` writes ``signing.key`` (PKCS#8 PEM, 0600: goes into the Secret that
the checkpointing pods mount) and ``signing.pub`` (SubjectPublicKeyInfo PEM: goes into the
Secret/ConfigMap that every node's fetch mounts as its trust directory). A key's id is the first 16
hex digits of the sha256 of its raw 32-byte public key, so a manifest names the key that signed it
and rotation is a matter of adding the new public key beside the old one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from thaw.errors import UsageError

log = logging.getLogger("thaw.signing")

ALG = "ed25519"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
KEY_ID_HEX_DIGITS = 16
MAX_KEY_FILE_BYTES = 16 * 1024


class SigningKeyError(ValueError):
    """A key file that cannot be used; the message names the file and why."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


def generate_keypair(out: Path) -> tuple[Path, Path, str]:
    """Write a new key pair into ``out``; refuses to overwrite an existing one. Returns paths and id."""
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for p in (priv_path, pub_path):
        if p.exists():
            raise UsageError(f"{p} already exists: refusing to overwrite a signing key (remove it first)")
    private = Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL: never clobber a key another process wrote in between; 0600 from the start.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub_pem)
    return priv_path, pub_path, key_id(private.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a public key")
    return public_key_from_pem(data, str(path))


def public_key_from_pem(data: bytes, source: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes; SigningKeyError naming ``source`` otherwise."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{source} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{source} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class TrustedKeys:
    """Public keys by key id, and the files in the trust directory that were not usable keys."""

    source: str
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def load_trusted_keys(directory: Path | None) -> TrustedKeys:
    """Every Ed25519 public key in ``directory`` (a mounted Secret or ConfigMap). Never raises.

    Dot-files are skipped: Kubernetes volume mounts keep their ``..data`` machinery there. A file
    that is not a public key is recorded in ``problems`` (and ignored), so one bad entry cannot lock
    out the good ones, and a cold-start reason can say what was found.
    """
    trusted = TrustedKeys(source=str(directory) if directory else "(none)")
    if directory is None:
        trusted.problems.append("no trust directory given")
        return trusted
    try:
        entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        trusted.problems.append(f"cannot read trust directory {directory}: {exc.strerror or exc}")
        return trusted
    for p in entries:
        if p.is_dir():
            continue
        try:
            key = load_public_key(p)
        except SigningKeyError as exc:
            trusted.problems.append(str(exc))
            continue
        trusted.keys[key_id(key)] = key
    return trusted


def sign(private: Ed25519PrivateKey, data: bytes) -> str:
    """The base64 Ed25519 signature of ``data``."""
    return base64.b64encode(private.sign(data)).decode()


def verify(public: Ed25519PublicKey, data: bytes, signature_b64: str) -> bool:
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (ValueError, TypeError):
        return False
    try:
        public.verify(sig, data)
    except InvalidSignature:
        return False
    return True


def run_keys(args: argparse.Namespace) -> int:
    """``thaw keys generate --out DIR``."""
    if args.keys_command != "generate":
        raise UsageError(f"unknown keys command {args.keys_command!r} (allowed: generate)")
    priv, pub, kid = generate_keypair(args.out)
    sys.stderr.write(
        f"thaw keys: wrote {priv} (keep secret: mount it only where snapshots are taken) and {pub} "
        f"(key id {kid}: put it in every node's trust directory)\n"
    )
    sys.stdout.write(kid + "\n")
    return 0
