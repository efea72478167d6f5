"""``thaw exec`` as a process supervisor, without CRIU: exit status, signal forwarding, orphans
reaped, usage errors, the outcome file, and a checkpoint that fails without stopping the server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.needs import requires, root
from tests.runtime.pods import (
    REPO,
    STATE_SERVER,
    in_cgroup,
    memory_cgroup,
    read_json,
    thaw_command,
    thaw_env,
    wait_for,
)


def _exec(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*thaw_command(), "exec", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=thaw_env(env),
    )


def test_exit_status_is_the_workloads(tmp_path: Path) -> None:
    p = _exec("--outcome", str(tmp_path / "o.json"), "--", "sh", "-c", "echo hi; exit 7")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 7 and "hi" in out
    outcome = read_json(tmp_path / "o.json")
    assert outcome["result"] == "cold" and outcome["exit_code"] == 7


def test_outcome_names_the_pod_from_the_injected_env(tmp_path: Path) -> None:
    env = {
        "THAW_POD_NAME": "qwen-0",
        "THAW_POD_NAMESPACE": "llm-serving",
        "THAW_NODE_NAME": "gpu-a",
        "THAW_CONTAINER": "vllm",
    }
    p = _exec("--outcome", str(tmp_path / "o.json"), "--", "true", env=env)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0
    pod = read_json(tmp_path / "o.json")["pod"]
    assert pod == {"name": "qwen-0", "namespace": "llm-serving", "node": "gpu-a", "container": "vllm"}
    assert "namespace=llm-serving" in err


def test_sigterm_is_forwarded(tmp_path: Path) -> None:
    flag = tmp_path / "started"
    script = f"trap 'echo got-term; exit 3' TERM; touch {flag}; while :; do sleep 0.1; done"
    p = _exec("--", "sh", "-c", script)
    wait_for(flag.exists, 20, "the workload to start")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 3 and "got-term" in out


# A child subreaper that never reaps anything but its one child: an orphan handed up to it stays
# a zombie, which it reports once its child has exited (this machine's PID 1, or pytest, might reap
# it and hide who should have).
SUBREAPER = """
import ctypes, json, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("cannot become a child subreaper")
code = subprocess.Popen(sys.argv[2:]).wait()  # waitpid on that child alone
try:
    with open(f"/proc/{int(open(sys.argv[1]).read())}/stat") as f:
        state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
except FileNotFoundError:
    state, ppid = "gone", "0"
