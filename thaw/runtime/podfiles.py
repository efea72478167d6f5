"""Pod files (issue 10.1): the files the workload's process tree holds open or mapped that a new pod of
the same workload would not have. They are copied into the snapshot at checkpoint and put back, at
the same paths with the same size, mode, owner and times, before CRIU restores (CRIU reopens every
file by path and checks its size and mode).

Which files: every path in ``/proc/PID/fd``, ``/proc/PID/map_files`` and ``/proc/PID/cwd`` of every
process of the tree, told apart by the mount it is on (``/proc/self/mountinfo``: the ``mnt_id`` of
an open file's ``fdinfo``) and its ``stat`` (:func:`classify`, pure; its rules in order):

1. not a regular file or directory (devices, sockets, pipes, anonymous memory): not a file of the
   pod. Deleted files (no link left): CRIU carries them itself (``--ghost-limit``);
2. on a kernel filesystem (proc, sysfs, cgroup, devpts, mqueue, …): not copied;
3. on a read-only mount: the same in every pod (the image with ``readOnlyRootFilesystem``), or the
   configuration the snapshot records a digest of (Secret, ConfigMap, projected volumes: kubelet
   mounts them read-only; :mod:`thaw.runtime.replica_config`);
4. on an emptyDir (the mount's root is a kubelet ``…/volumes/kubernetes.io~empty-dir/NAME``
   directory): **copied**;
5. on a tmpfs mounted as a whole (root ``/``: ``/dev/shm``, a ``medium: Memory`` emptyDir, a tmpfs
   the image declares): **copied**. A part of a tmpfs bound in (root not ``/``) is a hostPath into
   the node's tmpfs: not copied;
6. on the container's root filesystem (mount point ``/``): **copied** when its ctime is after
   ``thaw exec`` started (written, or copied up, in this container: its writable layer); an older
   one is the image's;
7. anything else (hostPath, PVC, CSI, NFS; the kubelet's /etc/hosts and /etc/resolv.conf): shared
   with other pods or made by the kubelet for every pod: not copied.

A directory (a process's working directory, the directory of a UNIX socket bound to a path, which
CRIU binds again) is recreated, empty, where it is missing.

Where: ``podfiles/`` in the snapshot's image directory: each file as ``podfiles/N`` and the index
``podfiles/index.json`` (path, size, mode, uid, gid, atime and mtime in ns; the directories above
each file up to its mount point, with their mode and owner). The manifest lists them (digests,
signature) like every image file.

When: CRIU's post-dump action script (``--action-script``) runs while the tree is still frozen
(criu/cr-dump.c, ``cr_dump_finish``), so the copy is of the state CRIU dumped: the sizes it checks
on restore match. The script (:func:`action_script`) runs ``thaw capture-pod-files`` with the thaw
this ``thaw exec`` runs from (the runtime bundle's ``bin/thaw`` in a pod). A script that fails fails
the dump, and the tree goes on running.

Limit: ``--pod-files-limit`` bytes (1 GiB by default) for all of them; a checkpoint that would need
more is refused before anything is copied, naming the largest files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("thaw.exec")

DIR_NAME = "podfiles"
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
DEFAULT_LIMIT = 1 << 30
INDEX_MAX_BYTES = 16 << 20
EMPTY_DIR_MARK = "kubernetes.io~empty-dir"
KERNEL_FS = frozenset(
    {
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs",
        "bpf", "configfs", "fusectl", "pstore", "binfmt_misc", "hugetlbfs", "nsfs", "autofs",
        "efivarfs", "selinuxfs", "rpc_pipefs",
    }
)  # fmt: skip
REFUSED_EXIT = 3  # the capture's exit code when it refuses (over the limit): the reason is in its file
_FILE_NAME = re.compile(r"^podfiles/[0-9]{1,9}$")
_COPY_CHUNK = 1 << 20
SKIPPED_LISTED = 20  # paths kept per reason in the index's "skipped", for the curious


class PodFilesError(RuntimeError):
    """The pod files could not be captured or put back; the message says which and why."""


class PodFilesTooLarge(PodFilesError):
    """The pod files need more than the limit."""


# --- which files (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo."""

    mount_id: int
    parent_id: int
    root: str  # the directory of its filesystem that is mounted here
    point: str
    options: frozenset[str]  # the mount's own options (ro/rw, nosuid, …)
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> dict[int, Mount]:
    """The mounts of /proc/PID/mountinfo by mount ID (pure); malformed lines are skipped."""
    mounts: dict[int, Mount] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 2:
            continue
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        mounts[mount_id] = Mount(
            mount_id=mount_id,
            parent_id=parent_id,
            root=_unescape(fields[3]),
            point=_unescape(fields[4]),
            options=frozenset(fields[5].split(",")),
            fstype=rest[0],
            source=_unescape(rest[1]),
        )
    return mounts


