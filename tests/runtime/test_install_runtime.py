"""``thaw install-runtime`` (the thaw-tools init container): the runtime bundle copied once per node
per bundle id, each pod linked to it; the per-pod copy only when the node's copy cannot be had.
Run through the real CLI, as root with every capability dropped, as the init container runs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.needs import requires, root
from thaw.dev.sandbox import thaw_cli, thaw_command, thaw_env
from thaw.runtime.install import (
    BUNDLE_ID_FILE,
    InstallError,
    bundle_digest,
    install,
    read_bundle_id,
    write_bundle_id,
)

NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
needs_root = requires(
    root("chowns and drops capabilities") or (None if shutil.which("setpriv") else "needs setpriv")
)


def _bundle(root: Path) -> Path:
    """A small bundle shaped like scripts/build-runtime's: an executable, a library, a relative
    symlink, nested directories, and its BUNDLE_ID."""
    b = root / "opt-thaw"
    (b / "bin").mkdir(parents=True)
    (b / "criu" / "bin").mkdir(parents=True)
    (b / "python" / "site" / "pkg").mkdir(parents=True)
    (b / "bin" / "thaw").write_text('#!/bin/sh\necho thaw-from-the-bundle "$@"\n')
    os.chmod(b / "bin" / "thaw", 0o755)
    (b / "criu" / "bin" / "criu").write_bytes(b"\x7fELF" + os.urandom(64 * 1024))
    os.chmod(b / "criu" / "bin" / "criu", 0o4755)  # setuid in the source: never copied
    (b / "bin" / "criu").symlink_to("../criu/bin/criu")
    (b / "python" / "site" / "pkg" / "mod.py").write_text("X = 1\n")
    os.chmod(b / "python" / "site" / "pkg" / "mod.py", 0o600)  # made readable for the workload's user
    write_bundle_id(b)
    return b


def test_bundle_id_names_the_content(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    first = read_bundle_id(b)
    assert first == bundle_digest(b) and first.startswith("sha256-") and len(first) == 7 + 32
    (b / "python" / "site" / "pkg" / "mod.py").write_text("X = 2\n")
    assert bundle_digest(b) != first  # content
    (b / "python" / "site" / "pkg" / "mod.py").write_text("X = 1\n")
    assert bundle_digest(b) == first
    os.chmod(b / "bin" / "thaw", 0o700)
    assert bundle_digest(b) != first  # mode
    os.chmod(b / "bin" / "thaw", 0o755)
    (b / "bin" / "criu").unlink()
    (b / "bin" / "criu").symlink_to("/usr/sbin/criu")
    assert bundle_digest(b) != first  # link target
    (b / "bin" / "criu").unlink()
    (b / "bin" / "criu").symlink_to("../criu/bin/criu")
    (b / BUNDLE_ID_FILE).write_text("sha256-" + "0" * 32 + "\n")
    assert bundle_digest(b) == first  # BUNDLE_ID itself is not part of it


def test_bundle_id_is_read_bounded_and_checked(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    (b / BUNDLE_ID_FILE).write_text("../../etc\n")
    with pytest.raises(InstallError, match="not a bundle id"):
        read_bundle_id(b)
    (b / BUNDLE_ID_FILE).unlink()
    os.mkfifo(b / BUNDLE_ID_FILE)
    with pytest.raises(InstallError, match="not a regular file"):
        read_bundle_id(b)  # a FIFO would block a plain open
    (b / BUNDLE_ID_FILE).unlink()
    with pytest.raises(InstallError, match="scripts/build-runtime"):
        read_bundle_id(b)


@needs_root
def test_first_pod_copies_later_pods_link(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    bid = read_bundle_id(b)
    node = tmp_path / "var-lib-thaw-runtime"
    node.mkdir(mode=0o755)  # as kubelet creates a DirectoryOrCreate hostPath: root's, 0755
    pods = []
    for i in range(3):
        tools = tmp_path / f"pod{i}-tools"
        tools.mkdir()
        os.chmod(tools, 0o777)  # an emptyDir
        out = thaw_cli(
            "install-runtime", "--bundle", b, "--runtime-dir", node, "--link", tools / "rt", wrap=NO_CAPS
        )
        assert out.returncode == 0, out.stderr
        pods.append((tools, out.stderr))
    assert "copied" in pods[0][1] and all("already there" in err for _, err in pods[1:])
    assert sorted(p.name for p in node.iterdir()) == [".install.lock", bid]
    for tools, _ in pods:
        rt = tools / "rt"
        assert rt.is_symlink() and os.readlink(rt) == str(node / bid)
        run = subprocess.run([str(rt / "bin" / "thaw"), "hi"], capture_output=True, text=True, check=True)
        assert run.stdout.strip() == "thaw-from-the-bundle hi"
        assert list(tools.iterdir()) == [rt]  # nothing else in the emptyDir: no per-pod copy
    copy = node / bid
    assert read_bundle_id(copy) == bid
    criu_mode = stat.S_IMODE((copy / "criu" / "bin" / "criu").stat().st_mode)
    assert criu_mode == 0o755  # no setuid
    assert stat.S_IMODE((copy / "python" / "site" / "pkg" / "mod.py").stat().st_mode) == 0o644
    assert os.readlink(copy / "bin" / "criu") == "../criu/bin/criu"
    assert (copy / "criu" / "bin" / "criu").read_bytes() == (b / "criu" / "bin" / "criu").read_bytes()


@needs_root
def test_concurrent_pods_copy_once(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    node = tmp_path / "node"
    procs = []
    for i in range(4):
        (tmp_path / f"t{i}").mkdir()
        procs.append(
            subprocess.Popen(
                [
                    *NO_CAPS,
                    *thaw_command(),
                    "install-runtime",
                    "--bundle",
                    str(b),
                    "--runtime-dir",
                    str(node),
                    "--link",
                    str(tmp_path / f"t{i}" / "rt"),
                ],
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env=thaw_env(),
            )
        )
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum("copied" in e for e in errs) == 1, errs
    assert [p.name for p in node.iterdir() if not p.name.startswith(".install")] == [read_bundle_id(b)]


def test_a_dead_install_and_a_partial_copy_are_replaced(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    bid = read_bundle_id(b)
    node = tmp_path / "node"
    (node / f".tmp-{bid}-dead").mkdir(parents=True)  # an install killed mid-copy
    (node / bid / "bin").mkdir(parents=True)  # a directory under the final name without BUNDLE_ID
    done = install(b, node, tmp_path / "tools" / "rt")
    assert done.shared and done.copied_bytes > 0
    assert sorted(p.name for p in node.iterdir()) == [".install.lock", bid]
    assert read_bundle_id(node / bid) == bid


@needs_root
def test_unwritable_node_copy_falls_back_to_a_copy_in_the_pod() -> None:
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="thaw-install-"))  # 0700 pytest dirs would hide it from 65532
    os.chmod(tmp_path, 0o755)
    b = _bundle(tmp_path)
    os.chmod(b / "python" / "site" / "pkg" / "mod.py", 0o644)  # as the image has it: readable by all
    node = tmp_path / "node"
    node.mkdir(mode=0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    os.chmod(tools, 0o777)
    try:
        _unwritable_node_copy(b, node, tools)
    finally:
        shutil.rmtree(tmp_path)


def _unwritable_node_copy(b: Path, node: Path, tools: Path) -> None:
    # The image's own user (65532): the root-owned hostPath is not writable, the emptyDir is.
    as_user = ["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", "--"]
    out = thaw_cli(
        "install-runtime", "--bundle", b, "--runtime-dir", node, "--link", tools / "rt", wrap=as_user
    )
    assert out.returncode == 0, out.stderr
    assert "a private copy" in out.stderr and "could not be used" in out.stderr
    rt = tools / "rt"
    assert rt.is_symlink() and not os.readlink(rt).startswith("/")  # relative: any mount point
    ran = subprocess.run([str(rt / "bin" / "thaw")], capture_output=True, text=True, check=True)
    assert ran.stdout.startswith("thaw-from")
    assert list(node.iterdir()) == []


def test_lock_deadline_falls_back_to_a_copy_in_the_pod(tmp_path: Path) -> None:
    import fcntl

    b = _bundle(tmp_path)
    node = tmp_path / "node"
    node.mkdir()
    with open(node / ".install.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another pod's install that never ends
        done = install(b, node, tmp_path / "tools" / "rt", lock_timeout=0.5)
    assert not done.shared and "another install held" in done.note
    assert (tmp_path / "tools" / "rt" / "bin" / "thaw").is_file()


def test_a_fifo_in_the_bundle_is_refused(tmp_path: Path) -> None:
    b = _bundle(tmp_path)
    os.mkfifo(b / "bin" / "pipe")
    with pytest.raises(InstallError, match="neither a file"):
        write_bundle_id(b)


@pytest.mark.slow
@needs_root
def test_the_built_runtime_installs_itself_without_capabilities(tmp_path: Path) -> None:
    """scripts/build-runtime writes BUNDLE_ID; the bundle's own thaw installs it (its default
    bundle is the one it runs from) and the linked CLI runs."""
    dest = tmp_path / "opt-thaw"
    python = os.path.realpath(sys.executable)
    built = subprocess.run(
        [str(REPO / "scripts" / "build-runtime"), str(dest), "--python", python, "--no-criu"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    bid = read_bundle_id(dest)
    assert bid == bundle_digest(dest) and bid in built.stdout
    node, tools = tmp_path / "node", tmp_path / "tools"
    tools.mkdir()
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [*NO_CAPS, str(dest / "bin" / "thaw"), "install-runtime", "--runtime-dir", str(node),
         "--link", str(tools / "rt")],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert os.readlink(tools / "rt") == str(node / bid)
    helped = subprocess.run(
        [str(tools / "rt" / "bin" / "thaw"), "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert helped.returncode == 0 and "install-runtime" in helped.stdout