print(json.dumps({"code": code, "orphan": state, "ours": int(ppid) == os.getpid()}))
"""


def _orphan_left_behind(tmp_path: Path, runner: list[str]) -> dict[str, Any]:
    """Run a workload that leaves a grandchild behind (it exits at once) under ``runner``, inside
    SUBREAPER: what became of the orphan. The workload waits up to 4 s for it to be reaped."""
    pidfile = tmp_path / "orphan.pid"
    script = (
        f"(sleep 0.2 & echo $! > {pidfile}); o=$(cat {pidfile}); i=0; "
        "while kill -0 $o 2>/dev/null && [ $i -lt 80 ]; do sleep 0.05; i=$((i+1)); done; exit 5"
    )
    out = subprocess.run(
        [sys.executable, "-c", SUBREAPER, str(pidfile), *runner, "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env=thaw_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_orphans_are_reaped(tmp_path: Path) -> None:
    """The workload leaves a grandchild behind; thaw exec (a child subreaper, as PID 1 would be)
    reaps it rather than leaving a zombie, and still exits with the workload's status. The control
    first: without thaw exec, the orphan is a zombie of the subreaper above, so the check can fail."""
    control = _orphan_left_behind(tmp_path, [])
    assert control == {"code": 5, "orphan": "Z", "ours": True}, control
    under_thaw = _orphan_left_behind(tmp_path, [*thaw_command(), "exec", "--"])
    assert under_thaw == {"code": 5, "orphan": "gone", "ours": False}, under_thaw


def test_usage_errors() -> None:
    p = _exec("--")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "no workload command" in err
    # Run by hand with --store: the snapshot's name and workload must be given.
    p = _exec("--checkpoint", "on-ready", "--ready", "tcp:8000", "--store", "/s", "--", "true")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "--name" in err and "--workload" in err
    p = _exec(
        "--checkpoint",
        "on-ready",
        "--ready",
        "gopher://x",
        "--store",
        "/s",
        "--name",
        "n",
        "--workload",
        "w",
        "--",
        "true",
    )
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "not allowed" in err
    ckpt = ["--checkpoint", "on-ready", "--store", "/s", "--name", "n", "--workload", "w"]
    for hooks, words in (
        (["--ready", "tcp:8000", "--sleep", "/sleep"], "--sleep needs --wake too"),
        (["--ready", "tcp:8000", "--sleep", "/sleep", "--wake", "/wake"], "--sleep='/sleep' is a path"),
    ):
        p = _exec(*ckpt, *hooks, "--", "true")
        _, err = p.communicate(timeout=30)
        assert p.returncode == 2 and words in err, err


def test_no_readiness_check_runs_the_workload_without_a_checkpoint(tmp_path: Path) -> None:
    """A pod without an HTTP or TCP readinessProbe gets THAW_CHECKPOINT=on-ready and no THAW_READY:
    the workload starts and runs; the outcome says why there is no checkpoint (it used to exit 2
    before starting the workload, and the pod crash-looped)."""
    flag = tmp_path / "ran"
    p = _exec(
        "--checkpoint", "on-ready", "--work", str(tmp_path), "--", "sh", "-c", f"touch {flag}; exit 0",
        env={"THAW_CHECKPOINT": "on-ready"},
    )  # fmt: skip
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert flag.exists()
    outcome = read_json(tmp_path / "outcome.json")
    assert outcome["result"] == "cold" and outcome["exit_code"] == 0
    ck = outcome["checkpoint"]
    assert ck["status"] == "skipped" and "no readiness check" in ck["reason"] and "THAW_READY" in ck["reason"]
    assert (tmp_path / "ready").exists()  # nothing of Thaw holds a cold start's readiness back
    assert not (tmp_path / "dump").exists() and not (tmp_path / "checkpoint.inprogress").exists()


def test_missing_plan_is_a_cold_start(tmp_path: Path) -> None:
    p = _exec("--plan", str(tmp_path / "plan.json"), "--", "true")
    p.communicate(timeout=30)
    assert p.returncode == 0
    outcome = read_json(tmp_path / "outcome.json")
    assert outcome["result"] == "cold" and "no restore plan" in outcome["reason"]


def test_failed_checkpoint_keeps_the_server_running(tmp_path: Path) -> None:
    port = 8173
    p = _exec(
        "--checkpoint", "on-ready", "--ready", f"tcp:{port}", "--store", str(tmp_path / "store"),
        "--name", "n", "--workload", "w", "--outcome", str(tmp_path / "o.json"), "--pid-floor", "0",
        "--", "python3", str(STATE_SERVER), str(port),
        env={"THAW_CRIU": str(tmp_path / "no-criu")},
    )  # fmt: skip
    try:
        ck = wait_for(
            lambda: (
                (c := read_json(tmp_path / "o.json").get("checkpoint", {})).get("status") == "failed" and c
            ),
            30,
            "the checkpoint to fail",
        )
        assert "no-criu" in ck["reason"]
        assert p.poll() is None  # the server still runs, and answers:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=5) as r:
            assert b'"counter": 0' in r.read()
    finally:
        p.terminate()
        p.communicate(timeout=20)


# The CUDA checkpoint cannot run here (no GPU): this starts thaw exec with dump() replaced by one
# that fails as the driver did on 2x H200 when NCCL's cuMem and shared-memory transports were both
# on (bench/gpu/results/h200x2-tp2-probes-2026-11-28.*): after CRIU's dump, the CUDA restore fails.
# Each call to dump() adds a line to $DUMP_CALLS.
BROKEN_DUMP = """
import os, sys
import thaw.runtime.checkpoint as c
from thaw.cli import main

def dump(*_args, **_kw):
    with open(os.environ["DUMP_CALLS"], "a") as f:
        f.write("dump\\n")
    raise c.WorkloadBroken("the CUDA state could not be put back after the checkpoint: "
                           "cuCheckpointProcessRestore(pid 4128) failed: CUDA_ERROR_NOT_SUPPORTED (801)")