@dataclass(frozen=True)
class Decision:
    capture: bool
    kind: str  # tmpfs, emptydir, writable-layer (captured); else why not
    why: str


def classify(
    mount: Mount | None, *, mode: int, nlink: int, ctime: float, since: float
) -> Decision:  # fmt: skip
    """Whether a file the tree holds is one a new pod would lack (module doc, the rules in order)."""
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return Decision(False, "not-a-file", "not a regular file or directory")
    if stat.S_ISREG(mode) and nlink == 0:
        return Decision(False, "deleted", "deleted while open: CRIU carries it (--ghost-limit)")
    if mount is None:
        return Decision(False, "unknown-mount", "its mount is not in /proc/self/mountinfo")
    if mount.fstype in KERNEL_FS:
        return Decision(False, "kernel-fs", f"on a kernel filesystem ({mount.fstype})")
    if "ro" in mount.options:
        return Decision(False, "read-only", f"on a read-only mount ({mount.point})")
    if EMPTY_DIR_MARK in mount.root:
        return Decision(True, "emptydir", f"on an emptyDir ({mount.point})")
    if mount.fstype == "tmpfs":
        if mount.root == "/":
            return Decision(True, "tmpfs", f"on a tmpfs of the pod ({mount.point})")
        return Decision(
            False, "volume", f"on a directory of another tmpfs bound in ({mount.point}: hostPath)"
        )
    if mount.point == "/":
        if ctime >= since:
            return Decision(
                True, "writable-layer", "on the root filesystem, changed since the container started"
            )
        return Decision(False, "image", "on the root filesystem, unchanged since the container started")
    return Decision(
        False, "volume", f"on a volume shared with other pods or made by the kubelet ({mount.point})"
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def limit_refusal(sizes: dict[str, int], limit: int, shown: int = 5) -> str | None:
    """Why files of these sizes cannot be carried under ``limit`` bytes, naming the largest (pure)."""
    total = sum(sizes.values())
    if total <= limit:
        return None
    largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:shown]
    named = ", ".join(f"{p} ({human(n)})" for p, n in largest)
    return (
        f"the pod files the workload holds open need {human(total)} in {len(sizes)} files, over the limit of"
        f" {human(limit)} (--pod-files-limit); largest: {named}. Keep large files on a volume (hostPath,"
        " PVC) or in the image, or raise the limit"
    )


def ancestors(path: str, mount_point: str) -> list[str]:
    """The directories between ``mount_point`` (excluded) and ``path`` (excluded), top first (pure)."""
    out: list[str] = []
    parent = os.path.dirname(path)
    top = mount_point.rstrip("/") or "/"
    while parent != top and parent.startswith(top.rstrip("/") + "/"):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out[::-1]


