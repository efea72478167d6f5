"""The pure parts of running CRIU and of ``thaw exec``: flags, log tails, refusals, readiness specs,
the CUDA binding's behaviour where there is no driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw.runtime import criu
from thaw.runtime.cuda import Cuda, CudaUnavailable
from thaw.runtime.execute import workload_command
from thaw.runtime.ready import ReadySpecError, parse_ready, probe
from thaw.runtime.restore import inherit_list, restore_timeout


def test_dump_flags_leave_server_running_and_close_tcp() -> None:
    args = criu.dump_args("criu", 4242, Path("/img"), Path("/work"), criu.CriuOptions(network_lock="skip"))
    assert args[:4] == ["criu", "dump", "-t", "4242"]
    assert "--leave-running" in args and "--tcp-close" in args and "--tcp-established" not in args
    assert args[args.index("--network-lock") + 1] == "skip"
    assert args[args.index("--ghost-limit") + 1] == str(criu.GHOST_LIMIT)
    assert "--manage-cgroups=ignore" in args and "--file-locks" in args and "--shell-job" not in args


def test_restore_flags_detach_and_rebind_stdio() -> None:
    opts = criu.CriuOptions(network_lock="nftables", tcp_established=True)
    args = criu.restore_args(
        "criu", Path("/img"), Path("/w"), opts, pidfile=Path("/w/pid"), inherit=[(5, "pipe:[77]")]
    )
    assert args[1] == "restore" and "--restore-detached" in args
    assert args[args.index("--pidfile") + 1] == "/w/pid"
    assert args[args.index("--inherit-fd") + 1] == "fd[5]:pipe:[77]"
    assert "--tcp-established" in args and "--tcp-close" not in args
    assert "-v3" in args  # never -v4 on restore: a stuck restorer floods the log
    assert "--network-lock" not in args  # the dump's method is recorded in the images


@pytest.mark.parametrize(
    ("iptables", "nft", "method"),
    [(True, True, "iptables"), (False, True, "nftables"), (False, False, "skip")],
)
def test_network_lock_method(iptables: bool, nft: bool, method: str) -> None:
    assert criu.network_lock_method(iptables, nft) == method


def test_log_tail_keeps_the_error_lines() -> None:
    log = "\n".join(
        [f"(00.0{i}) info line {i}" for i in range(50)]
        + ["(01.0) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1", "(01.1) Dumping FAILED."]
    )
    tail = criu.log_tail(log)
    assert "Can't lookup mount=27" in tail and "info line" not in tail
    assert criu.log_tail("just\nsome\nlines") == "just | some | lines"


def test_pid_busy_is_recognised() -> None:
    assert criu.pid_file_busy("Error (criu/cr-restore.c:1480): Can't fork for 4096: File exists")
    assert not criu.pid_file_busy("Error: Can't read pages: Input/output error")


def test_io_uring_is_refused_with_a_clear_reason() -> None:
    fds = {4096: {0: "/dev/null", 7: "anon_inode:[io_uring]"}, 4097: {1: "pipe:[12]"}}
    [reason] = criu.undumpable_reasons(fds)
    assert "4096" in reason and "io_uring" in reason and "fd 7" in reason
    assert criu.undumpable_reasons({1: {0: "/dev/null"}}) == []
    assert criu.device_fds({5: {9: "/dev/nvidiactl", 1: "pipe:[3]"}}) == ["process 5 fd 9 -> /dev/nvidiactl"]


def test_find_criu_order(tmp_path: Path) -> None:
    exe = tmp_path / "criu"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert criu.find_criu({"THAW_CRIU": str(exe), "PATH": ""}) == str(exe)
    assert criu.find_criu({"PATH": str(tmp_path)}) == str(exe)
    with pytest.raises(criu.CriuMissing, match="not an executable"):
        criu.find_criu({"THAW_CRIU": str(tmp_path / "nope"), "PATH": ""})


def test_inherit_list_rebinds_pipes_once() -> None:
    fds = {1: 10, 2: 11}
    assert inherit_list({"1": "pipe:[5]", "2": "pipe:[5]"}, fds) == [(10, "pipe:[5]")]
    assert inherit_list({"1": "pipe:[5]", "2": "socket:[6]"}, fds) == [(10, "pipe:[5]"), (11, "socket:[6]")]
    # Files, terminals, /dev/null: tests/runtime/test_pod_files_logic.py


def test_restore_timeout_grows_with_the_image() -> None:
    assert restore_timeout(0) == pytest.approx(10.0)
    assert restore_timeout(10_000_000_000) == pytest.approx(110.0)


def test_workload_command() -> None:
    from thaw.errors import UsageError

    assert workload_command(["--", "python3", "-m", "x"]) == ["python3", "-m", "x"]
    assert workload_command(["python3"]) == ["python3"]
    with pytest.raises(UsageError):
        workload_command(["--"])


@pytest.mark.parametrize(
    ("value", "kind", "target", "port"),
    [
        ("http://127.0.0.1:8000/health", "http", "http://127.0.0.1:8000/health", 0),
        ("tcp:8000", "tcp", "127.0.0.1", 8000),
        ("tcp:10.0.0.1:81", "tcp", "10.0.0.1", 81),
        ("file:/tmp/ready", "file", "/tmp/ready", 0),
    ],
)
def test_parse_ready(value: str, kind: str, target: str, port: int) -> None:
    spec = parse_ready(value)
    assert (spec.kind, spec.target, spec.port) == (kind, target, port)


@pytest.mark.parametrize("value", ["", "8000", "tcp:", "tcp:99999", "file:", "ftp://x"])
def test_parse_ready_refuses(value: str) -> None:
    with pytest.raises(ReadySpecError, match=r"allowed|port"):
        parse_ready(value)


def test_probe_file_and_closed_port(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    assert probe(parse_ready(f"file:{flag}")) is not None
    flag.touch()
    assert probe(parse_ready(f"file:{flag}")) is None
    assert probe(parse_ready("tcp:1"), timeout=0.5) is not None


def test_cuda_unavailable_without_libcuda() -> None:
    with pytest.raises(CudaUnavailable, match="cannot load"):
        Cuda.load("libcuda-that-does-not-exist.so.1")


def test_unprivileged_mode_without_sys_admin() -> None:
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"
    assert criu.effective_caps(status) == 0x1FFFFFFFFFF
    assert criu.mode_flags(0x1FFFFFFFFFF) == ()
    # CHECKPOINT_RESTORE (40) + SYS_PTRACE (19) + the runtime's defaults, no SYS_ADMIN (21)
    assert criu.mode_flags((1 << 40) | (1 << 19) | 0xA80425FB) == ("--unprivileged",)
    assert criu.effective_caps("no caps line") == 0


def test_exit_note_names_the_signal_of_a_root_that_died() -> None:
    from thaw.runtime.supervisor import exit_note

    assert exit_note(None) == ""
    assert exit_note(3) == " (exit status 3)"
    assert exit_note(132) == " (exit status 132: SIGILL)"
    assert exit_note(200) == " (exit status 200)"
