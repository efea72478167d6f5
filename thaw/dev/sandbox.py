"""A pod's sandbox on one machine, for ``thaw demo``, the CRIU tests and bench/runtime_cpu.py: a fresh
network namespace (``ip netns``) and a fresh PID and mount namespace (``unshare --pid --fork
--mount-proc``) in which ``thaw exec`` is PID 1, as in a container, with a container runtime's default
capabilities plus what the webhook grants (``with_caps``).

Restoring in a fresh network namespace is what a new pod does, and it avoids the old listener's
TIME_WAIT connections, which block the port in the same namespace for a minute.

Each pod is a fresh container (issue 10.2; :func:`fresh_container_prefix`, which bench/gpu/harness.py
uses too): its writable places (``/tmp``, ``/var/tmp``, ``$HOME``, ``/dev/shm``, ``$TMPDIR``) are new
empty tmpfs mounts in its own mount namespace, ``/proc/sys`` is read-only as runc mounts it, its
environment is a container's (a few variables plus what the caller gives, not the test runner's),
and its stdout/stderr is a pipe. The directories it shares with the caller (the repository, the
Python installation, the test's store, plans and outcome files: the pod's volumes) are bound back
at the same paths. One pod's writes to its writable places are never seen by another pod, nor by
the host. Where a caller knows the pod's volumes exactly (``thaw demo``: the webhook's mounts),
``hide`` puts an empty tmpfs over the directories that hold them (the node's state, other pods') and
``binds`` puts back only the pod's own volumes, each read-only or not as its volumeMount says.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from thaw.runtime import podfiles, workdir

REPO = Path(__file__).resolve().parents[2]
# The stand-in server (plain stdlib, run as a file so any python3 in a pod can run it).
STANDIN = Path(__file__).resolve().parent / "standin.py"
T = TypeVar("T")
# How the tests, the demo and the benchmarks run this checkout's CLI (this Python, -m thaw): the
# runtime's own answer to "how do I run myself", which is a bundle's wrapper only inside a bundle.
thaw_command = podfiles.thaw_command


# What a container runtime grants by default (containerd's and Docker's default set), and what the
# webhook adds for CRIU (docs/webhook.md, step 6). Without SYS_ADMIN, thaw exec runs CRIU
# --unprivileged; with full root CRIU would instead need SYS_ADMIN, NET_ADMIN and SYS_TIME
# (measured, thaw/runtime/criu.py).
RUNTIME_DEFAULT_CAPS = (
    "chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid",
    "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill", "audit_write",
)  # fmt: skip
THAW_CAPS: tuple[str, ...] = ("checkpoint_restore", "sys_ptrace")


def with_caps(caps: tuple[str, ...] | list[str]) -> list[str]:
    """A command prefix that runs as root with only ``caps`` (plus the runtime defaults)."""
    keep = ",".join(f"+{c}" for c in (*RUNTIME_DEFAULT_CAPS, *caps))
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--"]


# --- a fresh container's writable places (issue 10.2) -----------------------------------------

# What a container's environment holds before its spec adds anything (the rest of the caller's
# environment, e.g. pytest's PYTEST_CURRENT_TEST, is not a container's and would differ per pod).
POD_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
FIXED_PLACES = ("/tmp", "/var/tmp", "/dev/shm")
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18,
)  # fmt: skip
_PATH_IN_ARG = re.compile(r"(?:^|[=:,])(/[^\s:=,]*)")


def pod_env(env: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A pod's environment: ``POD_BASE_ENV`` from ``base`` (default: ours), the repository on
    PYTHONPATH, then ``env``."""
    base = os.environ if base is None else base
    kept = {k: base[k] for k in POD_BASE_ENV if k in base}
    return {**kept, "PYTHONPATH": str(REPO), **(env or {})}


def writable_places(env: Mapping[str, str]) -> list[str]:
    """The places a container can write on its root filesystem, each a fresh tmpfs in a pod (pure):
    /tmp, /var/tmp, /dev/shm, and ``$HOME`` and ``$TMPDIR`` when set (not ``/``), parents first."""
    places = set(FIXED_PLACES)
    for var in ("HOME", "TMPDIR"):
        value = os.path.normpath(env.get(var) or "/")
        if value != "/" and value.startswith("/"):
            places.add(value)
    return sorted(places, key=lambda p: (p.count("/"), p))