def index_problem(index: Any) -> str | None:
    """Why ``index`` is not a pod-files index this runtime can put back, or None (pure)."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return f"unknown format (want {INDEX_FORMAT})"
    for key, need in (("files", ("path", "file", "size", "mode", "uid", "gid", "atime_ns", "mtime_ns")),
                      ("dirs", ("path", "mode", "uid", "gid"))):  # fmt: skip
        entries = index.get(key)
        if not isinstance(entries, list):
            return f"{key} is not a list"
        for e in entries:
            if not isinstance(e, dict) or any(k not in e for k in need):
                return f"an entry of {key} lacks one of {', '.join(need)}"
            p = e["path"]
            if (
                not isinstance(p, str)
                or not p.startswith("/")
                or "\x00" in p
                or os.path.normpath(p) != p
                or p == "/"
            ):
                return f"path {p!r} is not a normal absolute path"
            ints = [e[k] for k in need if k not in ("path", "file")]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
                return f"{p}: size, mode, owner and times must be non-negative integers"
            if e["mode"] > 0o7777:
                return f"{p}: mode {e['mode']:o} is more than permission bits"
            if key == "files" and not (isinstance(e["file"], str) and _FILE_NAME.match(e["file"])):
                return f"{p}: its copy {e['file']!r} is not podfiles/N"
    return None


# --- capture (in CRIU's post-dump action, the tree frozen) ------------------------------------


@dataclass(frozen=True)
class Held:
    path: str  # as the process sees it
    proc: str  # the /proc link that opens that very file


def unix_socket_paths(text: str) -> dict[int, str]:
    """Bound UNIX sockets of /proc/PID/net/unix with a filesystem path, by inode (pure)."""
    out: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7].startswith("/") and fields[6].isdigit():
            out[int(fields[6])] = fields[7]
    return out


def held_files(pids: Iterable[int]) -> list[Held]:
    """Every path the processes hold: open files, mapped files, working directories (one per path),
    and the directory of each UNIX socket they have bound to a path (CRIU binds it again there)."""
    seen: dict[str, Held] = {}
    sockets: set[int] = set()
    bound: dict[int, str] = {}

    def add(path: str, proc: str) -> None:
        if path.startswith("/") and path not in seen:
            seen[path] = Held(path, proc)
        elif path.startswith("socket:[") and path.endswith("]") and path[8:-1].isdigit():
            sockets.add(int(path[8:-1]))

    for pid in pids:
        base = f"/proc/{pid}"
        with contextlib.suppress(OSError):
            add(os.readlink(f"{base}/cwd"), f"{base}/cwd")
        with contextlib.suppress(OSError):
            for name in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    add(os.readlink(f"{base}/fd/{name}"), f"{base}/fd/{name}")
        with contextlib.suppress(OSError):
            for name in os.listdir(f"{base}/map_files"):
                with contextlib.suppress(OSError):
                    add(os.readlink(f"{base}/map_files/{name}"), f"{base}/map_files/{name}")
        if sockets - set(bound):
            with contextlib.suppress(OSError):
                bound.update(unix_socket_paths(Path(f"{base}/net/unix").read_text()))
    for inode in sorted(sockets & set(bound)):
        parent = os.path.normpath(os.path.dirname(bound[inode]))  # the path as bind() was given it
        add(parent, parent)  # held by path: the hook shares the tree's mount namespace
    return list(seen.values())


def _mnt_id(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def process_start(pid: int) -> float:
    """When ``pid`` started, in seconds since the epoch (its /proc stat start time + boot time).
    Boot time is whole seconds, so this is up to a second early: the capture errs towards copying."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22 of stat; the first two (pid, comm) are before ")"
    btime = next(
        int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime ")
    )
    return btime + ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class _Chosen:
    held: Held
    fd: int
    st: os.stat_result
    decision: Decision
    mount: Mount