c.dump = dump
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_that_breaks_the_workload_stops_it_once(tmp_path: Path) -> None:
    port = 8174
    outcome = tmp_path / "o.json"
    argv = [
        sys.executable, "-c", BROKEN_DUMP, "exec", "--checkpoint", "on-ready", "--ready", f"tcp:{port}",
        "--store", str(tmp_path / "store"), "--name", "n", "--workload", "w", "--outcome", str(outcome),
        "--pid-floor", "0", "--", "python3", str(STATE_SERVER), str(port),
    ]  # fmt: skip
    calls = tmp_path / "dump-calls"
    env = thaw_env({"DUMP_CALLS": str(calls)})
    # First run: the server is stopped (not left frozen) and thaw exec exits non-zero, so the
    # container restarts.
    first = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
    assert first.returncode != 0
    ck = read_json(outcome)["checkpoint"]
    assert ck["status"] == "failed" and ck["stopped_workload"] is True
    assert "CUDA_ERROR_NOT_SUPPORTED" in ck["reason"] and "stopping it" in first.stderr
    assert calls.read_text() == "dump\n"
    # The restart (same pod, same emptyDir): a cold start that serves and does not checkpoint again.
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        wait_for(lambda: _answers(port), 30, "the restarted server to answer")
        assert p.poll() is None
        ck = read_json(outcome)["checkpoint"]
        assert ck["status"] == "skipped" and ck["stopped_workload"] is True
        assert ck["reason"].startswith("an earlier checkpoint in this pod had to stop the workload: ")
        assert "CUDA_ERROR_NOT_SUPPORTED" in ck["first_reason"]
    finally:
        p.terminate()
        _, err = p.communicate(timeout=20)
    assert "no checkpoint in this pod" in err and "delete the pod to try again" in err
    # A checkpoint tried again would have run before the server was stopped (thaw exec waits for
    # ready, then dumps, before it goes back to supervising) and left its mark: a second dump()
    # call, or a later record ("waiting for ready", "failed") in place of the restart's first one.
    assert calls.read_text() == "dump\n"
    assert read_json(outcome)["checkpoint"] == ck


def _answers(port: int) -> bool:
    """The stand-in server on ``port`` answers its state."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=2) as r:
            return b"counter" in r.read()
    except OSError:
        return False


def _checkpoint_record(work: Path, status: str, timeout: float, what: str) -> dict[str, Any]:
    """The outcome's checkpoint record once its status is ``status``."""
    record: dict[str, Any] = wait_for(
        lambda: (c := read_json(work / "outcome.json").get("checkpoint", {})).get("status") == status and c,
        timeout,
        what,
    )
    return record


