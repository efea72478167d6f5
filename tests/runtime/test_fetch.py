"""``thaw fetch`` through the real CLI: every outcome is a plan, exit 0, nothing half-written, and
nothing a store, a cache or a co-tenant does can hang it (issue 11.3, 11.4)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.needs import require, root
from tests.runtime.snapshots import FACTS, REPO, World, cache_entries, facts, flock_held
from thaw.contract.facts import read_facts_file
from thaw.contract.manifest import compute_id, dump_manifest, hex_of, load_manifest, sign_manifest
from thaw.contract.plan import read_plan
from thaw.contract.signing import load_private_key
from thaw.dev.sandbox import read_json, thaw_cli, thaw_command, thaw_env
from thaw.snapshot.store import DirectoryStore, publish

MIB = 1024 * 1024
UID = "5d3c1a2b-9f8e-4d7c-8b6a-0f1e2d3c4b5a"


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.setup_keys()
    return w


def small(world: World, tag: str = "a") -> Path:
    return world.images(tag, {"core-1.img": f"core {tag}".encode(), "pages-1.img": os.urandom(200_000)})


def snapdir(world: World, sid: str, name: str = "demo") -> Path:
    return world.store / "default" / name / hex_of(sid)


def no_partial_snapshot(world: World) -> None:
    """Only whole snapshots (with their manifest) ever carry a snapshot's name in the cache."""
    for d in world.cache.glob("*/*/*"):
        if d.is_dir() and not d.name.startswith("."):
            assert (d / "manifest.json").is_file(), d


