"""``thaw install-runtime``: the ``thaw-tools`` init container (notes/POD-LAYOUT.md).

Puts Thaw's runtime bundle (scripts/build-runtime: the CLI, its Python, its libraries, CRIU) where
the workload container can run it, without copying 217 MB for every pod: the bundle is copied once
per node per bundle into ``<runtime-dir>/<bundle-id>/`` (a hostPath, read-only in the workload), and
the tools emptyDir gets a symlink ``<link> -> <runtime-dir>/<bundle-id>`` (``/thaw/rt``).

- ``<bundle-id>`` is the content digest scripts/build-runtime writes into ``<bundle>/BUNDLE_ID``
  (:func:`bundle_digest`): two images with the same runtime share one copy, an upgrade gets its own.
- The copy goes into ``<runtime-dir>/.tmp-<id>-<rand>/``, is flushed to disk (``syncfs``) and renamed
  to ``<id>``, under an exclusive flock on ``<runtime-dir>/.install.lock`` taken with a deadline: a
  second pod on the node waits for the first one's copy and then uses it; whatever is named
  ``<id>`` is whole. A dead install's temporary directory is removed by the next one (under the lock).
- No ``cp``: Python copies files, directories and symlinks itself, so it works in any image and as
  root with every capability dropped (it only writes directories it owns: the hostPath that kubelet
  creates for root, and the emptyDir). Modes are kept readable by every user (the workload's user is
  not root); setuid/setgid bits are never copied.
- Never a broken pod: when the runtime directory cannot be used (not writable, lock deadline,
  disk full), the bundle is copied into the emptyDir itself (the old per-pod copy), and the link
  points there.

Old bundles are not removed (a running pod may still run from one).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import thaw
from thaw.contract.safeio import fsync_dir

log = logging.getLogger("thaw.install")

BUNDLE_ID_FILE = "BUNDLE_ID"
BUNDLE_ID_PREFIX = "sha256-"
_BUNDLE_ID = re.compile(r"^sha256-[0-9a-f]{32}$")
MAX_BUNDLE_ID_BYTES = 128
DEFAULT_BUNDLE = Path("/opt/thaw")
DEFAULT_RUNTIME_DIR = Path("/var/lib/thaw/runtime")
DEFAULT_LINK = Path("/thaw/rt")
LOCK_NAME = ".install.lock"
TMP_PREFIX = ".tmp-"
COPY_PREFIX = ".rt-copy-"  # the fallback: a private copy in the tools emptyDir
LOCK_TIMEOUT_S = 300.0
LOCK_POLL_S = 0.1
CHUNK = 1 << 20


class InstallError(RuntimeError):
    """The runtime could not be made available; the message says where and why."""


# --- the bundle's identity (build time) --------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bundle_digest(root: Path) -> str:
    """``sha256-<32 hex>`` over every entry of the bundle (path, kind, mode, content or link
    target), in sorted order, ``BUNDLE_ID`` itself left out. Raises InstallError for an entry that
    is not a file, directory or symlink."""
    h = hashlib.sha256()
    for rel, kind, mode, detail in _entries(root):
        h.update(f"{kind} {mode:o} {rel}\0{detail}\0".encode())
    return BUNDLE_ID_PREFIX + h.hexdigest()[:32]


def _entries(root: Path) -> list[tuple[str, str, int, str]]:
    out: list[tuple[str, str, int, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            if rel == BUNDLE_ID_FILE:
                continue
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out.append((rel, "link", 0, os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out.append((rel, "dir", mode, ""))
            elif stat.S_ISREG(st.st_mode):
                out.append((rel, "file", mode, _file_digest(p)))
            else:
                raise InstallError(f"{p} is neither a file, a directory nor a symlink")
        # os.walk does not descend into symlinked directories: they are entries, not trees.
    return out


def write_bundle_id(root: Path) -> str:
    """Compute the bundle's digest and write it to ``<root>/BUNDLE_ID`` (scripts/build-runtime)."""
    digest = bundle_digest(root)
    (root / BUNDLE_ID_FILE).write_text(digest + "\n")
    os.chmod(root / BUNDLE_ID_FILE, 0o644)
    return digest


