"""Pod files (issue 10.1) without CRIU: which files a new pod would lack (a table over a container's
mountinfo), the limit, the index, capture from a live process and putting the files back; the
configuration digest (issue 11.9); the stdout/stderr names CRIU inherits (issue 10.6)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.needs import requires, root
from thaw.runtime import criu, podfiles, replica_config
from thaw.runtime.podfiles import classify, parse_mountinfo
from thaw.runtime.restore import inherit_list

UID = "0c5d8e3a-1b2c-4d5e-8f90-123456789abc"
KUBELET = f"/var/lib/kubelet/pods/{UID}/volumes"
# A container's /proc/self/mountinfo on a kubelet node (containerd, runc), one line per kind.
MOUNTINFO = f"""\
1200 1100 0:150 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w
1201 1200 0:152 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1202 1200 0:153 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1203 1202 0:154 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k
1204 1200 259:1 {KUBELET}/kubernetes.io~empty-dir/work /run/thaw/work rw,relatime - ext4 /dev/nvme0n1p1 rw
1205 1200 0:160 / /scratch rw,relatime - tmpfs tmpfs rw,size=1048576k
1206 1200 259:1 {KUBELET}/kubernetes.io~configmap/cfg /etc/config ro,relatime - ext4 /dev/nvme0n1p1 rw
1207 1200 0:170 / /var/run/secrets/kubernetes.io/serviceaccount ro,relatime - tmpfs tmpfs rw,size=4096k
1208 1200 259:1 /data/models /models rw,relatime - ext4 /dev/nvme0n1p1 rw
1209 1200 0:180 / /mnt/pvc rw,relatime - nfs4 10.0.0.5:/export rw,vers=4.2
1210 1200 259:1 /var/lib/kubelet/pods/{UID}/etc-hosts /etc/hosts rw,relatime - ext4 /dev/nvme0n1p1 rw
1211 1200 0:190 /thaw-ipc /host-ipc rw,relatime - tmpfs tmpfs rw
1212 1200 259:2 /pods/{UID}/volumes/kubernetes.io~empty-dir/cache /cache rw,relatime - xfs /dev/sdb rw
1213 1200 259:1 /srv/my\\040data /mnt/my\\040data rw,relatime - ext4 /dev/nvme0n1p1 rw
1214 1200 0:200 / /readonly-tmp ro,relatime - tmpfs tmpfs rw
"""
MOUNTS = parse_mountinfo(MOUNTINFO)
SINCE = 1_000_000.0
REG, DIR, FIFO = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o600


def test_parse_mountinfo() -> None:
    root = MOUNTS[1200]
    assert (root.point, root.root, root.fstype, root.parent_id) == ("/", "/", "overlay", 1100)
    assert "rw" in root.options and "ro" in MOUNTS[1206].options
    assert MOUNTS[1203].source == "shm"
    assert (MOUNTS[1213].root, MOUNTS[1213].point) == ("/srv/my data", "/mnt/my data")  # octal escapes
    assert parse_mountinfo("garbage\n1 2 3\nx y 0:1 / / rw - ext4 /dev/x rw\n") == {}


@pytest.mark.parametrize(
    ("mount_id", "mode", "nlink", "ctime", "expected"),
    [
        (1200, REG, 1, SINCE + 5, (True, "writable-layer")),  # written in this container
        (1200, REG, 1, SINCE - 5, (False, "image")),  # the image's
        (1200, DIR, 2, SINCE + 5, (True, "writable-layer")),  # a working directory made here
        (1203, REG, 1, SINCE - 5, (True, "tmpfs")),  # /dev/shm: per pod whatever its times
        (1205, REG, 1, SINCE - 5, (True, "tmpfs")),  # a medium: Memory emptyDir
        (1204, REG, 1, SINCE - 5, (True, "emptydir")),  # an emptyDir on the node's disk
        (1212, REG, 1, SINCE - 5, (True, "emptydir")),  # ... with /var/lib/kubelet on its own disk
        (1206, REG, 1, SINCE + 5, (False, "read-only")),  # a ConfigMap (the configuration digest's)
        (1207, REG, 1, SINCE + 5, (False, "read-only")),  # a projected service account token
        (1214, REG, 1, SINCE + 5, (False, "read-only")),
        (1208, REG, 1, SINCE + 5, (False, "volume")),  # hostPath
        (1209, REG, 1, SINCE + 5, (False, "volume")),  # an NFS PVC
        (1210, REG, 1, SINCE + 5, (False, "volume")),  # the kubelet's /etc/hosts
        (1211, REG, 1, SINCE + 5, (False, "volume")),  # a hostPath into the node's tmpfs
        (1201, REG, 1, SINCE + 5, (False, "kernel-fs")),
        (1203, REG, 0, SINCE + 5, (False, "deleted")),  # CRIU's ghost files carry it
        (1203, FIFO, 1, SINCE + 5, (False, "not-a-file")),
        (9999, REG, 1, SINCE + 5, (False, "unknown-mount")),
    ],
)
def test_classify(mount_id: int, mode: int, nlink: int, ctime: float, expected: tuple[bool, str]) -> None:
    d = classify(MOUNTS.get(mount_id), mode=mode, nlink=nlink, ctime=ctime, since=SINCE)
    assert (d.capture, d.kind) == expected, d.why


def test_limit_refusal_names_the_largest() -> None:
    sizes = {"/tmp/a": 700 << 20, "/tmp/b": 500 << 20, "/dev/shm/c": 10, "/tmp/d": 3 << 30}
    assert podfiles.limit_refusal({"/tmp/a": 5}, 5) is None
    why = podfiles.limit_refusal(sizes, 1 << 30, shown=2)
    assert why is not None
    assert why.startswith(
        "the pod files the workload holds open need 4.2 GiB in 4 files, over the limit of 1.0 GiB"
    )
    assert "largest: /tmp/d (3.0 GiB), /tmp/a (700.0 MiB). " in why and "/dev/shm/c" not in why


def test_unix_socket_paths() -> None:
    text = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 613143 /tmp/zmq/ipc sock\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 613144 @abstract\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 613145\n"
    )
    assert podfiles.unix_socket_paths(text) == {613143: "/tmp/zmq/ipc sock"}


def test_ancestors_stop_at_the_mount() -> None:
    assert podfiles.ancestors("/root/.cache/app/journal.log", "/root") == ["/root/.cache", "/root/.cache/app"]
    assert podfiles.ancestors("/app/data/x", "/") == ["/app", "/app/data"]
    assert podfiles.ancestors("/tmp/x", "/tmp") == []


def _index(**change: Any) -> dict[str, Any]:
    f = {"path": "/tmp/a", "file": "podfiles/0", "size": 1, "mode": 0o644, "uid": 0, "gid": 0,
         "atime_ns": 1, "mtime_ns": 1, **change}  # fmt: skip
    return {"format": 1, "files": [f], "dirs": [{"path": "/tmp/d", "mode": 0o755, "uid": 0, "gid": 0}]}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"path": "tmp/a"}, "is not a normal absolute path"),
        ({"path": "/tmp/../etc/passwd"}, "is not a normal absolute path"),
        ({"path": "/"}, "is not a normal absolute path"),
        ({"file": "../manifest.json"}, "is not podfiles/N"),
        ({"file": "podfiles/index.json"}, "is not podfiles/N"),
        ({"uid": -1}, "non-negative integers"),
        ({"size": True}, "non-negative integers"),
        ({"mode": 0o100644}, "more than permission bits"),
    ],
)
def test_index_problem(change: dict[str, Any], problem: str | None) -> None:
    found = podfiles.index_problem(_index(**change))
    assert (found is None) if problem is None else (found is not None and problem in found), found
    assert podfiles.index_problem({"format": 2}) == "unknown format (want 1)"


# --- capture from a live process, and put back -------------------------------------------------

HOLDER = r"""
import mmap, os, socket, sys
held = open(sys.argv[1], "a+b")                     # open, as the journal is
listener = socket.socket(socket.AF_UNIX)            # bound in a directory of its own (ZMQ's ipc://)
listener.bind(os.path.join(sys.argv[3], "..", "sock", "s.sock"))
f = open(sys.argv[2], "rb")
mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # mapped, as a shared object is
f.close()
gone = open(sys.argv[4], "w"); os.unlink(sys.argv[4])  # deleted while open: CRIU's to carry
os.chdir(sys.argv[3])                               # a working directory
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Any:
    """A process holding files made after ``since``, under tmp_path/pod (the root filesystem here)."""
    since = time.time() - 0.1  # file times come from a coarse clock (a tick behind time.time())
    pod = tmp_path / "pod"
    (pod / "cache" / "app").mkdir(parents=True)
    (pod / "lib").mkdir()
    (pod / "work").mkdir()
    (pod / "sock").mkdir(mode=0o710)
    journal, lib = pod / "cache" / "app" / "journal.log", pod / "lib" / "libx.so"
    journal.write_bytes(b"line 1\nline 2\n")
    lib.write_bytes(os.urandom(20000))
    os.chown(journal, 1234, 5678)
    os.chmod(journal, 0o640)
    os.chmod(pod / "cache" / "app", 0o750)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(journal), str(lib), str(pod / "work"), str(pod / "gone")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    os.utime(lib, ns=(1_600_000_000_111_222_333, 1_600_000_000_444_555_666))  # after mapping it read it
    yield proc, since, pod, journal, lib
    proc.kill()
    proc.wait()