def test_restore_plan_a_root_only_copy_facts_and_a_pin(world: World) -> None:
    images = small(world)
    sid = world.publish(images)
    plan = world.fetch(env={"THAW_POD_UID": UID})
    assert plan["action"] == "restore", plan
    assert plan["snapshot"] == sid
    path = Path(plan["path"])
    assert path == world.cache / "default" / "demo" / hex_of(sid) and path.is_absolute()
    for f in ("core-1.img", "pages-1.img"):
        assert (path / f).read_bytes() == (images / f).read_bytes()
        assert stat.S_IMODE((path / f).stat().st_mode) == 0o600
    for d in (world.cache, world.cache / "default", world.cache / "default" / "demo", path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert read_json(path / "manifest.json")["id"] == sid
    assert (path / ".signer.pub").read_bytes() == (world.keys / "signing.pub").read_bytes()
    assert "sha256 verified" in plan["_stderr"]
    # The facts it used, beside the plan, for every Thaw container of the pod.
    assert read_facts_file(world.plan.parent / "facts.json") == FACTS
    # Pinned for the pod until its thaw exec holds it.
    assert (path.parent / f"{path.name}.pin-{UID}").is_file()
    again = world.fetch()  # already cached: no copy
    assert again["path"] == plan["path"] and "copied" not in again["_stderr"]


def test_snapshots_are_per_namespace(world: World) -> None:
    sid = world.publish(small(world), namespace="team-a")
    assert world.fetch(namespace="team-b")["reason"].startswith("no snapshot")
    plan = world.fetch(namespace="team-a")
    assert plan["snapshot"] == sid and plan["path"] == str(world.cache / "team-a" / "demo" / hex_of(sid))


def test_newest_compatible_snapshot_of_the_workload_wins(world: World) -> None:
    world.publish(small(world, "old"))
    other_node = world.publish(small(world, "h200"), f=facts(gpu={"product": "NVIDIA-H200", "count": 8}))
    world.publish(small(world, "w2"), workload="w2")
    newest = world.publish(small(world, "new"))
    plan = world.fetch()
    assert plan["snapshot"] == newest
    assert world.fetch(f=facts(gpu={"product": "NVIDIA-H200", "count": 8}))["snapshot"] == other_node


def _forge(world: World, sid: str, created: str, stored_at: float | None = None) -> str:
    """What a replica holding the signing key could publish (issue 11.3): a copy of a snapshot with
    the ``created`` it likes, re-signed with the real key."""
    src = snapdir(world, sid)
    m = load_manifest(src / "manifest.json")
    m["created"] = created
    m["id"] = compute_id(m)
    m = sign_manifest(m, load_private_key(world.keys / "signing.key"))
    dst = snapdir(world, m["id"])
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_bytes(dump_manifest(m))
    if stored_at is not None:
        os.utime(dst / "manifest.json", (stored_at, stored_at))
    return str(m["id"])


def test_a_forged_future_created_never_wins(world: World) -> None:
    """Issue 11.3: fetch picked the newest by the signer-chosen ``created``: a manifest with
    created 9999-12-31 beat a legitimate later one."""
    first = world.publish(small(world, "first"))
    forged = _forge(world, first, "9999-12-31T23:59:59.000000Z")
    later = world.publish(small(world, "later"))
    plan = world.fetch()
    assert plan["snapshot"] == later, plan
    assert f"not restoring {forged}: created 9999-12-31" in plan["_stderr"]
    # Within the clock-skew allowance but stored before the legitimate one: the store's time rules.
    shutil.rmtree(snapdir(world, forged))
    soon = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() + 200))
    early = _forge(world, first, soon, stored_at=time.time() - 3600)
    assert world.fetch()["snapshot"] == later
    # Only future ones: cold, and why.
    for sid in (first, later, early):
        shutil.rmtree(snapdir(world, sid))
    base = world.publish(small(world, "base"))
    _forge(world, base, "9999-12-31T23:59:59.000000Z")
    shutil.rmtree(snapdir(world, base))
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("malformed manifest: created in the future")


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("nothing", "no snapshot: none published under 'demo'"),
        ("workload", "no snapshot for this workload"),
        ("driver", "incompatible: 1 snapshot(s) of demo for this workload, none taken on a node like this"),
        ("unreadable-store", "store unreadable"),
        ("bad-facts", "node facts:"),
    ],
)
def test_cold_reasons(world: World, setup: str, needle: str) -> None:
    f = FACTS
    if setup == "nothing":
        world.store.mkdir()
    elif setup == "workload":
        world.publish(small(world), workload="other")
    elif setup == "driver":
        world.publish(small(world), f=facts(driver="550.54.15"))
    elif setup == "unreadable-store":
        world.store.write_text("not a directory")
    args = world.fetch_args(f=f)
    if setup == "bad-facts":
        bad = world.root / "bad-facts.json"
        bad.write_text('{"arch": "x86_64"}')
        args[args.index("--facts") + 1] = bad
    out = thaw_cli(*args)
    assert out.returncode == 0, out.stderr
    plan = read_json(world.plan)
    assert plan["action"] == "cold" and needle in plan["reason"], plan
    assert f"cold start: {plan['reason']}" in out.stderr
    if setup == "driver":
        assert "driver 580.159.04 here vs 550.54.15 in the snapshot" in plan["reason"]
    assert not any(p.is_dir() and not p.name.startswith(".") for p in world.cache.glob("*/*/*"))


def test_tampered_file_is_refused_and_leaves_nothing(world: World) -> None:
    sid = world.publish(small(world))
    victim = snapdir(world, sid) / "pages-1.img"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    plan = world.fetch()
    assert plan["action"] == "cold"
    assert plan["reason"].startswith("digest mismatch:") and "pages-1.img" in plan["reason"]
    assert cache_entries(world.cache) == ["default", "default/demo", f"default/demo/{hex_of(sid)}.fetch"]


def test_a_tampered_newest_falls_back_to_an_older_verified_snapshot(world: World) -> None:
    good = world.publish(small(world, "old"))
    bad = world.publish(small(world, "new"))
    (snapdir(world, bad) / "core-1.img").write_bytes(b"evil")
    plan = world.fetch()
    assert plan["snapshot"] == good
    assert f"not restoring {bad}: digest mismatch" in plan["_stderr"]


def test_bad_signature_is_refused(world: World) -> None:
    sid = world.publish(small(world))
    src = snapdir(world, sid)
    m = load_manifest(src / "manifest.json")
    # Newer, re-addressed, but the signature is the old one.
    m["created"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() + 60))
    m["id"] = compute_id(m)
    dst = snapdir(world, m["id"])
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_bytes(dump_manifest(m))
    plan = world.fetch()
    # The forged one is refused (it is the newest by store time); the genuine older one is restored.
    assert plan["snapshot"] == sid
    assert "bad signature" in plan["_stderr"]
    shutil.rmtree(src)
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("bad signature:"), plan
    assert "does not verify" in plan["reason"]