def _choose(
    held: list[Held],
    mounts: dict[int, Mount],
    since: float,
    skipped: dict[str, list[str]],
    skip: frozenset[str],
) -> list[_Chosen]:
    chosen: list[_Chosen] = []
    for h in held:
        if h.path in skip:
            skipped.setdefault("stdio", []).append(h.path)
            continue
        try:
            st = os.stat(h.proc)
        except OSError:
            continue  # gone (a file closed between listing and here: the tree is frozen, so not ours)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            skipped.setdefault("not-a-file", []).append(h.path)
            continue
        fd = os.open(h.proc, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        mnt = _mnt_id(fd)
        mount = mounts.get(mnt) if mnt is not None else None
        d = classify(mount, mode=st.st_mode, nlink=st.st_nlink, ctime=st.st_ctime, since=since)
        if not d.capture or mount is None:
            os.close(fd)
            skipped.setdefault(d.kind, []).append(h.path)
            continue
        chosen.append(_Chosen(h, fd, st, d, mount))
    return chosen


def _copy_fd(src: int, dst: int, size: int) -> int:
    done = 0
    while done < size:
        n = os.sendfile(dst, src, done, min(_COPY_CHUNK, size - done))
        if n == 0:
            break
        done += n
    return done


def _dir_entry(path: str) -> dict[str, Any] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return {
        "path": path, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
    }  # fmt: skip


def capture(
    pids: Iterable[int], images: Path, *, since: float, limit: int, skip: Iterable[str] = ()
) -> dict[str, Any]:
    """Copy the pod files of processes ``pids`` into ``images/podfiles/`` with its index; returns the
    index. ``skip``: paths that are not copied (the workload's stdout/stderr files, which a restore
    rebinds to the new container's own: thaw.runtime.criu.stdio_resource). Raises PodFilesTooLarge
    (nothing copied) over ``limit`` bytes, PodFilesError otherwise."""
    t0 = time.monotonic()
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    skipped: dict[str, list[str]] = {}
    chosen = _choose(held_files(pids), mounts, since, skipped, frozenset(skip))
    try:
        files = [c for c in chosen if stat.S_ISREG(c.st.st_mode)]
        why = limit_refusal({c.held.path: c.st.st_size for c in files}, limit)
        if why:
            raise PodFilesTooLarge(why)
        out = images / DIR_NAME
        out.mkdir(mode=0o700, exist_ok=True)
        entries: list[dict[str, Any]] = []
        dirs: dict[str, dict[str, Any]] = {}
        for n, c in enumerate(sorted(files, key=lambda c: c.held.path)):
            rel = f"{DIR_NAME}/{n}"
            dst = os.open(
                images / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                copied = _copy_fd(c.fd, dst, c.st.st_size)
            finally:
                os.close(dst)
            if copied != c.st.st_size:
                raise PodFilesError(
                    f"{c.held.path} changed while it was copied ({copied} of {c.st.st_size} bytes)"
                )
            entries.append(
                {
                    "path": c.held.path, "file": rel, "kind": c.decision.kind, "size": c.st.st_size,
                    "mode": stat.S_IMODE(c.st.st_mode), "uid": c.st.st_uid, "gid": c.st.st_gid,
                    "atime_ns": c.st.st_atime_ns, "mtime_ns": c.st.st_mtime_ns,
                }
            )  # fmt: skip
            for d in ancestors(c.held.path, c.mount.point):
                if d not in dirs and (e := _dir_entry(d)) is not None:
                    dirs[d] = e
        for c in chosen:
            if stat.S_ISDIR(c.st.st_mode):
                for d in [*ancestors(c.held.path, c.mount.point), c.held.path]:
                    if d not in dirs and (e := _dir_entry(d)) is not None:
                        dirs[d] = e
    finally:
        for c in chosen:
            os.close(c.fd)
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "files": entries,
        "dirs": sorted(dirs.values(), key=lambda e: (e["path"].count("/"), e["path"])),
        "bytes": sum(e["size"] for e in entries),
        "capture_s": round(time.monotonic() - t0, 3),
        "skipped": {k: sorted(v)[:SKIPPED_LISTED] for k, v in sorted(skipped.items())},
    }
    (out / INDEX_NAME).write_bytes(orjson.dumps(index, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2))
    return index


# --- the action script and its command --------------------------------------------------------


def bundle_wrapper(pkg: Path) -> Path | None:
    """The runtime bundle's ``bin/thaw`` when the thaw package ``pkg`` is a bundle's
    (scripts/build-runtime: ``<root>/python/site/thaw``), else None."""
    wrapper = pkg.parents[2] / "bin" / "thaw"
    if pkg.parent.name == "site" and pkg.parents[1].name == "python" and os.access(wrapper, os.X_OK):
        return wrapper
    return None


def thaw_command() -> list[str]:
    """How to run this very thaw from a shell: the bundle's wrapper, else this Python with ``-m thaw``."""
    import thaw

    wrapper = bundle_wrapper(Path(thaw.__file__).resolve().parent)
    return [str(wrapper)] if wrapper is not None else [sys.executable, "-m", "thaw"]


def action_script(images: Path, *, since: float, limit: int, reason: Path, skip: Iterable[str] = ()) -> str:
    """The text of CRIU's action script: at post-dump (the tree still frozen) ``thaw capture-pod-files``."""
    import thaw

    cmd = [
        *thaw_command(), "capture-pod-files", "--images", str(images), "--since", repr(since),
        "--limit", str(limit), "--reason", str(reason), *(a for p in sorted(skip) for a in ("--skip", p)),
    ]  # fmt: skip
    pythonpath = str(Path(thaw.__file__).resolve().parents[1])
    return (
        "#!/bin/sh\n"
        "# CRIU's action script, written by thaw exec (thaw/runtime/podfiles.py): at post-dump, while the\n"
        "# tree is still frozen, copy the files a new pod would lack into the images.\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0\n'
        f"export PYTHONPATH={shlex.quote(pythonpath)}\n"  # -m thaw: this thaw (the bundle ignores it: -I)
        f"exec {shlex.join(cmd)}\n"
    )


def write_action_script(
    path: Path, images: Path, *, since: float, limit: int, reason: Path, skip: Iterable[str] = ()
) -> Path:
    reason.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(action_script(images, since=since, limit=limit, reason=reason, skip=skip))
    tmp.chmod(0o700)  # CRIU execs it directly
    tmp.replace(path)
    return path


def refusal(reason: Path) -> str | None:
    """What the capture wrote when it failed (bounded read), or None."""
    try:
        with open(reason, "rb") as f:
            return f.read(8192).decode(errors="replace").strip() or None
    except OSError:
        return None


def summary(images: Path) -> dict[str, Any]:
    """Files, bytes and capture time of a captured index (for the outcome); {} without one."""
    try:
        index = orjson.loads((images / DIR_NAME / INDEX_NAME).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {
        "files": len(index.get("files", [])),
        "bytes": index.get("bytes", 0),
        "capture_s": index.get("capture_s"),
    }


def run_capture(args: argparse.Namespace) -> int:
    """``thaw capture-pod-files``: CRIU's post-dump action (module doc). The tree's root is CRIU's
    ``CRTOOLS_INIT_PID``. Exit 0 done (or not post-dump), 3 refused, 1 failed; the reason in --reason."""
    from thaw.runtime.criu import tree

    if os.environ.get("CRTOOLS_SCRIPT_ACTION", "post-dump") != "post-dump":
        return 0
    reason: Path = args.reason
    try:
        root = int(os.environ.get("CRTOOLS_INIT_PID") or args.root_pid or 0)
        if root <= 0:
            raise PodFilesError("no CRTOOLS_INIT_PID from CRIU (and no --root-pid)")
        index = capture(
            tree(root), args.images, since=float(args.since), limit=int(args.limit), skip=args.skip
        )
    except PodFilesTooLarge as exc:
        reason.write_text(str(exc))
        return REFUSED_EXIT
    except (PodFilesError, OSError, ValueError) as exc:
        reason.write_text(f"pod files: {exc}")
        return 1
    sys.stderr.write(
        f"pod files: {len(index['files'])} files, {index['bytes']} bytes in {index['capture_s']} s\n"
    )
    return 0


# --- put back (before CRIU restores) ----------------------------------------------------------


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PodFilesError(f"cannot open {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > INDEX_MAX_BYTES:
            raise PodFilesError(f"{path} is not a regular file of at most {INDEX_MAX_BYTES} bytes")
        raw = f.read(INDEX_MAX_BYTES + 1)
    try:
        index = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PodFilesError(f"{path} is not JSON: {exc}") from exc
    problem = index_problem(index)
    if problem:
        raise PodFilesError(f"{path}: {problem}")
    value: dict[str, Any] = index
    return value


@dataclass
class PutBack:
    files: int = 0
    bytes: int = 0
    created: list[str] = field(default_factory=list)  # what was made here, in order, for undo()

    def undo(self) -> None:
        """Remove what was put back (a restore that failed after it: the cold start gets a fresh pod)."""
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)


def _own(fd: int, path: str, uid: int, gid: int) -> None:
    try:
        os.fchown(fd, uid, gid)
    except PermissionError as exc:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            raise PodFilesError(f"cannot give {path} to {uid}:{gid}: {exc.strerror}") from exc


def _make_dir(path: str, mode: int, uid: int, gid: int, made: list[str]) -> None:
    os.mkdir(path, 0o700)
    made.append(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _own(fd, path, uid, gid)
        os.fchmod(fd, mode)  # after chown, which clears set-id bits; mkdir's mode is cut by the umask
    finally:
        os.close(fd)


def _walk_up(path: str) -> Iterator[str]:
    """``path``'s missing parents, top first."""
    missing: list[str] = []
    parent = os.path.dirname(path)
    while parent != "/" and not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return reversed(missing)


def put_back(images: Path) -> PutBack:
    """Put the snapshot's pod files back (module doc); nothing when it carries none. A file already at
    a path (a restarted container's emptyDir) is replaced: CRIU needs the snapshot's. Raises
    PodFilesError; what was made before the error is removed."""
    index = _read_index(images / DIR_NAME / INDEX_NAME)
    result = PutBack()
    if index is None:
        return result
    made = result.created
    try:
        for d in index["dirs"]:
            if not os.path.lexists(d["path"]):
                for parent in _walk_up(d["path"]):
                    _make_dir(parent, 0o755, 0, 0, made)
                _make_dir(d["path"], d["mode"], d["uid"], d["gid"], made)
        for e in index["files"]:
            _put_file(images, e, made)
            result.files += 1
            result.bytes += e["size"]
        for d in sorted(index["dirs"], key=lambda d: -d["path"].count("/")):
            if d["path"] in made and "mtime_ns" in d:  # after their files: adding them moved the times
                os.utime(
                    d["path"], ns=(d.get("atime_ns", d["mtime_ns"]), d["mtime_ns"]), follow_symlinks=False
                )
    except OSError as exc:
        result.undo()
        raise PodFilesError(f"cannot put back {exc.filename or 'a pod file'}: {exc.strerror}") from exc
    except PodFilesError:
        result.undo()
        raise
    return result


def _put_file(images: Path, e: dict[str, Any], made: list[str]) -> None:
    path: str = e["path"]
    for parent in _walk_up(path):
        _make_dir(parent, 0o755, 0, 0, made)
    src = os.open(images / e["file"], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    tmp = os.path.join(os.path.dirname(path), f".thaw-podfile-{secrets.token_hex(6)}")
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size != e["size"]:
            raise PodFilesError(f"the snapshot's copy of {path} is not a regular file of {e['size']} bytes")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if _copy_fd(src, dst, e["size"]) != e["size"]:
                raise PodFilesError(f"the snapshot's copy of {path} is shorter than {e['size']} bytes")
            _own(dst, path, e["uid"], e["gid"])
            os.fchmod(dst, e["mode"])
            os.utime(dst, ns=(e["atime_ns"], e["mtime_ns"]))
        finally:
            os.close(dst)
        os.rename(tmp, path)
        made.append(path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)