def paths_in(args: Iterable[str]) -> list[str]:
    """Absolute paths named in command-line arguments or environment values: ``/x``, ``--f=/x``,
    ``file:/x``, ``A:/x`` lists (pure)."""
    found = (m.group(1) for a in args for m in _PATH_IN_ARG.finditer(a))
    return [os.path.normpath(p) for p in found if p != "/" and not p.startswith("//")]  # not URLs


def kept_entries(paths: Iterable[str | Path], places: Iterable[str]) -> list[str]:
    """What a pod shares with its caller under its writable places (pure): for every path strictly
    under a place, the place's entry that holds it (``/tmp/pytest-of-root/…/plan.json`` keeps
    ``/tmp/pytest-of-root``), as a volume would be; the deepest place wins, parents come first."""
    ordered = sorted(places, key=lambda p: -p.count("/"))
    keep: set[str] = set()
    for raw in paths:
        path = os.path.normpath(str(raw))
        for place in ordered:
            if path.startswith(place.rstrip("/") + "/"):
                first = path[len(place.rstrip("/")) + 1 :].split("/", 1)[0]
                keep.add(f"{place.rstrip('/')}/{first}")
                break
    return sorted(keep, key=lambda p: (p.count("/"), p))


def fresh_container_prefix(
    env: Mapping[str, str],
    shared: Iterable[str | Path] = (),
    *,
    hide: Iterable[str | Path] = (),
    binds: Iterable[tuple[str | Path, bool]] = (),
) -> list[str]:
    """The argv prefix that makes the rest of a pod's command run in a fresh container (module doc):
    run it inside the pod's own mount namespace (after ``unshare --mount``/``--mount-proc``), before
    capabilities are dropped. ``env`` is the pod's environment (its HOME and TMPDIR); ``shared``
    the paths the pod uses from its caller (volumes): the repository and this Python are added.
    ``hide``: directories covered by an empty tmpfs; ``binds``: (path, read-only) put back at the
    same path afterwards (a pod's volumes inside hidden directories)."""
    places = writable_places(env)
    shared_paths = [
        *map(str, shared),
        str(REPO),
        sys.prefix,
        sys.base_prefix,
        os.path.realpath(sys.executable),
    ]
    spec = {
        "places": places,
        "keep": kept_entries(shared_paths, places),
        "hide": [os.path.normpath(str(h)) for h in hide],
        # parents first: a volume inside another one is bound after it
        "binds": [
            [p, ro] for p, ro in sorted(((os.path.normpath(str(p)), ro) for p, ro in binds), key=_depth)
        ],
    }
    return [sys.executable, "-m", "thaw.dev.sandbox", "fresh", json.dumps(spec), "--"]


