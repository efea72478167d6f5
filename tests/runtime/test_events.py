"""Events on Thaw pods: the outcome -> Event mapping (pure, table-driven), the copies left in the
node cache (read bounded), and the agent posting them through the official client to
tests/fakekube.py, only on pods its own API list shows on its node, with the identity from the API
(each Event valid for the Kubernetes 1.30 schema; posting twice creates nothing). Issue 11.5."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import orjson
import pytest

from tests.fakekube import FakeKube, running
from tests.runtime.snapshots import FACTS, World, kubeconfig, node
from thaw.dev.sandbox import thaw_cli
from thaw.node.events import OUTCOME_MAX_AGE_S, PodRef, event_body, node_events, outcome_specs, pod_ref
from thaw.snapshot.outcome_copy import MAX_OUTCOME_BYTES, outcome_copy_path, write_outcome_copy

UID = "5d3c1a2b-9f8e-4d7c-8b6a-0f1e2d3c4b5a"
POD = {"name": "qwen-2", "namespace": "ml", "node": "gpu-1", "container": "vllm", "uid": UID}
REF: PodRef = {
    "name": "qwen-2",
    "namespace": "ml",
    "uid": UID,
    "containers": ["vllm", "proxy"],
    "target": "vllm",
}


def api_pod(
    name: str, namespace: str, uid: str, node_name: str = "gpu-1", thaw_pod: bool = True
) -> dict[str, Any]:
    """A Pod as the API serves it: injected by the webhook (or not), bound to ``node_name``."""
    annotations = {"thaw.dev/injected": "true", "thaw.dev/container": "vllm"} if thaw_pod else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node_name, "containers": [{"name": "proxy"}, {"name": "vllm"}]},
    }


SNAP = "sha256:39fa6a2306965fb2eba35e9f308f1acba706dccc1e74a59fd9039"


@pytest.mark.parametrize(
    ("outcome", "want"),
    [
        (
            {
                "result": "restored",
                "plan": {"snapshot": SNAP},
                "timings": {
                    "criu_restore_s": 3.873,
                    "cuda_restore_s": 2.55,
                    "ready_s": 0.523,
                    "total_s": 6.949,
                },
            },
            [
                (
                    "Normal",
                    "ThawRestored",
                    f"restored snapshot {SNAP} in 6.949 s (CRIU 3.873 s, CUDA 2.55 s, ready 0.523 s)",
                )
            ],
        ),
        (  # a snapshot taken asleep: the wake is part of the restore (docs/sleep-mode.md)
            {
                "result": "restored",
                "plan": {"snapshot": SNAP},
                "timings": {"criu_restore_s": 0.051, "wake_s": 0.092, "ready_s": 0.001, "total_s": 0.143},
            },
            [
                (
                    "Normal",
                    "ThawRestored",
                    f"restored snapshot {SNAP} in 0.143 s (CRIU 0.051 s, wake 0.092 s, ready 0.001 s)",
                )
            ],
        ),
        (
            {"result": "cold", "reason": "no snapshot: none published under 'qwen3-8b-vllm' yet"},
            [
                (
                    "Normal",
                    "ThawColdStart",
                    "cold start: no snapshot: none published under 'qwen3-8b-vllm' yet",
                )
            ],
        ),
        (
            {
                "result": "cold",
                "reason": "restore failed: the snapshot's 2 CUDA processes ran on a container "
                "with 2 GPUs (ordinals [0, 1] in use); this container sees 1",
            },
            [
                (
                    "Warning",
                    "ThawRestoreFailed",
                    "restore failed: the snapshot's 2 CUDA processes ran on a "
                    "container with 2 GPUs (ordinals [0, 1] in use); this container sees 1; started cold",
                )
            ],
        ),
        (
            {
                "result": "cold",
                "reason": "no plan",
                "checkpoint": {
                    "status": "published",
                    "snapshot": SNAP,
                    "bytes": 14464960647,
                    "publish_s": 40.365,
                },
            },
            [
                ("Normal", "ThawColdStart", "cold start: no plan"),
                ("Normal", "ThawCheckpointPublished", f"published snapshot {SNAP} (14.46 GB) in 40.365 s"),
            ],
        ),
        (
            {
                "result": "cold",
                "reason": "x",
                "checkpoint": {
                    "status": "failed",
                    "stopped_workload": True,
                    "reason": "the CUDA state could not be put back after the checkpoint: boom",
                },
            },
            [
                ("Normal", "ThawColdStart", "cold start: x"),
                (
                    "Warning",
                    "ThawCheckpointFailed",
                    "the CUDA state could not be put back after the checkpoint: "
                    "boom; the workload was stopped, the container restarts cold",
                ),
            ],
        ),
        (
            {
                "result": "cold",
                "reason": "x",
                "checkpoint": {"status": "skipped", "reason": "an earlier one"},
            },
            [
                ("Normal", "ThawColdStart", "cold start: x"),
                ("Warning", "ThawCheckpointSkipped", "an earlier one"),
            ],
        ),
        # still under way: nothing to say yet
        ({"checkpoint": {"status": "waiting for ready"}}, []),
        (
            {"result": "cold", "reason": "x", "checkpoint": {"status": "publishing"}},
            [("Normal", "ThawColdStart", "cold start: x")],
        ),
        ({}, []),
    ],
)
def test_outcome_to_events(outcome: dict[str, Any], want: list[tuple[str, str, str]]) -> None:
    assert [(s["type"], s["reason"], s["message"]) for s in outcome_specs(outcome)] == want


def test_messages_are_bounded() -> None:
    (spec,) = outcome_specs({"result": "cold", "reason": "restore failed: " + "x" * 5000})
    assert len(spec["message"]) == 1024


def test_event_body_is_a_valid_event_on_the_pod_and_named_stably() -> None:
    outcome = {"result": "cold", "reason": "no plan", "pod": POD, "started": "2026-11-28T09:00:00Z"}
    (spec,) = outcome_specs(outcome)
    body = event_body(spec, outcome, REF, "gpu-1", "2026-11-28T09:00:05Z")
    kubernetes_validate.validate(body, "1.30", strict=True)
    assert body["involvedObject"] == {
        "apiVersion": "v1", "kind": "Pod", "name": "qwen-2", "namespace": "ml", "uid": UID,
        "fieldPath": "spec.containers{vllm}",
    }  # fmt: skip
    assert body["metadata"]["namespace"] == "ml" and body["metadata"]["name"].startswith("qwen-2.thaw.")
    assert body["source"] == {"component": "thaw", "host": "gpu-1"}
    assert (body["type"], body["reason"], body["count"]) == ("Normal", "ThawColdStart", 1)
    # the same outcome, later: the same name (a repost is a 409); another start of the container: another
    again = event_body(spec, outcome, REF, "gpu-1", "2026-11-28T10:00:00Z")
    restarted = event_body(spec, {**outcome, "started": "2026-11-28T09:30:00Z"}, REF, "gpu-1", "x")
    assert again["metadata"]["name"] == body["metadata"]["name"] != restarted["metadata"]["name"]


def test_pod_ref_takes_thaw_pods_from_the_api_object() -> None:
    assert pod_ref(api_pod("qwen-2", "ml", UID)) == REF | {"containers": ["proxy", "vllm"]}
    assert pod_ref(api_pod("web", "ml", UID, thaw_pod=False)) is None  # not injected: not ours
    odd = api_pod("qwen-2", "ml", UID)
    odd["metadata"]["annotations"]["thaw.dev/container"] = "gone"
    ref = pod_ref(odd)
    assert ref is not None and ref["target"] == "proxy"  # the first container


@pytest.mark.parametrize("uid", ["../x", "a/b", "", ".hidden", "X" * 80])
def test_copy_names_must_be_uids(tmp_path: Path, uid: str) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes UID"):
        outcome_copy_path(tmp_path, uid)


def test_node_events_read_the_copies_and_age_them_out(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_outcome_copy(cache, UID, orjson.dumps({"result": "cold", "reason": "no plan", "pod": POD}))
    old_uid = "11111111-2222-4333-8444-555555555555"
    write_outcome_copy(cache, old_uid, orjson.dumps({"result": "cold", "reason": "old", "pod": POD}))
    old = outcome_copy_path(cache, old_uid)
    os.utime(old, (time.time() - OUTCOME_MAX_AGE_S - 10,) * 2)
    dead_tmp = cache / ".outcomes" / f".{UID}.dead.tmp"  # a writer that died
    dead_tmp.write_bytes(b"{")
    os.utime(dead_tmp, (time.time() - OUTCOME_MAX_AGE_S - 10,) * 2)
    (cache / ".outcomes" / "22222222-2222-4333-8444-555555555555.json").write_bytes(b"{half")  # mid-write
    assert oct(outcome_copy_path(cache, UID).parent.stat().st_mode & 0o777) == "0o700"
    gone = "33333333-2222-4333-8444-555555555555"  # a pod no longer on the node
    write_outcome_copy(cache, gone, orjson.dumps({"result": "cold", "reason": "x"}))
    os.utime(outcome_copy_path(cache, gone), (time.time() - 3600,) * 2)
    events = list(node_events(cache, "gpu-1", {UID: REF}))
    assert [(e["reason"], e["message"]) for e in events] == [("ThawColdStart", "cold start: no plan")]
    assert not old.exists() and not dead_tmp.exists() and not outcome_copy_path(cache, gone).exists()
    assert list(node_events(tmp_path / "no-cache", "gpu-1", {UID: REF})) == []


def test_write_outcome_copy_never_writes_through_a_planted_name(tmp_path: Path) -> None:
    """Issue 11.5: the temporary name was predictable (.UID.PID.tmp), so a co-tenant could plant a
    symlink there and have the write land in a file of its choosing."""
    cache = tmp_path / "cache"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    outcomes = cache / ".outcomes"
    outcomes.mkdir(parents=True)
    (outcomes / f".{UID}.{os.getpid()}.tmp").symlink_to(victim)
    write_outcome_copy(cache, UID, b'{"result": "cold"}')
    assert victim.read_bytes() == b"untouched"
    assert orjson.loads(outcome_copy_path(cache, UID).read_bytes()) == {"result": "cold"}
    with pytest.raises(ValueError, match="more than"):
        write_outcome_copy(cache, UID, b" " * (MAX_OUTCOME_BYTES + 1))


def _agent(world: World, kube: FakeKube, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"KUBECONFIG": str(kubeconfig(world.root / "kubeconfig", kube.url)), "THAW_NODE": "gpu-1"}
    return thaw_cli(
        "agent", "--cache", world.cache, "--budget", str(1 << 30), "--facts", world.facts_for(FACTS),
        "--once", env=env, timeout=timeout,
    )  # fmt: skip


def test_spoofed_pod_identity_in_an_outcome_file_reaches_only_its_own_pod(tmp_path: Path) -> None:
    """Issue 11.5: user-set THAW_POD_NAMESPACE/THAW_POD_NAME survived, and the agent posted an Event
    on kube-system/kube-apiserver-… with text of the pod's choosing."""
    world = World(tmp_path)
    spoof = {"name": "kube-apiserver-gpu-1", "namespace": "kube-system", "uid": UID, "container": "x"}
    write_outcome_copy(world.cache, UID, orjson.dumps({"result": "cold", "reason": "hello", "pod": spoof}))
    elsewhere = "44444444-2222-4333-8444-555555555555"  # a real Thaw pod, but on another node
    write_outcome_copy(world.cache, elsewhere, orjson.dumps({"result": "cold", "reason": "x", "pod": spoof}))
    stranger = "55555555-2222-4333-8444-555555555555"  # not a pod at all
    write_outcome_copy(world.cache, stranger, orjson.dumps({"result": "cold", "reason": "x", "pod": spoof}))
    with running() as kube:
        kube.add(node("gpu-1"))
        kube.add_pod(api_pod("qwen-2", "ml", UID))
        kube.add_pod(api_pod("other", "ml", elsewhere, node_name="gpu-2"))
        kube.add_pod(
            api_pod(
                "kube-apiserver-gpu-1", "kube-system", "66666666-2222-4333-8444-555555555555", thaw_pod=False
            )
        )
        run = _agent(world, kube)
        assert run.returncode == 0, run.stderr
        assert [
            (ns, e["involvedObject"]["name"], e["involvedObject"]["uid"])
            for (ns, _), e in kube.core_events.items()
        ] == [("ml", "qwen-2", UID)]
        assert not any(r.startswith("POST /api/v1/namespaces/kube-system") for r in kube.requests)
        assert any(r.startswith("GET /api/v1/pods?") and "spec.nodeName%3Dgpu-1" in r for r in kube.requests)


