"""Real CRIU, real processes: a Python HTTP server with state is checkpointed through
``thaw exec --checkpoint on-ready`` and restored through ``thaw fetch`` + ``thaw exec`` in a fresh
process tree (new PID, mount and network namespaces, as a new pod's container); a restore that fails
midway falls back to the cold command with the reason recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.needs import requires
from tests.runtime.pods import (
    STATE_SERVER,
    THAW_CAPS,
    Netns,
    Pod,
    missing_prerequisites,
    read_json,
    thaw_cli,
    thaw_command,
    thaw_env,
    wait_for,
    with_caps,
    write_facts,
)
from tests.runtime.snapshots import World

pytestmark = [pytest.mark.criu, requires(missing_prerequisites())]

PORT = 8171
NAME = "state-server"
CMD = ["python3", str(STATE_SERVER), str(PORT)]
URL = f"http://127.0.0.1:{PORT}"


@dataclass
class Snapshot(World):
    """A snapshot ``_checkpointing`` published under ``root`` (its keys, trust and store: World's)."""

    checkpoint_outcome: dict[str, Any] = field(default_factory=dict)
    name: str = NAME
    cmd: list[str] = field(default_factory=lambda: list(CMD))

    @property
    def facts(self) -> Path:
        return self.root / "facts.json"

    @property
    def workload(self) -> str:
        return _workload(self.name)

    @property
    def snapshot_id(self) -> str:
        return str(self.checkpoint_outcome["snapshot"])

    @property
    def directory(self) -> Path:
        """Its directory in the store (per namespace: by hand, outside a pod, "default")."""
        return self.store / "default" / self.name / self.snapshot_id.split(":", 1)[1]


def _workload(name: str) -> str:
    return f"w-{name}"


@contextlib.contextmanager
def _checkpointing(
    root: Path, name: str, cmd: list[str], extra: tuple[str, ...] = ()
) -> Iterator[tuple[Netns, Pod, Callable[[], dict[str, Any]]]]:
    """A pod (fresh namespaces, the webhook's capabilities) that checkpoints ``cmd`` once it is
    "ready": yields the namespace, the pod, and a function that makes it ready and returns the
    checkpoint's outcome (published or failed)."""
    world = World(root)
    if not world.keys.exists():
        world.setup_keys()
    facts = write_facts(root / "facts.json")
    ready_flag = root / f"{name}.ready"
    outcome_path = root / f"pod-{name}" / "outcome.json"

    def checkpoint() -> dict[str, Any]:
        ready_flag.touch()
        out: dict[str, Any] = wait_for(
            lambda: (
                (o := read_json(outcome_path).get("checkpoint"))
                and o.get("status") in ("published", "failed")
                and o
            ),
            90,
            "the checkpoint to end",
            pod,
        )
        return out

    ns = Netns()
    pod = Pod(
        ns,
        [
            "--checkpoint", "on-ready", "--ready", f"file:{ready_flag}", "--store", str(root / "store"),
            "--key", str(world.keys / "signing.key"), "--name", name, "--workload", _workload(name),
            "--facts", str(facts), "--cache", str(root / f"cache-{name}"), "--outcome", str(outcome_path),
            *extra,
        ],
        cmd,
        wrap=with_caps(THAW_CAPS),  # the capabilities the webhook grants, no more
    )  # fmt: skip
    try:
        wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server to answer", pod)
        yield ns, pod, checkpoint
    finally:
        pod.stop()
        ns.delete()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """Checkpoint the server once (counter bumped to 2 first) through thaw exec; then stop that pod."""
    root = tmp_path_factory.mktemp("ckpt")
    with _checkpointing(root, NAME, CMD) as (ns, pod, checkpoint):
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        assert ns.http("POST", f"{URL}/bump") == {"counter": 2}
        out = checkpoint()  # "ready" only now, so the snapshot holds counter == 2
        assert out["status"] == "published", f"{out}\n{pod.output}"
        # The server keeps serving after its snapshot was taken, and its state moves on.
        assert ns.http("POST", f"{URL}/bump") == {"counter": 3}
        yield Snapshot(root, out)


def _fetch(snap: Snapshot, store: Path, pod_dir: Path) -> dict[str, object]:
    plan = pod_dir / "plan.json"
    res = thaw_cli(
        "fetch", "--store", str(store), "--cache", str(pod_dir / "cache"), "--name", snap.name,
        "--workload", snap.workload, "--trust", str(snap.trust), "--plan", str(plan),
        "--facts", str(snap.facts),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return read_json(plan)


def _run_pod(
    plan: Path,
    env: dict[str, str] | None = None,
    caps: tuple[str, ...] = THAW_CAPS,
    cmd: list[str] = CMD,
    *,
    extra: tuple[str, ...] = (),
    entry: list[str] | None = None,
) -> tuple[Netns, Pod]:
    """A restoring pod; ``entry`` runs before ``python -m thaw exec`` (fake_cuda_exec.py)."""
    ns = Netns()
    args = ["--plan", str(plan), "--ready", f"{URL}/state", *extra]
    pod = Pod(ns, args, cmd, env, wrap=[*with_caps(caps), *(entry or [])])
    return ns, pod


def _restore_outcome(pod_dir: Path, pod: Pod) -> dict[str, Any]:
    out: dict[str, Any] = wait_for(
        lambda: (o := read_json(pod_dir / "outcome.json")).get("result") and o, 60, "the restore outcome", pod
    )
    return out


def test_checkpoint_records_what_it_took(snapshot: Snapshot) -> None:
    from thaw.contract.manifest import load_manifest

    snap_dir = snapshot.directory
    manifest = load_manifest(snap_dir / "manifest.json")
    assert manifest["workload"] == snapshot.workload
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
        outcome = _restore_outcome(tmp_path, pod)
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


def _republish(snap: Snapshot, dest_store: Path, change: Callable[[Path], None]) -> None:
    """The snapshot's images, changed, re-published (so re-signed) by the trusted key: fetch accepts
    them, and the restore meets the change."""
    from thaw.snapshot.nodefacts import node_facts
    from thaw.snapshot.store import DirectoryStore, publish

    images = dest_store.parent / "changed-images"
    shutil.copytree(snap.directory, images)
    (images / "manifest.json").unlink()
    change(images)
    publish(
        DirectoryStore(dest_store),
        snap.name,
        snap.workload,
        images,
        snap.keys / "signing.key",
        node_facts(snap.facts),
    )


def _truncate_pages(images: Path) -> None:
    """CRIU fails midway through the restore of these."""
    pages = sorted(images.glob("pages-*.img"))[0]
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)


@pytest.mark.parametrize("failure", ["corrupt-pages", "criu-missing", "no-checkpoint-restore"])
def test_failed_restore_falls_back_to_cold_start(snapshot: Snapshot, tmp_path: Path, failure: str) -> None:
    store, env, caps = snapshot.store, None, THAW_CAPS
    if failure == "no-checkpoint-restore":
        caps = tuple(c for c in THAW_CAPS if c != "checkpoint_restore")
    elif failure == "corrupt-pages":
        store = tmp_path / "store"
        _republish(snapshot, store, _truncate_pages)
    else:
        env = {"THAW_CRIU": str(tmp_path / "no-such-criu")}
    plan = _fetch(snapshot, store, tmp_path)
    assert plan["action"] == "restore", plan
    ns, pod = _run_pod(tmp_path / "plan.json", env, caps)
    try:
        outcome = _restore_outcome(tmp_path, pod)
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
        assert pod.proc.poll() is None  # serving, not crash-looping
        assert "restore failed, cold start" in pod.output
    finally:
        pod.stop()
        ns.delete()


# --- sleep and wake hooks (thaw/contract/hooks.py) -----------------------------------------------

SLEEPY = "sleepy-server"
SLEEPY_CMD = [*CMD, "--mem-mb", "64"]  # 64 MiB that sleep lets go of, as vLLM's KV cache
MIB = 1 << 20


def _pages_bytes(snap: Snapshot) -> int:
    return sum(f.stat().st_size for f in snap.directory.glob("pages-*.img"))


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """The stand-in with 64 MiB of cache, checkpointed asleep; the pod is stopped afterwards."""
    root = tmp_path_factory.mktemp("sleepy")
    hooks = ("--sleep", f"{URL}/sleep?level=1", "--wake", f"{URL}/wake_up")
    with _checkpointing(root, SLEEPY, SLEEPY_CMD, hooks) as (ns, pod, checkpoint):
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        out = checkpoint()
        assert out["status"] == "published", f"{out}\n{pod.output}"
        state = ns.http("GET", f"{URL}/state")  # woken after the checkpoint: serving, memory back
        assert state is not None and state["mem_mb"] == 64 and state["counter"] == 1
        yield Snapshot(root, out, name=SLEEPY, cmd=SLEEPY_CMD)


def test_asleep_checkpoint_leaves_the_cache_out(sleepy: Snapshot, snapshot: Snapshot) -> None:
    out = sleepy.checkpoint_outcome
    assert out["sleep_s"] >= 0 and out["wake_s"] >= 0
    meta = read_json(sleepy.directory / "thaw-exec.json")
    assert meta["wake"] == f"{URL}/wake_up"  # signed with the images: the replica wakes the same way
    # Side by side with the same server without the 64 MiB (the `snapshot` fixture): the sleeping
    # server's pages are about as small; awake, the 64 MiB would be in them.
    assert _pages_bytes(sleepy) < _pages_bytes(snapshot) + 16 * MIB


def test_restored_replica_is_woken_before_its_readiness_check(sleepy: Snapshot, tmp_path: Path) -> None:
    assert _fetch(sleepy, sleepy.store, tmp_path)["action"] == "restore"
    ns, pod = _run_pod(tmp_path / "plan.json", cmd=SLEEPY_CMD)
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        assert outcome["timings"]["wake_s"] >= 0
        state = ns.http("GET", f"{URL}/state")
        assert state is not None and state["counter"] == 1 and state["mem_mb"] == 64
    finally:
        pod.stop()
        ns.delete()


def test_replica_that_does_not_wake_starts_cold(sleepy: Snapshot, tmp_path: Path) -> None:
    def wake_elsewhere(images: Path) -> None:
        meta = read_json(images / "thaw-exec.json")
        (images / "thaw-exec.json").write_text(json.dumps({**meta, "wake": f"{URL}/nope"}))

    store = tmp_path / "store"
    _republish(sleepy, store, wake_elsewhere)
    assert _fetch(sleepy, store, tmp_path)["action"] == "restore"
    ns, pod = _run_pod(tmp_path / "plan.json", cmd=SLEEPY_CMD)
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "cold"  # the asleep replica answers 503 to all but /wake_up
        assert (
            outcome["reason"] == f"restore failed: restored server did not wake: POST {URL}/nope answered 503"
        )
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold-started server", pod)
        assert state["counter"] == 0  # the cold command, not the asleep replica
    finally:
        pod.stop()
        ns.delete()


def test_refused_sleep_fails_the_checkpoint_and_the_server_goes_on(tmp_path: Path) -> None:
    hooks = ("--sleep", f"{URL}/nope", "--wake", f"{URL}/wake_up")
    with _checkpointing(tmp_path, "refuses-sleep", SLEEPY_CMD, hooks) as (ns, pod, checkpoint):
        out = checkpoint()
        assert out["status"] == "failed" and out["reason"] == f"sleep hook: POST {URL}/nope answered 404"
        assert "stopped_workload" not in out
        state = ns.http("GET", f"{URL}/state")
        assert state is not None and state["mem_mb"] == 64 and pod.proc.poll() is None


def test_server_that_does_not_wake_after_the_checkpoint_is_stopped(tmp_path: Path) -> None:
    hooks = ("--sleep", f"{URL}/sleep", "--wake", f"{URL}/nope")
    with _checkpointing(tmp_path, "never-wakes", SLEEPY_CMD, hooks) as (_, pod, checkpoint):
        out = checkpoint()
        assert out["status"] == "failed" and out["stopped_workload"] is True
        assert out["reason"] == f"the server did not wake after the checkpoint: POST {URL}/nope answered 503"
        # stopped, not left asleep: the container exits and restarts cold
        wait_for(lambda: pod.proc.poll() is not None, 30, "thaw exec to exit", pod)


# --- the snapshot between thaw fetch and thaw exec (issues 10.6, 11.1) ---------------------------


@pytest.mark.parametrize("change", ["evicted", "altered"])
def test_a_snapshot_evicted_or_altered_after_fetch_is_a_cold_start(
    snapshot: Snapshot, tmp_path: Path, change: str
) -> None:
    from thaw.snapshot.cache import evict

    plan = _fetch(snapshot, snapshot.store, tmp_path)
    assert plan["action"] == "restore", plan
    snap_dir = Path(str(plan["path"]))
    if change == "evicted":  # the agent made room between the init container and the workload
        assert evict(snap_dir)
    else:  # a byte of the staged copy changed after it was verified at fetch (same size)
        pages = sorted(snap_dir.glob("pages-*.img"))[0]
        with open(pages, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
    ns, pod = _run_pod(tmp_path / "plan.json")
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "cold", f"{outcome}\n{pod.output}"
        words = "no longer in the node cache" if change == "evicted" else "differs from its manifest"
        assert outcome["reason"].startswith("restore failed: ") and words in outcome["reason"], outcome
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server", pod)
        assert state["counter"] == 0  # the workload runs: cold, not crash-looping
        assert pod.proc.poll() is None
    finally:
        pod.stop()
        ns.delete()


# --- ready means ready (issue 10.4): both gates, with the CUDA stand-in -----------------------------

GATE = "gate-server"
GATE_CMD = ["python3", str(Path(__file__).with_name("gate_server.py")), str(PORT)]
FAKE_CUDA = [sys.executable, str(Path(__file__).with_name("fake_cuda_exec.py"))]


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """The gate server (a cuda-restore thread beside the serving one) checkpointed, then republished
    with its root listed as a CUDA process, so that a restore calls the CUDA stand-in."""
    root = tmp_path_factory.mktemp("gated")
    with _checkpointing(root, GATE, GATE_CMD) as (ns, pod, checkpoint):
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        out = checkpoint()
        assert out["status"] == "published", f"{out}\n{pod.output}"
    snap = Snapshot(root, out, name=GATE, cmd=GATE_CMD)

    def as_cuda(images: Path) -> None:
        meta = read_json(images / "thaw-exec.json")
        (images / "thaw-exec.json").write_text(json.dumps({**meta, "cuda_pids": [meta["root_pid"]]}))

    _republish(snap, root / "cuda-store", as_cuda)
    yield snap


@pytest.mark.parametrize("gate", ["file", "stopped"])
def test_ready_only_once_the_gpu_state_is_back(gated: Snapshot, tmp_path: Path, gate: str) -> None:
    plan = _fetch(gated, gated.root / "cuda-store", tmp_path)
    assert plan["action"] == "restore", plan
    seen_log, ready = tmp_path / "cuda.jsonl", tmp_path / "ready"
    env = {
        "THAW_TEST_CUDA_LOG": str(seen_log),
        "THAW_TEST_READY": str(ready),
        "THAW_TEST_URL": f"{URL}/state",
    }
    ns, pod = _run_pod(
        tmp_path / "plan.json", env, cmd=GATE_CMD, extra=("--ready-gate", gate), entry=FAKE_CUDA
    )
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        [seen] = [json.loads(line) for line in seen_log.read_text().splitlines()]
        # While the CUDA restore ran, nothing let kubelet take the pod as ready.
        assert seen["ready_file"] is False
        assert ready.exists()  # and once it was back, the gate opened
        threads = seen["threads"]
        main = threads[str(seen["pid"])]
        helper = next(state for comm, state in threads.values() if comm == "cuda-restore")
        if gate == "stopped":
            assert main[1] in ("T", "t"), threads  # the server's own threads stayed stopped
            assert helper in ("S", "R"), threads  # only the driver's restore thread ran
            assert seen["answered"] is False  # no client got an answer before GPU memory was back
            assert outcome["timings"]["stopped_gate"] == 1
        else:
            assert main[1] not in ("T", "t") and "stopped_gate" not in outcome["timings"]
        state = ns.http("GET", f"{URL}/state")
        assert state is not None and state["counter"] == 1  # the snapshot's state, running again
        assert ns.http("POST", f"{URL}/bump") == {"counter": 2}
    finally:
        pod.stop()
        ns.delete()


# --- the injected pod: thaw exec without store or key, thaw-sidecar publishing (issue 11.3) --------


SIDE_UID = "3d1e5c2a-9b7f-4a60-8e21-5f0c9d8a7b6c"


def test_the_sidecar_publishes_what_thaw_exec_dumped_and_the_key_never_reaches_the_workload(
    tmp_path: Path,
) -> None:
    from thaw.contract.manifest import load_manifest, verify_manifest
    from thaw.contract.signing import load_trusted_keys

    world = World(tmp_path)
    world.setup_keys()
    facts = write_facts(tmp_path / "facts.json")
    plan_dir, work, state_dir, cache = (tmp_path / d for d in ("plan", "work", "state", "cache"))
    for d in (work, state_dir, cache):
        d.mkdir()
    identity = {"THAW_POD_NAME": "a-0", "THAW_POD_NAMESPACE": "team-a", "THAW_POD_UID": SIDE_UID}
    # thaw-fetch: nothing published yet, a cold plan and the facts it used beside it.
    res = thaw_cli(
        "fetch", "--store", str(world.store), "--cache", str(cache), "--name", NAME, "--workload", "w-side",
        "--trust", str(world.trust), "--plan", str(plan_dir / "plan.json"), "--facts", str(facts),
        "--namespace", "team-a",
    )  # fmt: skip
    assert res.returncode == 0 and read_json(plan_dir / "plan.json")["action"] == "cold", res.stderr
    sidecar = subprocess.Popen(
        [*thaw_command(), "sidecar", "--work", str(work), "--plan", str(plan_dir / "plan.json"),
         "--cache", str(cache), "--store", str(world.store), "--state", str(state_dir), "--interval", "0.1"],
        env=thaw_env({**identity, "THAW_NAME": NAME, "THAW_WORKLOAD": "w-side",
                      "THAW_KEY": str(world.keys / "signing.key")}),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready_flag = tmp_path / "ready-now"
    ns = Netns()
    # The workload container: the plan read-only in a pod, no store, no key; the key's directory is
    # not even there (an empty tmpfs over it, as a pod without that volume).
    hide_key = ["sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec env -u PWD "$@"', str(world.keys)]
    pod = Pod(
        ns,
        ["--plan", str(plan_dir / "plan.json"), "--work", str(work), "--checkpoint", "on-ready",
         "--ready", f"file:{ready_flag}"],
        CMD,
        identity,
        wrap=[*hide_key, *with_caps(THAW_CAPS)],
    )  # fmt: skip
    try:
        wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server", pod)
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        exec_pid = pod.thaw_pid()
        assert exec_pid is not None
        environ = (
            Path(f"/proc/{exec_pid}/environ").read_bytes() + Path(f"/proc/{exec_pid}/cmdline").read_bytes()
        )
        assert b"THAW_KEY" not in environ and b"signing.key" not in environ and b"THAW_STORE" not in environ
        assert list(Path(f"/proc/{exec_pid}/root{world.keys}").iterdir()) == []  # the pod's view: empty
        ready_flag.touch()
        ck = wait_for(
            lambda: (
                (c := read_json(work / "outcome.json").get("checkpoint", {})).get("status")
                in ("published", "failed", "skipped")
                and c
            ),
            90,
            "the checkpoint through thaw-sidecar",
            pod,
        )
        assert ck["status"] == "published", f"{ck}\n{pod.output}"
        snap_dir = world.store / "team-a" / NAME / ck["snapshot"].split(":", 1)[1]
        manifest = load_manifest(snap_dir / "manifest.json")
        verify_manifest(manifest, load_trusted_keys(world.trust))  # signed by the sidecar's key
        assert manifest["workload"] == "w-side"
        assert not (work / "dump").exists() and (work / "checkpoint.done").exists()
        assert not (work / "checkpoint.inprogress").exists()
        copy = cache / ".outcomes" / f"{SIDE_UID}.json"
        wait_for(lambda: read_json(copy).get("checkpoint", {}).get("status") == "published", 10, "the relay")
        assert read_json(copy)["pod"]["namespace"] == "team-a"
    finally:
        pod.stop()
        ns.delete()
        sidecar.terminate()
        sidecar.communicate(timeout=20)
    assert sidecar.returncode == 0
    # A new replica restores what the sidecar published, with the state it had.
    replica = tmp_path / "replica"
    replica.mkdir()
    res = thaw_cli(
        "fetch", "--store", str(world.store), "--cache", str(replica / "cache"), "--name", NAME,
        "--workload", "w-side", "--trust", str(world.trust), "--plan", str(replica / "plan.json"),
        "--facts", str(facts), "--namespace", "team-a",
    )  # fmt: skip
    assert read_json(replica / "plan.json")["action"] == "restore", res.stderr
    ns, pod = _run_pod(replica / "plan.json")
    try:
        outcome = _restore_outcome(replica, pod)
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        state = ns.http("GET", f"{URL}/state")
        assert state is not None and state["counter"] == 1
    finally:
        pod.stop()
        ns.delete()


# --- weights out of the image: vLLM's sleep level 2, woken in three steps ----------------------------

WEIGHTS_MB = 32


def _wake_sequence(method: str = "reload_weights") -> str:
    """vLLM's documented level-2 wake: the weights' memory back, the weights reloaded in place from
    the model files, then the KV cache."""
    return json.dumps(
        [
            f"{URL}/wake_up?tags=weights",
            {"url": f"{URL}/collective_rpc", "body": {"method": method}},
            f"{URL}/wake_up?tags=kv_cache",
        ]
    )


@dataclass
class Deep(Snapshot):
    model_digest: str = ""


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deep]:
    """The stand-in with 64 MiB of cache and 32 MiB of weights from a model file, checkpointed asleep
    at level 2 (neither in the image) and woken by the three-step sequence; the pod is stopped after."""
    root = tmp_path_factory.mktemp("deep")
    model = root / "model.bin"  # the model files every node has (a volume, the image)
    model.write_bytes(os.urandom(WEIGHTS_MB * MIB))
    cmd = [*CMD, "--mem-mb", "64", "--weights", str(model)]
    hooks = ("--sleep", f"{URL}/sleep?level=2", "--wake", _wake_sequence())
    with _checkpointing(root, "deep-server", cmd, hooks) as (ns, pod, checkpoint):
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        out = checkpoint()
        assert out["status"] == "published", f"{out}\n{pod.output}"
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        state = ns.http("GET", f"{URL}/state")  # woken by all three steps: the model's weights, the cache
        assert state is not None and state["weights"] == digest and state["mem_mb"] == 64, state
        yield Deep(root, out, name="deep-server", cmd=cmd, model_digest=digest)


def test_level_2_checkpoint_leaves_the_weights_out(deep: Deep, snapshot: Snapshot) -> None:
    meta = read_json(deep.directory / "thaw-exec.json")
    assert meta["wake"] == [  # signed with the images: every replica wakes with the same three steps
        {"url": f"{URL}/wake_up?tags=weights"},
        {"url": f"{URL}/collective_rpc", "body": {"method": "reload_weights"}},
        {"url": f"{URL}/wake_up?tags=kv_cache"},
    ]
    assert deep.checkpoint_outcome["wake_s"] >= 0
    # Beside the plain server (no cache, no weights): about as small; 32 MiB of weights would show.
    assert _pages_bytes(deep) < _pages_bytes(snapshot) + 16 * MIB


def test_replica_reloads_its_weights_in_three_steps(deep: Deep, tmp_path: Path) -> None:
    assert _fetch(deep, deep.store, tmp_path)["action"] == "restore"
    ns, pod = _run_pod(tmp_path / "plan.json", cmd=deep.cmd)
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        assert outcome["timings"]["wake_s"] >= 0
        state = ns.http("GET", f"{URL}/state")
        # the snapshot's counter, the model's weights (a wake without the reload reports zeros'), the cache
        assert state is not None and state["counter"] == 1, state
        assert state["weights"] == deep.model_digest and state["mem_mb"] == 64
        assert 'request "POST /collective_rpc' in pod.output  # the restored server's own log line
    finally:
        pod.stop()
        ns.delete()


def test_replica_whose_wake_step_fails_starts_cold_naming_the_step(deep: Deep, tmp_path: Path) -> None:
    def wrong_method(images: Path) -> None:  # a server without the reload the snapshot relies on
        meta = read_json(images / "thaw-exec.json")
        meta["wake"] = json.loads(_wake_sequence("reload_weights_v2"))
        (images / "thaw-exec.json").write_text(json.dumps(meta))

    store = tmp_path / "store"
    _republish(deep, store, wrong_method)
    assert _fetch(deep, store, tmp_path)["action"] == "restore"
    ns, pod = _run_pod(tmp_path / "plan.json", cmd=deep.cmd)
    try:
        outcome = _restore_outcome(tmp_path, pod)
        assert outcome["result"] == "cold"
        assert outcome["reason"] == (
            "restore failed: restored server did not wake: "
            f"step 2 of 3: POST {URL}/collective_rpc answered 400"
        )
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold-started server", pod)
        assert state["counter"] == 0 and state["weights"] == deep.model_digest  # the cold command
    finally:
        pod.stop()
        ns.delete()
