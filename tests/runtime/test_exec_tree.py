"""Issue 6 in CI: a multi-process workload whose processes talk over an established loopback TCP
connection is checkpointed and restored as one tree, in fresh namespaces, with the connection open."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.needs import requires
from tests.runtime.pods import (
    REPO,
    THAW_CAPS,
    Netns,
    Pod,
    missing_prerequisites,
    read_json,
    thaw_cli,
    wait_for,
    with_caps,
    write_facts,
)

pytestmark = [pytest.mark.criu, requires(missing_prerequisites())]

PORT = 8172
URL = f"http://127.0.0.1:{PORT}"
CMD = ["python3", str(REPO / "tests" / "runtime" / "ranks_server.py"), str(PORT)]
# Restoring an established connection puts the socket in TCP repair mode: CAP_NET_ADMIN.
TREE_CAPS = (*THAW_CAPS, "net_admin")


def test_tree_with_established_connection_restores_as_one(tmp_path: Path) -> None:
    from thaw.contract.signing import generate_keypair

    generate_keypair(tmp_path / "keys")
    (tmp_path / "trust").mkdir()
    shutil.copy(tmp_path / "keys" / "signing.pub", tmp_path / "trust")
    facts = write_facts(tmp_path / "facts.json")
    flag, ck_out = tmp_path / "ready", tmp_path / "a" / "outcome.json"
    ns = Netns()
    pod = Pod(
        ns,
        [
            "--checkpoint", "on-ready", "--ready", f"file:{flag}", "--store", str(tmp_path / "store"),
            "--key", str(tmp_path / "keys" / "signing.key"), "--name", "ranks", "--workload", "w",
            "--facts", str(facts), "--outcome", str(ck_out), "--tcp-established",
        ],
        CMD,
        wrap=with_caps(TREE_CAPS),
    )  # fmt: skip
    try:
        first = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the ranks to answer", pod)
        assert first["sum"] == 0 and first["ranks"][0] != first["ranks"][1]
        ns.http("POST", f"{URL}/add")
        assert ns.http("POST", f"{URL}/add") == {"sum": 2, "ranks": first["ranks"]}
        flag.touch()
        ck = wait_for(
            lambda: (
                (c := read_json(ck_out).get("checkpoint", {})).get("status") in ("published", "failed") and c
            ),
            60,
            "the checkpoint",
            pod,
        )
        assert ck["status"] == "published", ck
        assert ns.http("POST", f"{URL}/add") == {"sum": 3, "ranks": first["ranks"]}  # still serving
    finally:
        pod.stop()
        ns.delete()
    plan = tmp_path / "b" / "plan.json"
    res = thaw_cli(
        "fetch", "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache"), "--name", "ranks",
        "--workload", "w", "--trust", str(tmp_path / "trust"), "--plan", str(plan), "--facts", str(facts),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ns = Netns()
    pod = Pod(ns, ["--plan", str(plan), "--ready", f"{URL}/state"], CMD, wrap=with_caps(TREE_CAPS))
    try:
        out = wait_for(lambda: read_json(plan.parent / "outcome.json").get("result"), 60, "the restore", pod)
        assert out == "restored", read_json(plan.parent / "outcome.json")
        # Both ranks, their PIDs and the connection between them are back: the worker's sum is 2.
        assert ns.http("GET", f"{URL}/state") == {"sum": 2, "ranks": first["ranks"]}
        assert ns.http("POST", f"{URL}/add") == {"sum": 3, "ranks": first["ranks"]}
    finally:
        pod.stop()
        ns.delete()
