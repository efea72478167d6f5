"""Real CRIU, real processes: a Python HTTP server with state is checkpointed through
``thaw exec --checkpoint on-ready`` and restored through ``thaw fetch`` + ``thaw exec`` in a fresh
process tree (new PID, mount and network namespaces, as a new pod's container); a restore that fails
midway falls back to the cold command with the reason recorded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runtime.pods import (
    STATE_SERVER,
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

_why = missing_prerequisites()
pytestmark = [pytest.mark.criu, pytest.mark.skipif(_why is not None, reason=_why or "")]

PORT = 8171
NAME = "state-server"
WORKLOAD = "w-test-1"
CMD = ["python3", str(STATE_SERVER), str(PORT)]
URL = f"http://127.0.0.1:{PORT}"


@dataclass
class Snapshot:
    root: Path
    store: Path
    keys: Path
    trust: Path
    facts: Path
    snapshot_id: str
    checkpoint_outcome: dict[str, object]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """Checkpoint the server once (counter bumped to 2 first) through thaw exec; then stop that pod."""
    from thaw.signing import generate_keypair

    root = tmp_path_factory.mktemp("ckpt")
    keys, trust = root / "keys", root / "trust"
    generate_keypair(keys)
    trust.mkdir()
    shutil.copy(keys / "signing.pub", trust / "signing.pub")
    facts = write_facts(root / "facts.json")
    ready_flag = root / "ready.flag"
    outcome_path = root / "pod-a" / "outcome.json"
    ns = Netns()
    pod = Pod(
        ns,
        [
            "--checkpoint", "on-ready", "--ready", f"file:{ready_flag}", "--store", str(root / "store"),
            "--key", str(keys / "signing.key"), "--name", NAME, "--workload", WORKLOAD,
            "--facts", str(facts), "--cache", str(root / "cache-a"), "--outcome", str(outcome_path),
        ],
        CMD,
        wrap=with_caps(THAW_CAPS),  # the capabilities the webhook grants, no more
    )  # fmt: skip
    try:
        wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server to answer")
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        assert ns.http("POST", f"{URL}/bump") == {"counter": 2}
        ready_flag.touch()  # "ready" only now, so the snapshot holds counter == 2
        out = wait_for(
            lambda: (
                (o := read_json(outcome_path).get("checkpoint"))
                and o.get("status") in ("published", "failed")
                and o
            ),
            90,
            "the checkpoint to be published",
        )
        assert out["status"] == "published", f"{out}\n{pod.output}"
        # The server keeps serving after its snapshot was taken, and its state moves on.
        assert ns.http("POST", f"{URL}/bump") == {"counter": 3}
        yield Snapshot(root, root / "store", keys, trust, facts, str(out["snapshot"]), out)
    finally:
        pod.stop()
        ns.delete()


def _fetch(snap: Snapshot, store: Path, pod_dir: Path) -> dict[str, object]:
    plan = pod_dir / "plan.json"
    res = thaw_cli(
        "fetch", "--store", str(store), "--cache", str(pod_dir / "cache"), "--name", NAME,
        "--workload", WORKLOAD, "--trust", str(snap.trust), "--plan", str(plan), "--facts", str(snap.facts),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return read_json(plan)


def _run_pod(
    plan: Path, env: dict[str, str] | None = None, caps: tuple[str, ...] = THAW_CAPS
) -> tuple[Netns, Pod]:
    ns = Netns()
    pod = Pod(ns, ["--plan", str(plan), "--ready", f"{URL}/state"], CMD, env, wrap=with_caps(caps))
    return ns, pod


def test_checkpoint_records_what_it_took(snapshot: Snapshot) -> None:
    from thaw.manifest import load_manifest

    snap_dir = snapshot.store / NAME / snapshot.snapshot_id.split(":", 1)[1]
    manifest = load_manifest(snap_dir / "manifest.json")
    assert manifest["workload"] == WORKLOAD
    paths = {f["path"] for f in manifest["files"]}
    assert "thaw-exec.json" in paths and "pstree.img" in paths
    meta = read_json(snap_dir / "thaw-exec.json")
    assert meta["cmd"] == CMD
    assert meta["root_pid"] >= 4096  # started above --pid-floor, so a new container has it free
    assert meta["cuda_pids"] == []
    assert snapshot.checkpoint_outcome.get("cached") is True  # the checkpointing node keeps a copy


def test_restore_answers_with_pre_checkpoint_state(snapshot: Snapshot, tmp_path: Path) -> None:
    plan = _fetch(snapshot, snapshot.store, tmp_path)
    assert plan["action"] == "restore", plan
    ns, pod = _run_pod(tmp_path / "plan.json")
    try:
        outcome = wait_for(
            lambda: (o := read_json(tmp_path / "outcome.json")).get("result") and o,
            60,
            "the restore outcome",
            pod,
        )
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        state = ns.http("GET", f"{URL}/state")
        assert state is not None
        assert state["counter"] == 2  # the snapshot's state, not a cold start's 0 nor the live 3
        assert state["pid"] >= 4096
        assert ns.http("POST", f"{URL}/bump") == {"counter": 3}
        # The restored server's stdout reaches the new container's log pipe (--inherit-fd).
        wait_for(lambda: 'request "POST /bump' in pod.output, 10, "the restored server's log line")
        # thaw exec forwards SIGTERM and exits with the workload's status (killed by SIGTERM).
        assert pod.stop() in (143, -15)
    finally:
        pod.stop()
        ns.delete()


def _corrupt_copy(snap: Snapshot, dest_store: Path) -> None:
    """The snapshot with its memory pages truncated, re-published (so re-signed) by the trusted key:
    fetch accepts it, and CRIU fails midway through the restore."""
    from thaw.nodefacts import node_facts
    from thaw.store import DirectoryStore, publish

    images = dest_store.parent / "corrupt-images"
    shutil.copytree(snap.store / NAME / snap.snapshot_id.split(":", 1)[1], images)
    (images / "manifest.json").unlink()
    pages = sorted(images.glob("pages-*.img"))[0]
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    publish(
        DirectoryStore(dest_store), NAME, WORKLOAD, images, snap.keys / "signing.key", node_facts(snap.facts)
    )


@pytest.mark.parametrize("failure", ["corrupt-pages", "criu-missing", "no-checkpoint-restore"])
def test_failed_restore_falls_back_to_cold_start(snapshot: Snapshot, tmp_path: Path, failure: str) -> None:
    store, env, caps = snapshot.store, None, THAW_CAPS
    if failure == "no-checkpoint-restore":
        caps = tuple(c for c in THAW_CAPS if c != "checkpoint_restore")
    elif failure == "corrupt-pages":
        store = tmp_path / "store"
        _corrupt_copy(snapshot, store)
    else:
        env = {"THAW_CRIU": str(tmp_path / "no-such-criu")}
    plan = _fetch(snapshot, store, tmp_path)
    assert plan["action"] == "restore", plan
    ns, pod = _run_pod(tmp_path / "plan.json", env, caps)
    try:
        outcome = wait_for(
            lambda: (o := read_json(tmp_path / "outcome.json")).get("result") and o, 60, "the outcome", pod
        )
        assert outcome["result"] == "cold", outcome
        reason = str(outcome["reason"])
        assert reason.startswith("restore failed:")
        if failure == "corrupt-pages":
            # CRIU's own log lines; a truncated pages image can also send CRIU's restorer into an
            # endless loop, which the restore timeout (sized by the image) ends.
            assert "criu restore" in reason and ("Error" in reason or "timed out" in reason)
            assert (tmp_path / "restore.log").is_file()
        elif failure == "no-checkpoint-restore":
            assert "CAP_CHECKPOINT_RESTORE" in reason  # CRIU's own words
        else:
            assert "no-such-criu" in reason
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold-started server")
        assert state["counter"] == 0  # the cold command runs: a fresh server
        time.sleep(0.5)
        assert pod.proc.poll() is None  # serving, not crash-looping
        assert "restore failed, cold start" in pod.output
    finally:
        pod.stop()
        ns.delete()