def _depth(bind: tuple[str, bool]) -> int:
    return bind[0].count("/")


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _mount(
    libc: Any, target: str, *, source: str | None = None, fstype: str | None = None, flags: int = 0,
    data: str | None = None,
) -> None:  # fmt: skip
    if libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def fresh_main(spec_json: str, cmd: list[str]) -> int:
    """``python -m thaw.dev.sandbox fresh SPEC -- CMD``: a tmpfs over each writable place (with the
    original directory's mode and owner), the kept entries bound back from under them, /proc/sys
    read-only; then exec CMD. Must run in a mount namespace of its own."""
    spec = json.loads(spec_json)
    libc = ctypes.CDLL(None, use_errno=True)
    _mount(libc, "/", flags=_MS_REC | _MS_PRIVATE)  # nothing of this leaks to the host
    # Hold every kept entry before the tmpfs hides it; bind it back through /proc/self/fd.
    held = [(k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for k in spec["keep"] if os.path.lexists(k)]
    for place in spec["places"]:
        try:
            st = os.stat(place)
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
        except FileNotFoundError:
            os.makedirs(place, mode=0o755)
            mode, uid, gid = 0o755, os.getuid(), os.getgid()
        _mount(
            libc,
            place,
            source="tmpfs",
            fstype="tmpfs",
            flags=_MS_NOSUID | _MS_NODEV,
            data=f"mode={mode:o},uid={uid},gid={gid}",
        )
    for path, fd in held:
        _bind_back(libc, path, fd)
    # The pod's volumes, held before their directories are hidden, then bound back (read-only ones
    # remounted read-only: a bind mount takes the flag only on a remount).
    volumes = [(p, ro, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p, ro in spec.get("binds", [])]
    for hidden in spec.get("hide", []):
        _mount(libc, hidden, source="tmpfs", fstype="tmpfs", flags=_MS_NOSUID | _MS_NODEV, data="mode=755")
    for path, read_only, fd in volumes:
        _bind_back(libc, path, fd)
        if read_only:
            _mount(libc, path, flags=_MS_REMOUNT | _MS_BIND | _MS_RDONLY)
    _mount(libc, "/proc/sys", source="/proc/sys", flags=_MS_BIND | _MS_REC)
    _mount(libc, "/proc/sys", flags=_MS_REMOUNT | _MS_BIND | _MS_RDONLY)
    os.execvp(cmd[0], cmd)


def _bind_back(libc: Any, path: str, fd: int) -> None:
    """Bind what ``fd`` (an O_PATH descriptor) names at ``path``, making the mount point if needed."""
    if not os.path.lexists(path):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    _mount(libc, path, source=f"/proc/self/fd/{fd}", flags=_MS_BIND | _MS_REC)
    os.close(fd)


def missing_prerequisites() -> str | None:
    """Why the real-CRIU tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (CRIU, network and PID namespaces)"
    for tool in ("ip", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    try:
        from thaw.runtime.criu import find_criu

        find_criu()
    except Exception as exc:
        return f"needs CRIU ({exc}); run `make criu`"
    return None


class Netns:
    def __init__(self, prefix: str = "thaw") -> None:
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def http(self, method: str, url: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """One HTTP request from inside the namespace; the JSON answer, or None if it failed."""
        code = (
            "import sys, urllib.request as u\n"
            "r = u.Request(sys.argv[2], data=b'' if sys.argv[1] == 'POST' else None, method=sys.argv[1])\n"
            "print(u.urlopen(r, timeout=float(sys.argv[3])).read().decode())\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code, method, url, str(timeout)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + 10,
        )
        if out.returncode != 0:
            return None
        value: dict[str, Any] = json.loads(out.stdout)
        return value


class Pod:
    """``thaw exec`` as PID 1 of a fresh container (module doc); its stdout/stderr is a pipe, as a
    container's is, unless ``stdout`` gives another file descriptor for both (a file, /dev/null, a
    terminal opened by the caller, outside the pod), or ``stdout_file`` names a file the pod opens
    itself (``sh -c 'thaw exec … >FILE 2>&1'`` in the container): what a wrapper may be given."""

    def __init__(
        self,
        netns: Netns,
        thaw_args: list[str],
        cmd: list[str],
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        *,
        stdout: int | None = None,
        stdout_file: str | None = None,
        volumes: Iterable[str | Path] = (),
        thaw: Sequence[str] | None = None,
        hide: Iterable[str | Path] = (),
        binds: Iterable[tuple[str | Path, bool]] = (),
    ):
        self.netns = netns
        self.started = time.monotonic()
        full_env = pod_env(env)
        argv = [
            "ip", "netns", "exec", netns.name,
            *pod_command(thaw_args, cmd, full_env, volumes=volumes, wrap=wrap or (), thaw=thaw, hide=hide,
                         binds=binds, stdout_file=stdout_file),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        if self.proc.stdout is None:  # stdout is the caller's file, not a pipe: nothing to read here
            return
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def thaw_pid(self) -> int | None:
        """thaw exec's PID as seen from here (the child of unshare, PID 1 inside)."""
        from thaw.runtime.criu import children

        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to thaw exec, as kubelet stops a container; unshare returns its exit status."""
        code = stop_pod(self.proc, timeout)
        self._reader.join(2)
        return code


def pod_command(
    thaw_args: Sequence[str],
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    volumes: Iterable[str | Path] = (),
    wrap: Sequence[str] = (),
    thaw: Sequence[str] | None = None,
    before: Sequence[str] = (),
    hide: Iterable[str | Path] = (),
    binds: Iterable[tuple[str | Path, bool]] = (),
    stdout_file: str | None = None,
) -> list[str]:
    """The argv of a pod (module doc), for :class:`Pod` and bench/gpu/harness.py: ``thaw exec`` (this
    checkout's, or the ``thaw`` given: a bundle's) as PID 1 of new PID and mount namespaces, in a
    fresh container for ``env`` whose shared paths are those its arguments and environment name plus
    ``volumes`` (``hide``, ``binds``: :func:`fresh_container_prefix`), then ``before`` (a further
    prefix inside the pod's mount namespace) and ``wrap`` (its capabilities: :func:`with_caps`).
    ``stdout_file``: a file the pod opens itself for its output. Run it in the pod's network
    namespace."""
    binds = list(binds)
    shared = [
        *paths_in([*thaw_args, *cmd, *env.values(), stdout_file or ""]),
        *map(str, volumes),
        *(str(p) for p, _ in binds),
    ]
    redirect = ["sh", "-c", 'f=$1; shift; exec "$@" >"$f" 2>&1', "sh", stdout_file] if stdout_file else []
    return [
        "unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM",
        *fresh_container_prefix(env, shared, hide=hide, binds=binds), *before, *wrap, *redirect,
        *(thaw if thaw is not None else thaw_command()), "exec", *thaw_args, "--", *cmd,
    ]  # fmt: skip


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0, pid: int | None = None) -> int | None:
    """Stop a process as kubelet stops a container: SIGTERM (to ``pid`` when given, else ``proc``),
    SIGKILL to ``proc`` after ``timeout``; its exit status."""
    if proc.poll() is None:
        os.kill(pid if pid is not None else proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def stop_pod(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """Stop a pod started from :func:`pod_command`: SIGTERM to ``thaw exec`` (unshare's child, PID 1
    inside; unshare itself while it has none), SIGKILL after ``timeout``; unshare's exit status."""
    from thaw.runtime.criu import children

    kids = children(proc.pid) if proc.poll() is None else []
    return stop(proc, timeout, kids[0] if kids else None)


def wait_for(
    check: Callable[[], T | Literal[False] | None],
    timeout: float,
    what: str,
    pod: Pod | None = None,
    *,
    interval: float = 0.1,
    explain: Callable[[], str] | None = None,
) -> T:
    """The first truthy ``check()`` within ``timeout`` seconds; else AssertionError naming ``what``,
    with the pod's output or what ``explain()`` says about the state of things. The one wait of the
    tests, the demo and the benchmarks."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    tail = f"; thaw exec's output:\n{pod.output[-4000:]}" if pod is not None else ""
    tail += f":\n{explain()}" if explain is not None else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (read as thaw reads it: bounded, an object), or {} while the file
    does not exist yet: every writer of such a file replaces it whole, so a reader that polls sees
    nothing or all of it. Anything else wrong with it raises (``workdir.Unreadable``), never an
    empty answer that would read as "not yet"."""
    try:
        return workdir.read_json(path)
    except FileNotFoundError:
        return {}


def write_facts(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {"arch": "x86_64", "kernel": os.uname().release, "gpu": {"product": "none", "count": 0},
             "driver": "none", "criu": "4.2.1"}
        )
    )  # fmt: skip
    return path


def thaw_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: ours without THAW_* (a flag's fallback comes from the caller, never
    from the environment the tests happen to run in), the repository on PYTHONPATH, then ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    return {**base, "PYTHONPATH": str(REPO), **(env or {})}


def thaw_cli(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    thaw: Sequence[str] | None = None,
    wrap: Sequence[str] = (),
    check: bool = False,
    timeout: float = 300,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``thaw ARGS`` (this checkout's, or the ``thaw`` given: a bundle's) run to its end with its
    output captured, in :func:`thaw_env` plus ``env``, after the ``wrap`` prefix (capabilities)."""
    return subprocess.run(
        [*wrap, *(thaw if thaw is not None else thaw_command()), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        check=check,
        env=thaw_env(env),
        cwd=REPO,
        timeout=timeout,
    )


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "fresh" or sys.argv[3] != "--":
        sys.exit("usage: python -m thaw.dev.sandbox fresh SPEC_JSON -- CMD...")
    sys.exit(fresh_main(sys.argv[2], sys.argv[4:]))
