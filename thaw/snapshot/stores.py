"""Which store a ``--store`` names: the one factory every caller uses (fetch, publish, the publisher
sidecar, ``thaw exec``'s in-process publish, ``thaw gc``).

- a plain path, or ``file:///PATH``: :class:`thaw.snapshot.store.DirectoryStore` (a PVC, NFS, RWX);
- ``oci://HOST[:PORT]/REPOSITORY``: :class:`thaw.snapshot.registry.RegistryStore`, with the
  registry options: ``--registry-auth FILE`` (a Docker config.json, or the directory a
  ``kubernetes.io/dockerconfigjson`` Secret is mounted at), ``--registry-ca FILE`` (trusted beside the
  system's), ``--registry-plain-http`` (loopback registries only).

Anything else is refused with the forms allowed. The registry module (and urllib3) is imported only
for an ``oci://`` store.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from thaw.snapshot.store import DirectoryStore, Store

FORMS = "a directory path, file:///PATH, or oci://HOST[:PORT]/REPOSITORY"


@dataclass(frozen=True)
class RegistryOptions:
    auth_file: Path | None = None
    ca_file: Path | None = None
    plain_http: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RegistryOptions:
        """From the parsed ``--registry-*`` flags (absent flags: defaults)."""
        auth, ca = getattr(args, "registry_auth", None), getattr(args, "registry_ca", None)
        return cls(
            auth_file=Path(auth) if auth else None,
            ca_file=Path(ca) if ca else None,
            plain_http=bool(getattr(args, "registry_plain_http", False)),
        )


def is_registry(spec: str | Path) -> bool:
    return str(spec).startswith("oci://")


def open_store(spec: str | Path, options: RegistryOptions | None = None) -> Store:
    """The store ``spec`` names; ValueError saying what is wrong and what is allowed."""
    text = str(spec)
    options = options or RegistryOptions()
    if is_registry(text):
        from thaw.snapshot.registry import open_registry

        return open_registry(
            text, auth_file=options.auth_file, ca_file=options.ca_file, plain_http=options.plain_http
        )
    if options.plain_http:
        raise ValueError(f"--registry-plain-http applies to an oci:// store, not {text!r}")
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"store {text!r}: a file URL is file:///ABSOLUTE/PATH")
        return DirectoryStore(Path(unquote(parts.path)))
    if "://" in text or not text:
        raise ValueError(f"store {text!r} is not {FORMS}")
    return DirectoryStore(Path(text))


def store_from_args(args: argparse.Namespace) -> Store:
    """``open_store(args.store, RegistryOptions.from_args(args))``."""
    return open_store(args.store, RegistryOptions.from_args(args))
