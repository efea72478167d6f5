"""Real CRIU, fresh containers (issue 10.1, 10.2, 10.6): a server that compiles a shared object into
$TMPDIR, loads it, and keeps a growing journal open under $HOME/.cache is checkpointed in one pod
and restored with its state in another, whose writable places are new and empty; the pod files are
refused over the limit; and the wrapper's stdout may be a log file, /dev/null or a terminal.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.needs import requires
from tests.runtime.pods import (
    REPO,
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
from tests.runtime.snapshots import World

pytestmark = [pytest.mark.criu, requires(missing_prerequisites())]

PORT = 8173
URL = f"http://127.0.0.1:{PORT}"
STATEFUL = REPO / "tests" / "workloads" / "stateful_server.py"
STATEFUL_CMD = ["python3", str(STATEFUL), str(PORT), "--host", "127.0.0.1"]
STANDIN_CMD = ["python3", str(STATE_SERVER), str(PORT)]
# The server's $TMPDIR: a writable place of its own (fresh tmpfs in each pod), as a pod may set it.
POD_ENV = {"TMPDIR": "/var/tmp/app-tmp"}


@dataclass
class Taken:
    """A snapshot published by a pod that ``_taken`` ran, and what that pod saw."""

    world: World
    name: str
    checkpoint: dict[str, Any]
    before: dict[str, Any] = field(default_factory=dict)  # the server's state when it was taken

    @property
    def directory(self) -> Path:
        """Its directory in the store (under a namespace directory: "default" outside a pod)."""
        hex_id = str(self.checkpoint["snapshot"]).split(":", 1)[1]
        (found,) = self.world.store.glob(f"*/{self.name}/{hex_id}")
        return found


def _thaw_args(world: World, name: str, flag: Path, outcome: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint", "on-ready", "--ready", f"file:{flag}", "--store", str(world.store),
        "--key", str(world.keys / "signing.key"), "--name", name, "--workload", f"w-{name}",
        "--facts", str(world.root / "facts.json"), "--outcome", str(outcome), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def _checkpointing(
    world: World,
    name: str,
    cmd: list[str],
    *extra: str,
    stdout: int | None = None,
    stdout_file: str | None = None,
) -> Iterator[tuple[Netns, Pod, Path, Path]]:
    """A fresh pod that checkpoints ``cmd`` once ``flag`` exists: (netns, pod, flag, outcome)."""
    if not world.keys.exists():
        world.setup_keys()
    write_facts(world.root / "facts.json")
    flag, outcome = world.root / f"{name}.ready", world.root / f"pod-{name}" / "outcome.json"
    ns = Netns()
    pod = Pod(
        ns, _thaw_args(world, name, flag, outcome, *extra), cmd, dict(POD_ENV), wrap=with_caps(THAW_CAPS),
        stdout=stdout, stdout_file=stdout_file,
    )  # fmt: skip
    try:
        wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server to answer", pod)
        yield ns, pod, flag, outcome
    finally:
        pod.stop()
        ns.delete()


def _checkpoint_ended(pod: Pod, flag: Path, outcome: Path) -> dict[str, Any]:
    flag.touch()
    ended: dict[str, Any] = wait_for(
        lambda: (
            (c := read_json(outcome).get("checkpoint")) and c.get("status") in ("published", "failed") and c
        ),
        90,
        "the checkpoint to end",
        pod,
    )
    return ended


@contextlib.contextmanager
def _restored(
    taken: Taken,
    pod_dir: Path,
    cmd: list[str],
    *,
    stdout: int | None = None,
    stdout_file: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Netns, Pod, dict[str, Any]]]:
    """``thaw fetch`` then ``thaw exec`` in a new fresh pod; yields once the restore has a result."""
    plan = pod_dir / "plan.json"
    res = thaw_cli(
        "fetch", "--store", str(taken.world.store), "--cache", str(pod_dir / "cache"), "--name", taken.name,
        "--workload", f"w-{taken.name}", "--trust", str(taken.world.trust), "--plan", str(plan),
        "--facts", str(taken.world.root / "facts.json"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert read_json(plan)["action"] == "restore", read_json(plan)
    ns = Netns()
    pod = Pod(
        ns, ["--plan", str(plan), "--ready", f"{URL}/state"], cmd, {**POD_ENV, **(env or {})},
        wrap=with_caps(THAW_CAPS), stdout=stdout, stdout_file=stdout_file,
    )  # fmt: skip
    try:
        out = wait_for(
            lambda: (o := read_json(pod_dir / "outcome.json")).get("result") and o, 60, "the restore", pod
        )
        yield ns, pod, out
    finally:
        pod.stop()
        ns.delete()


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Taken]:
    world = World(tmp_path_factory.mktemp("podfiles"))
    with _checkpointing(world, "stateful", STATEFUL_CMD) as (ns, pod, flag, outcome):
        first = ns.http("GET", f"{URL}/state")
        assert first is not None and first["journal_lines_at_start"] == 0  # a fresh container's $HOME
        assert first["lib"].startswith("/var/tmp/app-tmp/") and first["compiled"] is True
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
        assert ns.http("POST", f"{URL}/bump") == {"counter": 2}
        before = ns.http("GET", f"{URL}/state")
        assert before is not None
        ck = _checkpoint_ended(pod, flag, outcome)
        assert ck["status"] == "published", f"{ck}\n{pod.output}"
        assert ns.http("POST", f"{URL}/bump") == {"counter": 3}  # serving on, its journal growing
        yield Taken(world, "stateful", ck, before)


def test_the_snapshot_carries_the_pod_files_signed(stateful: Taken) -> None:
    from thaw.contract.manifest import load_manifest

    listed = {f["path"]: f for f in load_manifest(stateful.directory / "manifest.json")["files"]}
    index = read_json(stateful.directory / "podfiles" / "index.json")
    by_path = {e["path"]: e for e in index["files"]}
    journal, lib = stateful.before["journal"], stateful.before["lib"]
    assert set(by_path) == {journal, lib}, index  # nothing of the image, the volumes or Python's own
    assert by_path[journal]["kind"] == by_path[lib]["kind"] == "tmpfs"
    # The frozen journal: the size CRIU recorded, which is what the server had then.
    assert by_path[journal]["size"] == stateful.before["journal_bytes"]
    for e in index["files"]:
        assert listed[e["file"]]["size"] == e["size"]  # in the manifest: digests and signature
    assert "podfiles/index.json" in listed
    dirs = {d["path"] for d in index["dirs"]}
    assert dirs >= {os.path.dirname(lib), os.path.dirname(journal), os.path.dirname(stateful.before["ipc"])}
    meta = read_json(stateful.directory / "thaw-exec.json")
    assert meta["pod_files"]["files"] == 2 and meta["root_pid"] >= 4096
    # The configuration a replica must share: the names, each value only as a digest.
    assert {"PATH", "HOME", "PYTHONPATH", "TMPDIR"} <= set(meta["config"]["env"])
    assert all(len(v) == 64 for v in meta["config"]["env"].values())
    assert str(REPO) not in str(meta["config"]) and "/var/tmp/app-tmp" not in str(meta["config"])


def test_restored_in_a_fresh_pod_with_its_state(stateful: Taken, tmp_path: Path) -> None:
    with _restored(stateful, tmp_path, STATEFUL_CMD) as (ns, pod, outcome):
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        assert outcome["timings"]["pod_files"] == 2
        state = ns.http("GET", f"{URL}/state")
        assert state is not None
        same = ("counter", "token", "mixed", "journal_bytes", "journal_lines", "lib", "journal", "ipc")
        assert {k: state[k] for k in same} == {k: stateful.before[k] for k in same}
        assert state["counter"] == 2 and state["pid"] >= 4096
        assert state["ipc_answer"] == state["token"]  # its UNIX socket, bound again in a recreated directory
        # The restored server goes on: its counter (in the shared object) and its journal grow.
        assert ns.http("POST", f"{URL}/bump") == {"counter": 3}
        after = ns.http("GET", f"{URL}/state")
        assert after is not None and after["journal_lines"] == stateful.before["journal_lines"] + 1


def test_a_replica_with_other_configuration_starts_cold_and_says_which(
    stateful: Taken, tmp_path: Path
) -> None:
    """Issue 11.9: the snapshot's memory holds the old configuration; a replica whose environment
    differs is not restored from it. A per-replica variable the webhook names is left out."""
    env = {"MODEL_REVISION": "b", "POD_NAME": "replica-7", "THAW_REPLICA_ENV": "POD_NAME"}
    with _restored(stateful, tmp_path, STATEFUL_CMD, env=env) as (ns, pod, outcome):
        assert outcome["result"] == "cold", outcome
        assert outcome["reason"] == (
            "restore failed: this replica's configuration differs from the snapshot's:"
            " environment MODEL_REVISION (only here)"
        )
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server", pod)
        assert state["counter"] == 0 and state["journal_lines_at_start"] == 0  # cold, in a fresh pod
    # The same replica without the new variable: its POD_NAME alone does not stop the restore.
    with _restored(
        stateful,
        tmp_path / "again",
        STATEFUL_CMD,
        env={"POD_NAME": "replica-8", "THAW_REPLICA_ENV": "POD_NAME"},
    ) as (ns, pod, outcome):
        assert outcome["result"] == "restored", outcome


def test_a_cold_pod_sees_none_of_another_pods_files(stateful: Taken, tmp_path: Path) -> None:
    ns = Netns()
    pod = Pod(
        ns,
        ["--outcome", str(tmp_path / "outcome.json")],
        STATEFUL_CMD,
        dict(POD_ENV),
        wrap=with_caps(THAW_CAPS),
    )
    try:
        state = wait_for(lambda: ns.http("GET", f"{URL}/state"), 30, "the cold server", pod)
        assert state["counter"] == 0 and state["journal_lines_at_start"] == 0  # no journal from pods A or B
        assert state["token"] != stateful.before["token"]
    finally:
        pod.stop()
        ns.delete()


def test_pod_files_over_the_limit_are_refused_and_the_server_goes_on(tmp_path: Path) -> None:
    world = World(tmp_path)
    with _checkpointing(world, "too-big", STATEFUL_CMD, "--pod-files-limit", "4096") as (
        ns,
        pod,
        flag,
        outcome,
    ):
        state = ns.http("GET", f"{URL}/state")
        assert state is not None
        ck = _checkpoint_ended(pod, flag, outcome)
        assert ck["status"] == "failed", ck
        reason = ck["reason"]
        assert "over the limit of 4.0 KiB (--pod-files-limit)" in reason, reason
        assert f"largest: {state['lib']} (" in reason and state["journal"] in reason
        assert ns.http("POST", f"{URL}/bump") == {"counter": 1}  # the tree was let go, unchanged
        assert pod.proc.poll() is None


# --- the wrapper's stdout/stderr (issue 10.6) -----------------------------------------------------


class _Stdout:
    """What a pod's thaw exec is given as stdout and stderr, and what reached it: ``file``, a log file
    the pod opens itself (``>FILE``: truncated, not appending); ``outside``, a log file opened for
    appending by whoever starts the pod; ``devnull``, /dev/null from outside; ``tty``, a terminal."""

    def __init__(self, kind: str, log: Path) -> None:
        self.kind, self.log, self.fd, self.master = kind, log, -1, -1
        self._seen = bytearray()
        if kind == "outside":
            self.fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        elif kind == "devnull":
            self.fd = os.open(os.devnull, os.O_WRONLY)
        elif kind == "tty":
            self.master, self.fd = os.openpty()
            threading.Thread(target=self._drain, daemon=True).start()

    def pod_args(self) -> dict[str, Any]:
        return {"stdout_file": str(self.log)} if self.kind == "file" else {"stdout": self.fd}

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(self.master, 65536):
                self._seen += chunk

    def text(self) -> str:
        if self.kind in ("file", "outside"):
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        return self._seen.decode(errors="replace")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@pytest.mark.parametrize("kind", ["file", "outside", "devnull", "tty"])
def test_stdout_may_be_a_file_devnull_or_a_terminal(kind: str, tmp_path: Path) -> None:
    world = World(tmp_path / "world")
    world.root.mkdir()
    name = f"stdio-{kind}"
    log = tmp_path / "pod.log"
    out = _Stdout(kind, log)
    try:
        with _checkpointing(world, name, STANDIN_CMD, **out.pod_args()) as (ns, pod, flag, outcome):
            assert ns.http("POST", f"{URL}/bump") == {"counter": 1}
            ck = _checkpoint_ended(pod, flag, outcome)
            assert ck["status"] == "published", f"{ck}\n{out.text()[-3000:]}"
            taken = Taken(world, name, ck)
    finally:
        out.close()
    # The new pod's stdout: the same log path opened afresh (another size), /dev/null, another terminal.
    new = _Stdout(kind, log)
    try:
        with _restored(taken, tmp_path / "b", STANDIN_CMD, **new.pod_args()) as (ns, _pod, result):
            assert result["result"] == "restored", f"{result}\n{new.text()[-3000:]}"
            assert ns.http("POST", f"{URL}/bump") == {"counter": 2}
            if kind != "devnull":  # the restored server writes to the new pod's stdout
                wait_for(lambda: 'request "POST /bump' in new.text(), 10, "the restored server's log line")
    finally:
        new.close()
    stdio = read_json(taken.directory / "thaw-exec.json")["stdio"]
    expect = {"file": str(log)[1:], "tty": "tty["}.get(kind, "file[")  # the last two: from outside the pod
    assert stdio["1"].startswith(expect) and stdio["2"] == stdio["1"], stdio