def test_unsigned_refused_then_accepted_with_the_flag_or_the_env_but_never_advertised(world: World) -> None:
    m = publish(DirectoryStore(world.store), "demo", "w1", small(world), None, FACTS)
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("unsigned:")
    assert "--allow-unsigned" in plan["reason"]
    plan = world.fetch("--allow-unsigned")
    assert plan["snapshot"] == m["id"]
    assert not Path(plan["path"], ".signer.pub").exists()  # nothing vouches for it: not advertised
    shutil.rmtree(world.cache)
    assert world.fetch(env={"THAW_ALLOW_UNSIGNED": "1"})["snapshot"] == m["id"]


def test_snapshot_signed_by_an_untrusted_key(world: World) -> None:
    stranger = Ed25519PrivateKey.generate()
    m = sign_manifest(publish(DirectoryStore(world.store), "demo", "w1", small(world), None, FACTS), stranger)
    (snapdir(world, m["id"]) / "manifest.json").write_bytes(dump_manifest(m))
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("untrusted:")
    assert m["signature"]["key_id"] in plan["reason"]


def test_cache_full_when_the_budget_cannot_hold_it(world: World) -> None:
    world.publish(small(world))
    plan = world.fetch("--budget", "1000")
    assert plan["action"] == "cold" and plan["reason"].startswith("cache full:")
    assert "budget 1000 bytes" in plan["reason"]
    no_partial_snapshot(world)


def test_lru_makes_room_but_never_evicts_a_snapshot_in_use(world: World) -> None:
    a = world.publish(small(world, "a"), name="aaa")
    world.publish(small(world, "b"), name="bbb")
    budget = "300000"  # room for one 200 kB snapshot
    first = world.fetch("--budget", budget, name="aaa")
    assert first["snapshot"] == a
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from thaw.snapshot.cache import hold_verified\n"
         "with hold_verified(Path(sys.argv[1]), sys.argv[2], time.monotonic() + 5):\n"
         "    print('held', flush=True); sys.stdin.read()",
         first["path"], a],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        plan = world.fetch("--budget", budget, name="bbb")
        assert plan["action"] == "cold" and "1 cached snapshot(s) in use or pinned" in plan["reason"]
        assert Path(first["path"], "manifest.json").is_file()
    finally:
        holder.communicate("")
    plan = world.fetch("--budget", budget, name="bbb")
    assert plan["action"] == "restore"
    assert not Path(first["path"]).exists()  # least recently used, no longer in use: evicted


# --- nothing hangs fetch (issue 11.4) -------------------------------------------------------------


def fetch_within(world: World, *extra: str, seconds: float = 60) -> dict[str, object]:
    """The CLI fetch, failing the test (not hanging the run) when it takes longer than ``seconds``."""
    world.plan.unlink(missing_ok=True)
    t = time.monotonic()
    out = thaw_cli(*world.fetch_args(), *extra, timeout=seconds)
    assert out.returncode == 0, out.stderr
    plan: dict[str, object] = read_json(world.plan)
    plan["_stderr"], plan["_seconds"] = out.stderr, time.monotonic() - t
    return plan


def test_a_fifo_or_symlink_in_the_store_never_hangs_fetch(world: World) -> None:
    good = world.publish(small(world, "good"))
    newer = world.publish(small(world, "newer"))
    fifo_manifest = snapdir(world, newer) / "manifest.json"
    data = fifo_manifest.read_bytes()
    fifo_manifest.unlink()
    os.mkfifo(fifo_manifest)
    plan = fetch_within(world)
    assert plan["snapshot"] == good
    # A FIFO as an image file of the chosen snapshot: refused at open, the older one is not better.
    fifo_manifest.unlink()
    fifo_manifest.write_bytes(data)
    (snapdir(world, newer) / "pages-1.img").unlink()
    os.mkfifo(snapdir(world, newer) / "pages-1.img")
    (snapdir(world, good) / "core-1.img").unlink()
    (snapdir(world, good) / "core-1.img").symlink_to("/dev/zero")
    shutil.rmtree(world.cache)
    plan = fetch_within(world)
    assert plan["action"] == "cold", plan
    assert "store unreadable" in str(plan["reason"]) and "FIFO" in str(plan["_stderr"])
    assert "symlink" in str(plan["_stderr"])
    no_partial_snapshot(world)