needs_root = requires(root("reads other processes' map_files and chowns"))


@needs_root
def test_capture_takes_what_was_written_here_and_puts_it_back(holder: Any, tmp_path: Path) -> None:
    proc, since, pod, journal, lib = holder
    images = tmp_path / "images"
    images.mkdir()
    before = {p: os.stat(p) for p in (journal, lib, pod / "cache" / "app")}
    index = podfiles.capture([proc.pid], images, since=since, limit=1 << 20)
    assert {e["path"] for e in index["files"]} == {str(journal), str(lib)}  # not Python's, not the deleted
    assert index["bytes"] == 14 + 20000 and "deleted" in index["skipped"] and "image" in index["skipped"]
    assert {str(pod / "work"), str(pod / "sock")} <= {d["path"] for d in index["dirs"]}  # cwd, socket's
    on_disk = json.loads((images / "podfiles" / "index.json").read_text())
    assert on_disk["files"] == index["files"]
    # A new pod: none of it is there.
    saved_journal = journal.read_bytes()
    for p in (journal, lib):
        p.unlink()
    (pod / "sock" / "s.sock").unlink()
    for d in (pod / "cache" / "app", pod / "cache", pod / "lib", pod / "work", pod / "sock"):
        d.rmdir()
    put = podfiles.put_back(images)
    assert (put.files, put.bytes) == (2, 14 + 20000)
    assert journal.read_bytes() == saved_journal
    for p, st in before.items():
        now = os.stat(p)
        assert (stat.S_IMODE(now.st_mode), now.st_uid, now.st_gid) == (
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
        )
    assert os.stat(lib).st_mtime_ns == 1_600_000_000_444_555_666
    assert os.stat(lib).st_atime_ns == 1_600_000_000_111_222_333
    assert (pod / "work").is_dir() and stat.S_IMODE(os.stat(pod / "sock").st_mode) == 0o710
    put.undo()  # a restore that failed after this: the cold start gets a fresh pod
    assert not journal.exists() and not lib.exists() and not (pod / "cache").exists()


