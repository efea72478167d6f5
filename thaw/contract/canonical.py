"""Canonical JSON: the one byte form that ids, compatibility keys and signatures hash.

Keys sorted, no spaces, UTF-8. Every hash in Thaw (snapshot id, compat key, workload hash) goes
through here so that two pieces never disagree about the bytes of the same value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no whitespace."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))