def test_a_fifo_as_manifest_in_the_cache_never_hangs_fetch(world: World) -> None:
    """Issue 11.4: a FIFO pre-placed as the cached copy's manifest.json hung fetch."""
    sid = world.publish(small(world))
    poisoned = world.cache / "default" / "demo" / hex_of(sid)
    poisoned.mkdir(parents=True)
    os.mkfifo(poisoned / "manifest.json")
    plan = fetch_within(world)
    assert plan["snapshot"] == sid  # not a whole snapshot: evicted, and staged again
    assert read_json(poisoned / "manifest.json")["id"] == sid


def test_a_cotenant_holding_the_fetch_lock_cannot_hang_fetch(world: World) -> None:
    """Issue 11.4: a co-tenant holding the ``.fetch`` flock kept fetch in Init past 10 s."""
    sid = world.publish(small(world))
    lock = world.cache / "default" / "demo" / f"{hex_of(sid)}.fetch"
    lock.parent.mkdir(parents=True)
    lock.touch()
    with flock_held(lock):  # as a co-tenant could through its read-only mount
        plan = fetch_within(world, "--deadline", "3", seconds=30)
    assert plan["action"] == "cold" and str(plan["reason"]).startswith("cache busy:"), plan
    assert float(str(plan["_seconds"])) < 20
    no_partial_snapshot(world)
    assert not list(world.cache.glob("default/demo/.tmp-*"))
    assert fetch_within(world)["snapshot"] == sid  # released: staged as usual


HANGING = """
import sys, time
from pathlib import Path
import thaw.snapshot.fetch as f
from thaw.cli import build_parser
from thaw.snapshot.cache import name_dir, temp_dir

def hang(store, cache, name, *a, **kw):
    kw["on_phase"]("copying into the cache (a store that stopped answering)")
    with temp_dir(name_dir(cache, "default", name)):
        time.sleep(3600)

f.fetch = hang
sys.exit(f.run(build_parser().parse_args(sys.argv[1:])))
"""