@needs_root
def test_capture_over_the_limit_copies_nothing(holder: Any, tmp_path: Path) -> None:
    proc, since, _pod, _journal, lib = holder
    with pytest.raises(podfiles.PodFilesTooLarge, match=f"largest: {lib} "):
        podfiles.capture([proc.pid], tmp_path, since=since, limit=1000)
    assert not (tmp_path / "podfiles").exists()


@needs_root
def test_the_action_script_runs_the_capture_as_criu_would(holder: Any, tmp_path: Path) -> None:
    """CRIU execs the script with CRTOOLS_SCRIPT_ACTION and CRTOOLS_INIT_PID in its environment."""
    proc, since, _pod, journal, _lib = holder
    images, reason = tmp_path / "images", tmp_path / "refused"
    images.mkdir()
    script = podfiles.write_action_script(
        tmp_path / "action.sh", images, since=since, limit=1 << 20, reason=reason
    )
    assert os.access(script, os.X_OK) and script.read_text().startswith("#!/bin/sh\n")

    def run(action: str, limit: int | None = None) -> int:
        if limit is not None:
            podfiles.write_action_script(script, images, since=since, limit=limit, reason=reason)
        env = {**os.environ, "CRTOOLS_SCRIPT_ACTION": action, "CRTOOLS_INIT_PID": str(proc.pid)}
        return subprocess.run([str(script)], env=env, capture_output=True, check=False, timeout=60).returncode

    assert run("pre-dump") == 0 and not (images / "podfiles").exists()  # only post-dump does anything
    assert run("post-dump") == 0
    assert podfiles.summary(images)["files"] == 2 and podfiles.refusal(reason) is None
    assert run("post-dump", limit=10) == podfiles.REFUSED_EXIT
    assert f"largest: {journal.parent.parent.parent}/lib/libx.so" in (podfiles.refusal(reason) or "")


