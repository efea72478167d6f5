"""Every "pod" the tests, the demo and the benchmarks start is a fresh container (issue 10.2): its
writable places are its own, what it shares with the caller is bound back, /proc/sys is read-only;
and thaw exec reaches its PID floor there without thousands of forks (issue 10.6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.needs import requires
from thaw.dev.sandbox import (
    REPO,
    THAW_CAPS,
    fresh_container_prefix,
    kept_entries,
    missing_prerequisites,
    paths_in,
    pod_env,
    with_caps,
    writable_places,
)

needs_root = requires(missing_prerequisites())


def test_writable_places_are_a_containers() -> None:
    assert writable_places({}) == ["/tmp", "/dev/shm", "/var/tmp"]
    assert writable_places({"HOME": "/root", "TMPDIR": "/var/tmp/app/"}) == [
        "/root", "/tmp", "/dev/shm", "/var/tmp", "/var/tmp/app",
    ]  # fmt: skip
    assert writable_places({"HOME": "/", "TMPDIR": "relative"}) == ["/tmp", "/dev/shm", "/var/tmp"]


def test_kept_entries_are_the_volumes_under_the_writable_places() -> None:
    places = ["/root", "/tmp", "/var/tmp", "/var/tmp/app"]
    paths = [
        "/tmp/pytest-of-root/pytest-3/t0/plan.json", "/tmp/pytest-of-root/x", "/root/.pyenv/versions/3.11",
        "/work/main", "/tmp", "/var/tmp/app/data/f", "/var/tmp/bench",
    ]  # fmt: skip
    assert kept_entries(paths, places) == [
        "/root/.pyenv", "/tmp/pytest-of-root", "/var/tmp/bench", "/var/tmp/app/data",
    ]  # fmt: skip


def test_paths_in_arguments_and_values() -> None:
    args = ["--store", "/tmp/s/store", "--ready=file:/tmp/s/ready", "http://127.0.0.1:80/x", "/a:/b/c", "rel"]
    assert paths_in(args) == ["/tmp/s/store", "/tmp/s/ready", "/a", "/b/c"]


def test_pod_env_is_a_containers_not_the_callers() -> None:
    env = pod_env(
        {"A": "1"}, base={"PATH": "/bin", "HOME": "/root", "PYTEST_CURRENT_TEST": "t", "THAW_X": "y"}
    )
    assert env == {"PATH": "/bin", "HOME": "/root", "PYTHONPATH": str(REPO), "A": "1"}


# What each pod does: report what it sees of the others, then leave its own marks.
PROBE = r"""
import json, os, sys
me, other, shared = sys.argv[1], sys.argv[2], sys.argv[3]
home = os.environ["HOME"]
places = ["/tmp", "/var/tmp", "/dev/shm", home, os.environ["TMPDIR"]]
seen = {p: os.path.exists(f"{p}/mark-{other}") for p in places}
for p in places:
    open(f"{p}/mark-{me}", "w").write(me)
open(f"{shared}/from-{me}", "w").write(me)
try:
    open("/proc/sys/kernel/ns_last_pid", "w").write("5000")
    sys_rw = True
except OSError:
    sys_rw = False
entries = {p: sorted(os.listdir(p)) for p in places}
print(json.dumps({"seen_other": seen, "entries": entries, "sys_rw": sys_rw}))
"""


def _in_pod(env: dict[str, str], shared: list[str], *cmd: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "unshare", "--pid", "--fork", "--mount-proc", *fresh_container_prefix(env, shared),
        *with_caps(THAW_CAPS), *cmd,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)


@needs_root
def test_one_pods_writes_are_never_seen_by_another_nor_the_host(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    env = pod_env({"TMPDIR": "/var/tmp/app-tmp"})
    runs = []
    for me, other in (("a", "b"), ("b", "a"), ("a", "b")):
        out = _in_pod(env, [str(volume)], sys.executable, "-c", PROBE, me, other, str(volume))
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout))
    for run in runs:
        assert not any(run["seen_other"].values()), run  # neither b's marks in a, nor a's in the next a
        assert run["sys_rw"] is False  # /proc/sys read-only, as runc mounts it
    # Each writable place held only this pod's mark (and, under HOME, the Python it runs from).
    for run, me in zip(runs, "aba", strict=True):
        for place, entries in run["entries"].items():
            assert [e for e in entries if e.startswith("mark-")] == [f"mark-{me}"]
            # Anything else there is a volume bound back from the host (the test's, the repository's),
            # or another writable place (TMPDIR under /var/tmp).
            others = [
                e for e in entries if not e.startswith("mark-") and f"{place}/{e}" not in run["entries"]
            ]
            assert all(Path(place, e).exists() for e in others), entries
        assert run["entries"]["/dev/shm"] == run["entries"]["/var/tmp/app-tmp"] == [f"mark-{me}"]
    for place in ("/tmp", "/var/tmp", "/dev/shm", os.environ.get("HOME", "/root"), "/var/tmp/app-tmp"):
        assert not Path(place, "mark-a").exists() and not Path(place, "mark-b").exists()
    # The volume is shared, as a volume is.
    assert sorted(p.name for p in volume.iterdir()) == ["from-a", "from-b"]


@needs_root
def test_pid_floor_in_a_container_without_thousands_of_forks() -> None:
    probe = (
        "import os, time\n"
        "from thaw.runtime.supervisor import advance_pid_counter\n"
        "t = time.monotonic(); how = advance_pid_counter(4096); took = time.monotonic() - t\n"
        "pid = os.fork()\n"
        "if pid == 0: os._exit(0)\n"
        "os.waitpid(pid, 0); print(how, '|', pid, '|', round(took, 3))\n"
    )
    out = _in_pod(pod_env(), [], sys.executable, "-c", probe)
    assert out.returncode == 0, out.stderr
    how, pid, _took = (s.strip() for s in out.stdout.split("|"))
    assert how.startswith("vfork children up to") and int(pid) >= 4096, out.stdout
    # Where /proc/sys is writable (no fresh container prefix), one write does it.
    plain = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", probe],
        capture_output=True, text=True, env=pod_env(), cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("ns_last_pid |") and int(plain.stdout.split("|")[1]) >= 4096