def test_fifos_symlinks_and_huge_files_in_outcomes_are_skipped_and_removed(tmp_path: Path) -> None:
    """Issue 11.5: an outcome copy symlinked to /dev/zero (MemoryError) or made a FIFO (hang)
    stopped the agent."""
    world = World(tmp_path)
    write_outcome_copy(world.cache, UID, orjson.dumps({"result": "cold", "reason": "no plan"}))
    outcomes = world.cache / ".outcomes"
    fifo, link, huge = (f"{d * 8}-2222-4333-8444-555555555555.json" for d in "789")
    os.mkfifo(outcomes / fifo)
    (outcomes / link).symlink_to("/dev/zero")
    (outcomes / huge).write_bytes(b" " * (MAX_OUTCOME_BYTES + 1))
    bad = (fifo, link, huge)
    with running() as kube:
        kube.add(node("gpu-1"))
        kube.add_pod(api_pod("qwen-2", "ml", UID))
        for name in bad:
            kube.add_pod(api_pod(name[:8], "ml", name[:-5]))
        run = _agent(world, kube, timeout=60)
        assert run.returncode == 0, run.stderr
        assert [e["involvedObject"]["uid"] for e in kube.core_events.values()] == [UID]
    assert sorted(p.name for p in outcomes.iterdir()) == [f"{UID}.json"]


