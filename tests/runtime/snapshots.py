"""Helpers for the snapshot-side tests: a key pair, a store, a cache and facts in a temporary tree,
driven through the real ``thaw`` CLI (the contract the init container and the agent run), run by
the sandbox's one runner (``thaw_cli``)."""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.facts import NodeFacts, compat_key
from thaw.dev.sandbox import read_json, thaw_cli

REPO = Path(__file__).resolve().parents[2]

FACTS: NodeFacts = {
    "arch": "x86_64",
    "kernel": "6.18.0-test",
    "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 8},
    "driver": "580.159.04",
    "criu": "4.2.1",
}


def facts(**changes: Any) -> NodeFacts:
    f = copy.deepcopy(FACTS)
    f.update(changes)  # type: ignore[typeddict-item]
    return f


@dataclass
class World:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def plan(self) -> Path:
        return self.root / "plan" / "plan.json"

    def facts_file(self, f: NodeFacts = FACTS, name: str = "facts.json") -> Path:
        p = self.root / name
        p.write_bytes(orjson.dumps(f))
        return p

    def facts_for(self, f: NodeFacts) -> Path:
        return self.facts_file(f, f"facts-{compat_key(f)}.json")

    def setup_keys(self) -> None:
        thaw_cli("keys", "generate", "--out", self.keys, check=True)
        self.trust.mkdir(exist_ok=True)
        (self.trust / "signing.pub").write_bytes((self.keys / "signing.pub").read_bytes())

    def images(self, name: str, files: dict[str, bytes]) -> Path:
        d = self.root / "images" / name
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return d

    def publish(
        self,
        images: Path,
        name: str = "demo",
        workload: str = "w1",
        f: NodeFacts = FACTS,
        key: Path | None = None,
        *,
        namespace: str = "default",
    ) -> str:
        out = thaw_cli(
            "publish", "--store", self.store, "--name", name, "--workload", workload, "--images", images,
            "--key", key or self.keys / "signing.key", "--facts", self.facts_for(f), "--namespace", namespace,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def fetch_args(
        self, name: str = "demo", workload: str = "w1", f: NodeFacts = FACTS, namespace: str = "default"
    ) -> list[str | Path]:
        return [
            "fetch", "--store", self.store, "--cache", self.cache, "--name", name, "--workload", workload,
            "--trust", self.trust, "--plan", self.plan, "--facts", self.facts_for(f),
            "--namespace", namespace,
        ]  # fmt: skip

    def fetch(
        self,
        *extra: str,
        name: str = "demo",
        workload: str = "w1",
        f: NodeFacts = FACTS,
        env: dict[str, str] | None = None,
        namespace: str = "default",
    ) -> dict[str, Any]:
        self.plan.unlink(missing_ok=True)
        out = thaw_cli(*self.fetch_args(name, workload, f, namespace), *extra, env=env)
        assert out.returncode == 0, out.stderr  # never fails the pod
        plan: dict[str, Any] = read_json(self.plan)
        plan["_stderr"] = out.stderr
        return plan


def cache_entries(cache: Path) -> list[str]:
    """Everything under the cache, relative, sorted (for 'nothing half-written' checks)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for a plain-HTTP test API server (tests/fakekube.py), for CLI subprocesses."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: fake\n  cluster:\n    server: {server}\n"
        "users:\n- name: fake\n  user: {}\n"
        "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
        "current-context: fake\n"
    )
    return path


def node(
    name: str, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
        "spec": {},
        "status": {},
    }


HOLD_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)  # read-only is enough for flock (a file or a directory)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def flock_held(path: Path) -> Iterator[None]:
    """Another process holds an exclusive flock on ``path`` (opened read-only, as any process that
    can read it could: a co-tenant through a read-only mount, a writer on its temporary directory)
    until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FLOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")