def read_bundle_id(root: Path) -> str:
    """The bundle's id from ``<root>/BUNDLE_ID`` (bounded read, no symlink); InstallError when it
    is missing or malformed."""
    path = root / BUNDLE_ID_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(
            f"{path}: {exc.strerror or exc} (a bundle built by scripts/build-runtime has one)"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InstallError(f"{path} is not a regular file")
        raw = os.read(fd, MAX_BUNDLE_ID_BYTES + 1)
    finally:
        os.close(fd)
    text = raw.decode(errors="replace").strip()
    if len(raw) > MAX_BUNDLE_ID_BYTES or not _BUNDLE_ID.match(text):
        raise InstallError(f"{path} holds {text[:80]!r}, not a bundle id of the form sha256-<32 hex>")
    return text


def running_bundle() -> Path:
    """The bundle this ``thaw`` runs from (``<bundle>/python/site/thaw``), else /opt/thaw."""
    here = Path(thaw.__file__).resolve().parents[3]
    return here if (here / BUNDLE_ID_FILE).is_file() else DEFAULT_BUNDLE


# --- copying -----------------------------------------------------------------------------------


def copy_tree(src: Path, dst: Path) -> int:
    """Copy ``src`` into the new directory ``dst``: files (modes kept, made readable by everyone,
    never setuid/setgid), directories (0755) and symlinks (as they are). Returns the bytes copied.
    Nothing else is copied: a FIFO or device in a bundle is an error."""
    os.mkdir(dst, 0o700)
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        base = Path(dirpath)
        out = dst / base.relative_to(src)
        for name in dirnames + filenames:
            s, d = base / name, out / name
            st = s.lstat()
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(d, 0o700)  # opened up once filled (below)
            elif stat.S_ISREG(st.st_mode):
                total += _copy_file(s, d, stat.S_IMODE(st.st_mode))
            else:
                raise InstallError(f"{s} is neither a file, a directory nor a symlink")
    for dirpath, _dirs, _files in os.walk(dst):
        os.chmod(dirpath, 0o755)
    return total


def _copy_file(src: Path, dst: Path, mode: int) -> int:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin).st_size
            done = 0
            while done < size:  # in-kernel copy; sendfile where copy_file_range cannot (across filesystems)
                try:
                    n = os.copy_file_range(fin, fout, size - done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = os.sendfile(fout, fin, None, size - done)
                if n == 0:
                    break
                done += n
            os.fchmod(fout, (mode & 0o755) | 0o444)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return done


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


# --- install -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed_flock(path: Path, timeout: float) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise InstallError(f"another install held {path} for more than {timeout:.0f} s") from None
                time.sleep(LOCK_POLL_S)
        yield fd
    finally:
        os.close(fd)


def _is_installed(path: Path, bundle_id: str) -> bool:
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            return False
        return read_bundle_id(path) == bundle_id
    except (OSError, InstallError):
        return False


@dataclass(frozen=True)
class Installed:
    target: Path  # what the link points to
    copied_bytes: int  # 0 when the node already had it
    shared: bool  # False: the fallback copy in the emptyDir
    note: str = ""  # why the fallback was taken


def install_shared(bundle: Path, runtime_dir: Path, bundle_id: str, lock_timeout: float) -> tuple[Path, int]:
    """Make ``<runtime_dir>/<bundle_id>`` a whole copy of ``bundle``; (its path, bytes copied)."""
    final = Path(os.path.abspath(runtime_dir)) / bundle_id
    if _is_installed(final, bundle_id):
        return final, 0
    runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with _timed_flock(runtime_dir / LOCK_NAME, lock_timeout):
        if _is_installed(final, bundle_id):  # another pod's install finished while we waited
            return final, 0
        # Holding the lock: any temporary directory is a dead install's.
        for stale in runtime_dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() or final.is_symlink():  # not whole (no matching BUNDLE_ID): never ours to keep
            _remove(final)
        tmp = runtime_dir / f"{TMP_PREFIX}{bundle_id}-{secrets.token_hex(4)}"
        try:
            copied = copy_tree(bundle, tmp)
            _syncfs(tmp)
            os.rename(tmp, final)
            fsync_dir(runtime_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, copied


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def point_link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, atomically (a restarted init container replaces it)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # an older layout's copy in the emptyDir
    tmp = link.parent / f".{link.name}.tmp-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(
    bundle: Path, runtime_dir: Path | None, link: Path, lock_timeout: float = LOCK_TIMEOUT_S
) -> Installed:
    """The node's shared copy (made if missing) linked at ``link``; the private copy in ``link``'s
    directory when the shared one cannot be had (``runtime_dir`` None, unwritable, lock deadline)."""
    bundle_id = read_bundle_id(bundle)
    note = "no --runtime-dir"
    if runtime_dir is not None:
        try:
            target, copied = install_shared(bundle, runtime_dir, bundle_id, lock_timeout)
        except (OSError, InstallError) as exc:
            note = f"the node's copy in {runtime_dir} could not be used ({exc})"
            log.warning("%s: copying the runtime into %s instead", note, link.parent)
        else:
            point_link(link, target)
            return Installed(target, copied, shared=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    private = link.parent / f"{COPY_PREFIX}{bundle_id}"
    copied = 0
    if not _is_installed(private, bundle_id):
        if private.exists() or private.is_symlink():
            _remove(private)
        tmp = link.parent / f"{TMP_PREFIX}{bundle_id}-{secrets.token_hex(4)}"
        try:
            copied = copy_tree(bundle, tmp)
            os.rename(tmp, private)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    point_link(link, Path(private.name))  # relative: resolves wherever the emptyDir is mounted
    return Installed(private, copied, shared=False, note=note)


def run(args: argparse.Namespace) -> int:
    """``thaw install-runtime [--bundle DIR] [--runtime-dir DIR] [--link PATH]``."""
    bundle: Path = args.bundle or running_bundle()
    t = time.monotonic()
    try:
        done = install(bundle, args.runtime_dir, args.link, float(args.lock_timeout))
    except (OSError, InstallError) as exc:
        sys.stderr.write(f"thaw install-runtime: {exc}\n")
        return 1
    secs = time.monotonic() - t
    how = (
        f"copied {done.copied_bytes / 1e6:.0f} MB in {secs:.2f} s"
        if done.copied_bytes
        else f"already there ({secs:.3f} s)"
    )
    where = "the node's copy" if done.shared else f"a private copy ({done.note})"
    sys.stderr.write(f"thaw install-runtime: {args.link} -> {done.target}: {where}, {how}\n")
    return 0
