"""``thaw sidecar`` (the thaw-sidecar container): the outcome relay reads the workload's file
bounded, and the pod's dump is published at most once, never for a restored replica, as the pod's
own snapshot (identity from the sidecar's env, never from a request). Real files, the real ingest and
directory store; the request/answer files as ``thaw exec`` writes them (thaw.runtime.publish)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import REPO
from thaw.contract.manifest import Manifest, verify_manifest
from thaw.contract.plan import cold_plan, restore_plan, write_plan
from thaw.contract.signing import generate_keypair, load_trusted_keys
from thaw.dev.sandbox import thaw_command, thaw_env
from thaw.runtime import workdir
from thaw.runtime.publish import SidecarPublisher
from thaw.runtime.sidecar import STATE_NAME, Sidecar, SidecarConfig, parse_request
from thaw.snapshot.outcome_copy import MAX_OUTCOME_BYTES, outcome_copy_path
from thaw.snapshot.store import DirectoryStore

UID = "6f1c2a3b-0d4e-4f5a-8b9c-0123456789ab"
POD = {"THAW_POD_NAME": "qwen-0", "THAW_POD_NAMESPACE": "team-a", "THAW_POD_UID": UID, "THAW_NODE_NAME": "n1"}
FACTS = {
    "arch": "x86_64",
    "kernel": "6.18.0-test",
    "gpu": {"product": "none", "count": 0},
    "driver": "none",
    "criu": "4.2.1",
}


class Pod:
    """A pod's directories: plan (ro for the workload), work (shared), state (the sidecar's own)."""

    def __init__(self, root: Path, *, restored: bool = False, key: bool = True) -> None:
        self.root = root
        self.plan = root / "plan" / "plan.json"
        self.work, self.state, self.cache, self.store = (
            root / d for d in ("work", "state", "cache", "store")
        )
        for d in (self.work, self.state, self.cache, self.store):
            d.mkdir(parents=True)
        write_plan(
            self.plan,
            restore_plan("/var/lib/thaw/cache/team-a/qwen/" + "a" * 64, "sha256:" + "a" * 64)
            if restored
            else cold_plan("no snapshot: none published under 'qwen' yet"),
        )
        (self.plan.parent / "facts.json").write_bytes(orjson.dumps(FACTS))
        self.keys = root / "keys"
        generate_keypair(self.keys)
        if not key:
            (self.keys / "signing.key").unlink()
        self.trust = root / "trust"
        self.trust.mkdir()
        shutil.copy(self.keys / "signing.pub", self.trust)

    def config(self, **over: Any) -> SidecarConfig:
        values: dict[str, Any] = {
            "work": self.work,
            "plan": self.plan,
            "cache": self.cache,
            "state": self.state,
            "store": DirectoryStore(self.store),
            "key": self.keys / "signing.key",
            "name": "qwen",
            "workload": "w-qwen",
            "facts": self.plan.parent / "facts.json",
            "environ": dict(POD),
            "interval": 0.05,
        }
        return SidecarConfig(**{**values, **over})

    def dump(self, files: dict[str, bytes] | None = None) -> Path:
        d = self.work / workdir.DUMP
        d.mkdir(exist_ok=True)
        for name, data in (files or {"pages-1.img": os.urandom(200_000), "pstree.img": b"tree"}).items():
            (d / name).write_bytes(data)
        return d

    def published(self) -> list[Manifest]:
        return [listed.manifest for listed in DirectoryStore(self.store).list_snapshots("team-a", "qwen")]


def _request(pod: Pod, step: str, nbytes: int, rid: str, **extra: Any) -> None:
    workdir.write_json(
        pod.work / workdir.REQUEST, {"format": 1, "id": rid, "step": step, "bytes": nbytes, **extra}
    )


def _serve_until_answered(side: Sidecar, pod: Pod, rid: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        side.serve()
        answer = workdir.read_json_or_none(pod.work / workdir.RESULT)
        if answer is not None and answer.get("id") == rid:
            return answer
        time.sleep(0.02)
    raise AssertionError(f"no answer to {rid}")


# --- the outcome relay -------------------------------------------------------------------------


def test_relay_copies_the_outcome_with_the_pods_own_identity(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    spoofed = {"result": "cold", "pod": {"namespace": "kube-system", "name": "kube-apiserver-x", "uid": UID}}
    workdir.write_json(pod.work / workdir.OUTCOME, spoofed)
    side.relay()
    copy = orjson.loads(outcome_copy_path(pod.cache, UID).read_bytes())
    assert copy["result"] == "cold"
    assert copy["pod"] == {"name": "qwen-0", "namespace": "team-a", "uid": UID, "node": "n1"}


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge", "not-json"])
def test_relay_refuses_what_is_not_an_outcome(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    target = pod.work / workdir.OUTCOME
    if kind == "symlink":
        target.symlink_to("/dev/zero")  # read whole, it would never end
    elif kind == "fifo":
        os.mkfifo(target)  # a plain open for reading would block until a writer came
    elif kind == "huge":
        target.write_bytes(b'{"x": "' + b"a" * (MAX_OUTCOME_BYTES + 10) + b'"}')
    else:
        target.write_bytes(b"[1, 2")
    done = threading.Event()

    def relay_twice() -> None:
        side.relay()
        side.relay()
        done.set()

    threading.Thread(target=relay_twice, daemon=True).start()
    assert done.wait(10), "the relay blocked"
    assert not outcome_copy_path(pod.cache, UID).exists()
    words = {"symlink": "symlink", "fifo": "FIFO", "huge": "more than", "not-json": "not JSON"}[kind]
    refusals = [r.getMessage() for r in caplog.records if "outcome not relayed" in r.getMessage()]
    assert len(refusals) == 1 and words in refusals[0], refusals  # said once, not on every pass


# --- publishing ----------------------------------------------------------------------------------


def test_publishes_once_as_the_pods_own_snapshot(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    dump = pod.dump()
    nbytes = sum(p.stat().st_size for p in dump.iterdir())
    _request(pod, "room", nbytes, "0011223344556677")
    assert _serve_until_answered(side, pod, "0011223344556677") == {
        "format": 1,
        "id": "0011223344556677",
        "step": "room",
        "ok": True,
    }
    # A request names no identity; fields it adds are ignored.
    _request(pod, "publish", nbytes, "8899aabbccddeeff", name="other", namespace="kube-system", workload="x")
    answer = _serve_until_answered(side, pod, "8899aabbccddeeff")
    assert answer["status"] == "published", answer
    [manifest] = pod.published()
    assert (
        manifest["id"] == answer["snapshot"]
        and manifest["name"] == "qwen"
        and manifest["workload"] == "w-qwen"
    )
    verify_manifest(manifest, load_trusted_keys(pod.trust))  # signed by the pod's key
    assert not dump.exists()  # deleted once published
    assert answer["cached"] is True and (pod.cache / "team-a" / "qwen").is_dir()
    # Once per pod: a second dump and request (a compromised workload's) are refused.
    pod.dump({"pages-1.img": b"forged"})
    _request(pod, "publish", 6, "fedcba9876543210")
    again = _serve_until_answered(side, pod, "fedcba9876543210")
    assert again["status"] == "refused" and "already published once" in again["reason"]
    assert len(pod.published()) == 1
    # The state survives a restarted sidecar (its own emptyDir).
    restarted = Sidecar(pod.config())
    assert "already published once" in (restarted.refusal() or "")
    assert (pod.state / STATE_NAME).is_file()


def test_a_restored_replica_never_publishes(tmp_path: Path) -> None:
    pod = Pod(tmp_path, restored=True)
    side = Sidecar(pod.config())
    pod.dump()
    _request(pod, "room", 1000, "00000000aaaaaaaa")
    room = _serve_until_answered(side, pod, "00000000aaaaaaaa")
    assert room["ok"] is False and "restored replica never publishes" in room["reason"]
    _request(pod, "publish", 1000, "00000000bbbbbbbb")
    answer = _serve_until_answered(side, pod, "00000000bbbbbbbb")
    assert answer["status"] == "refused" and "restored" in answer["reason"]
    assert pod.published() == [] and not (pod.work / workdir.DUMP).exists()
    assert not (pod.state / STATE_NAME).exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"key": None}, "no signing key"),
        ({"checkpoint": "never"}, "checkpointing is off"),
        ({"environ": {k: v for k, v in POD.items() if k != "THAW_POD_NAMESPACE"}}, "THAW_POD_NAMESPACE"),
        ({"name": None}, "THAW_NAME"),
    ],
)
def test_no_publish_without_key_identity_or_checkpointing(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config(**change))
    assert words in (side.refusal() or "")


def test_a_dump_that_grows_past_what_was_asked_is_refused(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    pod.dump({"pages-1.img": os.urandom(100_000)})
    _request(pod, "publish", 1000, "1111111111111111")  # the room was asked for 1000 bytes
    answer = _serve_until_answered(side, pod, "1111111111111111")
    assert answer["status"] == "failed" and "more than 1000 bytes" in answer["reason"]
    assert pod.published() == []
    assert "already published once" in (side.refusal() or "")  # it began: never again in this pod


@pytest.mark.parametrize("kind", ["symlink", "fifo", "outside"])
def test_special_files_in_the_dump_are_refused(tmp_path: Path, kind: str) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    dump = pod.dump()
    secret = tmp_path / "other-tenant.img"
    secret.write_bytes(b"another pod's memory")
    if kind == "symlink":
        (dump / "pages-2.img").symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(dump / "pages-2.img")
    else:  # the dump directory itself a link to somewhere else
        shutil.rmtree(dump)
        (pod.work / workdir.DUMP).symlink_to(secret.parent)
    _request(pod, "publish", 10_000_000, "2222222222222222")
    answer = _serve_until_answered(side, pod, "2222222222222222")
    assert answer["status"] == "failed", answer
    assert ("symlink" if kind != "fifo" else "FIFO") in answer["reason"]
    assert pod.published() == []
    assert secret.read_bytes() == b"another pod's memory"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"format": 1, "id": "0123456789abcdef", "step": "delete", "bytes": 1}, "step"),
        ({"format": 1, "id": "../../x", "step": "room", "bytes": 1}, "id"),
        ({"format": 1, "id": "0123456789abcdef", "step": "room", "bytes": -5}, "bytes"),
        ({"format": 2, "id": "0123456789abcdef", "step": "room", "bytes": 1}, "format"),
    ],
)
def test_malformed_requests_are_refused(value: dict[str, Any], words: str) -> None:
    why = parse_request(value)
    assert isinstance(why, str) and words in why


def test_a_symlinked_request_is_not_followed(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    side = Sidecar(pod.config())
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(orjson.dumps({"format": 1, "id": "3333333333333333", "step": "room", "bytes": 1}))
    (pod.work / workdir.REQUEST).symlink_to(elsewhere)
    side.serve()
    assert not (pod.work / workdir.RESULT).exists() and not (pod.work / workdir.REQUEST).exists()
    assert elsewhere.exists()


def test_thaw_exec_side_of_the_protocol(tmp_path: Path) -> None:
    """SidecarPublisher (thaw exec's side) against the sidecar command itself, as two processes."""
    pod = Pod(tmp_path)
    env = {
        **thaw_env(POD),
        "THAW_NAME": "qwen",
        "THAW_WORKLOAD": "w-qwen",
        "THAW_KEY": str(pod.keys / "signing.key"),
    }
    proc = subprocess.Popen(
        [*thaw_command(), "sidecar", "--work", str(pod.work), "--plan", str(pod.plan),
         "--cache", str(pod.cache), "--store", str(pod.store), "--state", str(pod.state),
         "--interval", "0.05"],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        publisher = SidecarPublisher(pod.work, answer_s=30, publish_s=60)
        dump = pod.dump()
        nbytes = sum(p.stat().st_size for p in dump.iterdir())
        assert publisher.room(nbytes) is None
        record = publisher.publish(dump, nbytes)
        assert record["status"] == "published" and record["bytes"] == nbytes, record
        assert publisher.publish(pod.dump(), 10)["status"] == "skipped"  # refused: once per pod
        # The workload's last word, written just before kubelet stops the sidecar: its last relay
        # on SIGTERM must carry it (no time given to a periodic one).
        workdir.write_json(pod.work / workdir.OUTCOME, {"result": "cold", "exit_code": 0})
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err  # SIGTERM: a clean exit
    assert orjson.loads(outcome_copy_path(pod.cache, UID).read_bytes())["exit_code"] == 0
    assert "will publish this pod's dump once" in err


def test_no_publisher_means_no_dump(tmp_path: Path) -> None:
    """thaw exec in a pod whose sidecar never answers: the room question times out with the reason."""
    publisher = SidecarPublisher(tmp_path, answer_s=0.5)
    why = publisher.room(1000)
    assert why is not None and "thaw-sidecar did not answer" in why


def test_an_unusable_registry_store_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    """The webhook mounts a registry's dockerconfigjson Secret as optional: where it is missing the
    mount is empty. The sidecar keeps running (a native sidecar that exits would hold the workload
    back), relays outcomes, and answers thaw exec with the reason."""
    pod = Pod(tmp_path)
    empty_secret = tmp_path / "registry-auth"
    empty_secret.mkdir()
    env = {
        **thaw_env(POD),
        "THAW_NAME": "qwen",
        "THAW_WORKLOAD": "w-qwen",
        "THAW_KEY": str(pod.keys / "signing.key"),
        "THAW_STORE": "oci://registry.example:5000/thaw",
        "THAW_REGISTRY_AUTH": str(empty_secret),
    }
    proc = subprocess.Popen(
        [*thaw_command(), "sidecar", "--work", str(pod.work), "--plan", str(pod.plan),
         "--cache", str(pod.cache), "--state", str(pod.state), "--interval", "0.05"],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        why = SidecarPublisher(pod.work, answer_s=30).room(1000)
        assert why is not None and why.startswith("store unusable:") and "dockerconfigjson" in why, why
        workdir.write_json(pod.work / workdir.OUTCOME, {"result": "cold", "exit_code": 0})
        deadline = time.monotonic() + 20
        while not outcome_copy_path(pod.cache, UID).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert outcome_copy_path(pod.cache, UID).exists(), err