def test_exec_leaves_its_outcome_and_the_agent_posts_it_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.setup_keys()
    env = {"THAW_POD_NAME": "qwen-2", "THAW_POD_NAMESPACE": "ml", "THAW_POD_UID": UID,
           "THAW_NODE_NAME": "gpu-1", "THAW_CONTAINER": "vllm"}  # fmt: skip
    out = thaw_cli("exec", "--cache", world.cache, "--outcome", tmp_path / "o.json", "--", "true", env=env)
    assert out.returncode == 0, out.stderr
    copy = orjson.loads(outcome_copy_path(world.cache, UID).read_bytes())
    assert copy == orjson.loads((tmp_path / "o.json").read_bytes())
    assert copy["pod"]["uid"] == UID and copy["result"] == "cold" and copy["started"]
    with running() as kube:
        kube.add(node("gpu-1"))
        kube.add_pod(api_pod("qwen-2", "ml", UID))
        for _ in range(2):  # the second pass (as after an agent restart) creates nothing more
            run = _agent(world, kube)
            assert run.returncode == 0, run.stderr
        assert len(kube.core_events) == 1
        ((ns, _), event), *_ = kube.core_events.items()
        assert ns == "ml" and event["reason"] == "ThawColdStart" and event["involvedObject"]["uid"] == UID
        assert sum(r.startswith("POST /api/v1/namespaces/ml/events") for r in kube.requests) == 2
        kubernetes_validate.validate(event, "1.30", strict=True)


def test_agent_dry_run_logs_the_events_it_would_post(tmp_path: Path) -> None:
    world = World(tmp_path)
    write_outcome_copy(world.cache, UID, orjson.dumps({"result": "cold", "reason": "no plan", "pod": POD}))
    run = thaw_cli(
        "agent", "--cache", world.cache, "--budget", str(1 << 30), "--facts", world.facts_for(FACTS), "--once"
    )
    assert run.returncode == 0, run.stderr
    line = f"event (dry run, pod uid {UID} not checked against the API): Normal ThawColdStart: cold start"
    assert line + ": no plan" in run.stderr