def test_the_overall_deadline_ends_a_fetch_that_never_returns(world: World) -> None:
    """Whatever blocks (a store that stops answering mid-read, an NFS server gone): past the
    deadline the plan is cold with what fetch was doing, and its temporary copy is gone."""
    world.publish(small(world))
    t = time.monotonic()
    out = thaw_cli(*world.fetch_args(), "--deadline", "2", thaw=[sys.executable, "-c", HANGING], timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t < 30
    plan = read_plan(world.plan)
    assert plan["action"] == "cold"
    assert plan.get("reason", "").startswith("deadline: thaw fetch did not finish within 2 s (it was copying")
    assert read_facts_file(world.plan.parent / "facts.json") == FACTS
    assert not list(world.cache.glob("default/demo/.tmp-*"))


# --- interrupted copies ---------------------------------------------------------------------------


def _fifo_world(world: World, size: int) -> tuple[str, Path, bytes]:
    """A published snapshot and a FIFO the test feeds in place of its big file (tests/runtime/
    stalled_fetch.py): the test decides when the copy stalls, and a second read would hang."""
    payload = os.urandom(size)
    sid = world.publish(world.images("fifo", {"core-1.img": b"core", "pages-1.img": payload}))
    fifo = world.root / "pages.fifo"
    os.mkfifo(fifo, 0o600)
    return sid, fifo, payload


def _stalled(world: World, fifo: Path, plan: Path | None = None) -> subprocess.Popen[str]:
    args = [world.store, world.cache, world.trust, plan or world.plan, world.facts_for(FACTS), fifo]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.stalled_fetch", *map(str, args)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def _wait_for_temp_bytes(world: World, proc: subprocess.Popen[str], at_least: int) -> Path:
    while True:
        assert proc.poll() is None, proc.communicate()
        for f in world.cache.glob("default/demo/.tmp-*/pages-1.img"):
            if f.stat().st_size >= at_least and _written(f) >= at_least:
                return f.parent
        threading.Event().wait(0.005)


def _written(f: Path) -> int:
    """Bytes actually written (the file is preallocated to its full size)."""
    data = f.read_bytes()
    return len(data.rstrip(b"\0"))


def test_interrupted_copy_is_never_used_and_the_next_fetch_recovers(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    proc = _stalled(world, fifo)
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        tmp = _wait_for_temp_bytes(world, proc, 4 * MIB)
        proc.send_signal(signal.SIGKILL)  # the node lost power, the init container was OOM-killed...
        proc.communicate()
    assert read_plan(world.plan)["action"] == "cold"  # no plan: thaw exec cold-starts
    assert tmp.exists()
    assert not (world.cache / "default" / "demo" / hex_of(sid)).exists()
    no_partial_snapshot(world)
    inv = thaw_cli(
        "agent", "--cache", world.cache, "--budget", "1000000000", "--facts", world.facts_file(), "--once"
    )
    assert orjson.loads(orjson.loads(inv.stdout)["thaw.dev/cache"])["snapshots"] == []  # never advertised
    assert not tmp.exists()  # the agent cleaned the dead fetch's temp (its flock was free)
    plan = world.fetch()
    assert plan.get("snapshot") == sid
    assert Path(plan["path"], "pages-1.img").read_bytes() == payload
    assert not list(world.cache.glob("default/demo/.tmp-*"))


def test_a_killed_fetch_is_recovered_by_the_next_fetch_alone(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    proc = _stalled(world, fifo)
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        _wait_for_temp_bytes(world, proc, 4 * MIB)
        proc.kill()
        proc.communicate()
    plan = world.fetch()
    assert plan["snapshot"] == sid and "interrupted fetch" in plan["_stderr"]
    assert not list(world.cache.glob("default/demo/.tmp-*"))


def test_two_concurrent_fetches_copy_once_and_both_restore(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    a = _stalled(world, fifo)
    plan_b = world.root / "plan-b" / "plan.json"
    args_b = world.fetch_args()
    args_b[args_b.index("--plan") + 1] = plan_b
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        _wait_for_temp_bytes(world, a, 4 * MIB)
        b = subprocess.Popen(
            [*thaw_command(), *map(str, args_b)], stderr=subprocess.PIPE, text=True, env=thaw_env()
        )
        assert b.stderr is not None
        for line in b.stderr:  # b reaches the fetch lock and waits for a
            if "is staging it here; waiting" in line:
                break
        else:
            pytest.fail("second fetch never waited for the first")
        w.write(payload[6 * MIB :])
    a.communicate(timeout=60)
    _, err_b = b.communicate(timeout=60)
    assert "copied" not in err_b  # b found it staged: one copy
    pa, pb = read_plan(world.plan), read_plan(plan_b)
    assert pa["action"] == pb["action"] == "restore"
    assert pa["path"] == pb["path"] and pa["snapshot"] == pb["snapshot"] == sid
    assert Path(pa["path"], "pages-1.img").read_bytes() == payload
    assert [p.name for p in (world.cache / "default" / "demo").iterdir() if p.is_dir()] == [hex_of(sid)]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real filesystem that runs out of room (and a cache in node memory)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    require(root("mounts a tmpfs"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_cache_full_when_the_disk_cannot_hold_it_and_memory_tier(world: World, small_tmpfs: Path) -> None:
    world.publish(world.images("big", {"pages-1.img": os.urandom(2 * MIB)}), name="big")
    args = world.fetch_args(name="big")
    args[args.index("--cache") + 1] = small_tmpfs
    out = thaw_cli(*args)
    plan = read_json(world.plan)
    assert out.returncode == 0 and plan["action"] == "cold", plan
    assert plan["reason"].startswith("cache full:") and "free on the filesystem" in plan["reason"]
    assert not list(small_tmpfs.glob("default/big/*/"))
    inv = thaw_cli(
        "agent", "--cache", small_tmpfs, "--budget", "1000", "--facts", world.facts_file(), "--once"
    )
    assert orjson.loads(orjson.loads(inv.stdout)["thaw.dev/cache"])["free_bytes"] == 0