class _BlockingHooks:
    """A sleep hook that never answers until released (a checkpoint stuck where a kill would find
    it), and a wake hook; counts the sleep calls."""

    def __init__(self, port: int) -> None:
        import http.server
        import threading

        self.release = threading.Event()
        self.entered = threading.Event()
        self.sleeps = 0
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path == "/sleep":
                    hooks.sleeps += 1
                    hooks.entered.set()
                    hooks.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _kill_tree(pid: int) -> None:
    from thaw.runtime.criu import tree

    for p in [pid, *tree(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_a_checkpoint_killed_midway_is_not_tried_again(tmp_path: Path) -> None:
    """The container is killed during its checkpoint (out of memory, evicted): the restart finds
    the in-progress marker, records "skipped" with the reason, deletes the dead dump, and serves
    without checkpointing again (issue 11.6: a loop that adds a dump every round)."""
    port, hook_port = 8175, 8176
    work = tmp_path / "work"
    hooks = _BlockingHooks(hook_port)
    argv = [
        "--checkpoint", "on-ready", "--ready", f"tcp:{port}", "--store", str(tmp_path / "store"),
        "--name", "n", "--workload", "w", "--work", str(work), "--pid-floor", "0",
        "--sleep", f"http://127.0.0.1:{hook_port}/sleep", "--wake", f"http://127.0.0.1:{hook_port}/wake",
        "--", "python3", str(STATE_SERVER), str(port),
    ]  # fmt: skip
    env = {"THAW_CRIU": "/bin/true"}  # killed before CRIU would run
    first = _exec(*argv, env=env)
    try:
        assert hooks.entered.wait(60), "the checkpoint never reached its sleep hook"
        assert (work / "checkpoint.inprogress").is_file() and (work / "dump").is_dir()
        _kill_tree(first.pid)
        first.communicate(timeout=20)
        hooks.release.set()
        second = _exec(*argv, env=env)
        try:
            ck = _checkpoint_record(work, "skipped", 30, "the restart's checkpoint record")
            assert "did not finish" in ck["reason"] and "not tried again" in ck["reason"]
            assert not (work / "dump").exists()  # the dead dump is gone
            assert (work / "checkpoint.inprogress").is_file()  # and a later restart skips too
            wait_for(lambda: _answers(port), 30, "the restarted server to answer")
            assert second.poll() is None
        finally:
            second.terminate()
            second.communicate(timeout=20)
        # Tried again, the checkpoint would have called the sleep hook before the server was
        # stopped, or left a later record than the restart's first one ("waiting for ready").
        assert hooks.sleeps == 1
        assert read_json(work / "outcome.json")["checkpoint"] == ck
    finally:
        _kill_tree(first.pid)
        hooks.close()


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@requires(root("mounts a tmpfs"))
def test_no_checkpoint_when_the_work_directory_cannot_take_the_dump(tmp_path: Path) -> None:
    port = 8177
    work = tmp_path / "work"
    _tmpfs(work, "16m")  # an emptyDir with a sizeLimit smaller than the server's memory
    try:
        p = _exec(
            "--checkpoint", "on-ready", "--ready", f"tcp:{port}", "--store", str(tmp_path / "store"),
            "--name", "n", "--workload", "w", "--work", str(work), "--pid-floor", "0",
            "--", "python3", str(STATE_SERVER), str(port), "--mem-mb", "48",
        )  # fmt: skip
        try:
            ck = _checkpoint_record(work, "skipped", 60, "the refused checkpoint")
            assert ck["reason"].startswith("not enough room for the dump: it needs about ")
            assert str(work) in ck["reason"] and ck["estimated_bytes"] > 48 << 20
            assert not (work / "checkpoint.inprogress").exists() and not (work / "dump").exists()
            assert p.poll() is None  # the server goes on
        finally:
            p.terminate()
            p.communicate(timeout=20)
    finally:
        subprocess.run(["umount", str(work)], check=False)


@requires(root("makes a cgroup and mounts a tmpfs"))
def test_no_checkpoint_when_the_memory_limit_cannot_take_it(tmp_path: Path) -> None:
    """The dump goes to a work directory in memory (an emptyDir with medium: Memory): it counts
    against the container's memory limit, which cannot take it. Refused before the dump, with the
    numbers, instead of an OOM kill mid-checkpoint (the same check covers the CUDA checkpoint's host
    copy of GPU memory)."""
    port = 8178
    work = tmp_path / "work"
    with memory_cgroup(600 << 20) as cgroup:
        _tmpfs(work, "2g")  # room enough on the filesystem: the limit is memory
        try:
            p = subprocess.Popen(
                [*in_cgroup(cgroup), *thaw_command(), "exec",
                 "--checkpoint", "on-ready", "--ready", f"tcp:{port}", "--store", str(tmp_path / "store"),
                 "--name", "n", "--workload", "w", "--work", str(work), "--pid-floor", "0",
                 "--", "python3", str(STATE_SERVER), str(port), "--mem-mb", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                env=thaw_env(),
            )  # fmt: skip
            try:
                ck = _checkpoint_record(work, "skipped", 60, "the refused checkpoint")
                assert ck["reason"].startswith("the container's memory limit cannot take the checkpoint: ")
                assert "which is in memory" in ck["reason"] and "limit of 0.6 GiB" in ck["reason"]
                assert p.poll() is None
            finally:
                p.terminate()
                p.communicate(timeout=20)
        finally:
            subprocess.run(["umount", str(work)], check=False)