BUNDLE_PROBE = r"""
import subprocess, sys
sys.path.insert(0, sys.argv.pop(1))
from pathlib import Path
from thaw.runtime import podfiles
images, since, pid = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
where, reason = images.parent / "a.sh", images.parent / "r"
script = podfiles.write_action_script(where, images, since=since, limit=1 << 20, reason=reason)
env = {"PATH": "/usr/bin:/bin", "CRTOOLS_SCRIPT_ACTION": "post-dump", "CRTOOLS_INIT_PID": pid}
print(subprocess.run([str(script)], env=env, check=False).returncode, script.read_text().splitlines()[-1])
"""


@pytest.mark.slow
@needs_root
def test_the_action_script_works_from_the_runtime_bundle(holder: Any, tmp_path: Path) -> None:
    """In a pod thaw exec is the bundle's (scripts/build-runtime, at /thaw/rt/bin/thaw): its action
    script runs the bundle's own wrapper, which needs nothing of the workload's image but /bin/sh."""
    proc, since, _pod, journal, lib = holder
    bundle = tmp_path / "rt"
    repo = Path(__file__).resolve().parents[2]
    built = subprocess.run(
        [str(repo / "scripts" / "build-runtime"), str(bundle), "--python", os.path.realpath(sys.executable),
         "--no-criu"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (python,) = (bundle / "python" / "bin").iterdir()
    images = tmp_path / "images"
    images.mkdir()
    out = subprocess.run(
        [str(bundle / "lib" / "ld-linux-x86-64.so.2"), "--library-path", str(bundle / "lib"), str(python),
         "-I", "-S", "-c", BUNDLE_PROBE, str(bundle / "python" / "site"), str(images), repr(since),
         str(proc.pid)],
        capture_output=True, text=True, check=False, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    code, last = out.stdout.strip().split(" ", 1)
    assert code == "0" and last.startswith(f"exec {bundle}/bin/thaw capture-pod-files "), out.stdout
    captured = {e["path"] for e in json.loads((images / "podfiles" / "index.json").read_text())["files"]}
    assert {str(journal), str(lib)} <= captured


def test_put_back_refuses_a_bad_index(tmp_path: Path) -> None:
    (tmp_path / "podfiles").mkdir()
    (tmp_path / "podfiles" / "index.json").write_text(json.dumps(_index(path="/tmp/../x")))
    with pytest.raises(podfiles.PodFilesError, match="not a normal absolute path"):
        podfiles.put_back(tmp_path)
    assert podfiles.put_back(tmp_path / "nothing-here").files == 0  # a snapshot without pod files


def test_the_bundle_runs_its_own_wrapper(tmp_path: Path) -> None:
    pkg = tmp_path / "rt" / "python" / "site" / "thaw"
    pkg.mkdir(parents=True)
    assert podfiles.bundle_wrapper(pkg) is None
    (tmp_path / "rt" / "bin").mkdir()
    (tmp_path / "rt" / "bin" / "thaw").write_text("#!/bin/sh\n")
    (tmp_path / "rt" / "bin" / "thaw").chmod(0o755)
    assert podfiles.bundle_wrapper(pkg) == tmp_path / "rt" / "bin" / "thaw"
    assert podfiles.thaw_command() == [sys.executable, "-m", "thaw"]  # the source tree here


# --- the configuration a replica must share (issue 11.9) ----------------------------------------


def test_relevant_env_drops_per_replica_and_service_links() -> None:
    env = {
        "MODEL": "qwen", "HOSTNAME": "pod-a", "THAW_POD_NAME": "pod-a", "POD_IP": "10.0.0.7",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
        "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443", "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
        "KUBERNETES_PORT_443_TCP_PORT": "443", "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1",
        "REDIS_PORT": "6379",  # no REDIS_SERVICE_HOST: the user's own
    }  # fmt: skip
    assert replica_config.relevant_env(env, ["POD_IP"]) == {"MODEL": "qwen", "REDIS_PORT": "6379"}
    assert replica_config.names_list(" POD_IP,,POD_NAME ") == ["POD_IP", "POD_NAME"]


def _configmap(mount: Path, files: dict[str, str], stamp: str) -> None:
    """The kubelet's atomic writer: ..<stamp>/ with the files, ..data -> it, and key -> ..data/key."""
    (mount / f"..{stamp}").mkdir(parents=True)
    for rel, text in files.items():
        (mount / f"..{stamp}" / rel).parent.mkdir(parents=True, exist_ok=True)
        (mount / f"..{stamp}" / rel).write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(f"..{stamp}")
    tmp.rename(mount / "..data")
    for top in {rel.split("/")[0] for rel in files}:
        if not (mount / top).is_symlink():
            (mount / top).symlink_to(f"..data/{top}")


def test_mount_files_through_visible_names_only_inside(tmp_path: Path) -> None:
    mount = tmp_path / "etc-config"
    _configmap(mount, {"app.yaml": "a: 1\n", "sub/x.json": "{}"}, "2026_01_01_00_00_00.1")
    (tmp_path / "outside").write_text("secret")
    (mount / "escape").symlink_to(tmp_path / "outside")
    files = replica_config.mount_files(str(mount))
    assert sorted(files) == [f"{mount}/app.yaml", f"{mount}/sub/x.json"]  # not ..data, not escape
    assert replica_config.mount_files(str(tmp_path / "none")) == {str(tmp_path / "none"): "missing"}
    assert list(replica_config.mount_files(f"{mount}/app.yaml")) == [f"{mount}/app.yaml"]  # a subPath


def test_configuration_over_the_caps_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "m"
    _configmap(mount, {f"k{i}": "v" for i in range(5)}, "1")
    monkeypatch.setattr(replica_config, "MAX_FILES", 4)
    with pytest.raises(replica_config.ConfigError, match="more than 4 files"):
        replica_config.record({"THAW_CONFIG_MOUNTS": str(mount)})


def test_a_replica_with_other_configuration_is_named_never_valued(tmp_path: Path) -> None:
    mount = tmp_path / "cfg"
    _configmap(mount, {"app.yaml": "model: a\n", "token": "s3cret-1"}, "1")
    env = {"MODEL": "qwen-7b", "API_KEY": "k-1", "POD_NAME": "a", "HOSTNAME": "a",
           "THAW_REPLICA_ENV": "POD_NAME", "THAW_CONFIG_MOUNTS": str(mount)}  # fmt: skip
    recorded = replica_config.record(env)
    assert "k-1" not in json.dumps(recorded) and "s3cret" not in json.dumps(recorded)
    assert replica_config.differences(recorded, {**env, "POD_NAME": "b", "HOSTNAME": "b"}) is None
    assert replica_config.differences(None, env) is None  # a snapshot from before the record
    why = replica_config.differences(recorded, {**env, "API_KEY": "k-2", "NEW": "1"})
    differs = "this replica's configuration differs from the snapshot's:"
    assert why == f"{differs} environment API_KEY (changed), NEW (only here)"
    # The Secret rotated: the kubelet swaps ..data to a new directory.
    (mount / "..data").unlink()
    _configmap(mount, {"app.yaml": "model: a\n", "token": "s3cret-2"}, "2")
    why = replica_config.differences(recorded, env)
    assert why == f"{differs} files {mount}/token (changed)"
    # A per-replica name the webhook adds later is left out on both sides.
    assert (
        replica_config.differences(recorded, {**env, "THAW_REPLICA_ENV": "POD_NAME,API_KEY", "API_KEY": "x"})
        == why
    )


# --- the wrapper's stdout/stderr (issue 10.6) ----------------------------------------------------


@pytest.mark.parametrize(
    ("target", "tty", "here", "name"),
    [
        ("pipe:[123]", False, True, "pipe:[123]"),
        ("socket:[9]", False, True, "socket:[9]"),
        ("/var/log/app.log", False, True, "var/log/app.log"),
        ("/dev/null", False, True, "dev/null"),
        ("/dev/pts/3", True, True, "tty[8803:19]"),
        ("/var/log/app.log", False, False, "file[1b:2a]"),  # opened outside the container
        ("/var/log/old.log (deleted)", False, True, ""),
        ("anon_inode:[eventfd]", False, True, ""),
    ],
)
def test_stdio_resource(target: str, tty: bool, here: bool, name: str) -> None:
    got = criu.stdio_resource(target, is_tty=tty, rdev=0x8803, dev=0x19, ino=0x2A, mnt_id=27, mnt_here=here)
    assert got == name


def test_the_dump_marks_terminals_and_outside_files_external() -> None:
    stdio = {"1": "tty[8803:19]", "2": "file[1b:2a]"}
    assert criu.externals(stdio) == ["file[1b:2a]", "tty[8803:19]"]
    assert criu.externals({"1": "pipe:[5]", "2": "var/log/x"}) == []
    args = criu.dump_args(
        "criu",
        1,
        Path("/i"),
        Path("/w"),
        criu.CriuOptions(),
        action_script=Path("/w/a.sh"),
        externals=["tty[1:2]"],
    )
    assert args[args.index("--action-script") + 1] == "/w/a.sh"
    assert args[args.index("--external") + 1] == "tty[1:2]"


def test_inherit_list_rebinds_every_kind_once() -> None:
    fds = {1: 10, 2: 11}
    assert inherit_list({"1": "var/log/x", "2": "var/log/x"}, fds) == [(10, "var/log/x")]
    assert inherit_list({"1": "tty[8803:19]", "2": "dev/null"}, fds) == [
        (10, "tty[8803:19]"),
        (11, "dev/null"),
    ]
    assert inherit_list({"1": "/var/log/x", "2": ""}, fds) == [(10, "var/log/x")]  # a snapshot from before
