"""The whole path through a registry, real CRIU: ``thaw exec`` checkpoints a server with state, the
CLI publishes that checkpoint to a real registry (TLS, htpasswd), ``thaw fetch`` pulls it into an
empty node cache, and ``thaw exec`` in a fresh pod restores it with its state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.needs import requires
from tests.registry.server import Registry
from tests.runtime.pods import missing_prerequisites, read_json, thaw_cli
from tests.runtime.test_exec_criu import CMD, NAME, URL, _checkpointing, _restore_outcome, _run_pod, _workload

pytestmark = [pytest.mark.criu, requires(missing_prerequisites())]


def test_checkpoint_through_a_registry_restores_its_state(registry: Registry, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    with _checkpointing(root, NAME, CMD) as (ns, pod, checkpoint):
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        out = checkpoint()
        assert out["status"] == "published", f"{out}\n{pod.output}"
    cached = next((root / f"cache-{NAME}").glob(f"*/{NAME}/{out['snapshot'].split(':', 1)[1]}"))
    images = tmp_path / "images"
    shutil.copytree(cached, images, ignore=shutil.ignore_patterns("manifest.json", ".*"))
    auth, store = registry.auth_file(), registry.store(repository="thaw/criu")
    flags = ["--store", store, "--registry-auth", str(auth), "--registry-ca", str(registry.ca)]
    pub = thaw_cli(
        "publish", *flags, "--name", NAME, "--workload", _workload(NAME), "--images", str(images),
        "--key", str(root / "keys" / "signing.key"), "--facts", str(root / "facts.json"),
    )  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    fetched = thaw_cli(
        "fetch", *flags, "--cache", str(pod_dir / "cache"), "--name", NAME, "--workload", _workload(NAME),
        "--trust", str(root / "trust"), "--plan", str(pod_dir / "plan.json"),
        "--facts", str(root / "facts.json"),
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    plan = read_json(pod_dir / "plan.json")
    assert plan["action"] == "restore" and plan["snapshot"] == pub.stdout.strip(), (plan, fetched.stderr)
    ns2, pod2 = _run_pod(pod_dir / "plan.json")
    try:
        outcome = _restore_outcome(pod_dir, pod2)
        assert outcome["result"] == "restored", f"{outcome}\n{pod2.output}"
        assert ns2.http("GET", f"{URL}/state")["counter"] == 1  # type: ignore[index]  # the snapshot's state
        assert ns2.http("POST", f"{URL}/bump") == {"counter": 2}
    finally:
        pod2.stop()
        ns2.delete()
