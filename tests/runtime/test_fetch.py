"""``thaw fetch`` through the real CLI: every outcome is a plan, exit 0, and nothing half-written."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.runtime.snapshots import FACTS, THAW, World, cache_entries, facts, read_json, thaw
from thaw.contract.manifest import compute_id, dump_manifest, hex_of, sign_manifest
from thaw.contract.plan import read_plan
from thaw.snapshot.store import DirectoryStore, publish

MIB = 1024 * 1024


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.setup_keys()
    return w


def small(world: World, tag: str = "a") -> Path:
    return world.images(tag, {"core-1.img": f"core {tag}".encode(), "pages-1.img": os.urandom(200_000)})


def no_partial_snapshot(world: World) -> None:
    """Only whole snapshots (with their manifest) ever carry a snapshot's name in the cache."""
    for d in world.cache.glob("*/*"):
        if d.is_dir() and not d.name.startswith("."):
            assert (d / "manifest.json").is_file(), d


def test_restore_plan_and_a_root_only_copy(world: World) -> None:
    images = small(world)
    sid = world.publish(images)
    plan = world.fetch()
    assert plan["action"] == "restore", plan
    assert plan["snapshot"] == sid
    path = Path(plan["path"])
    assert path == world.cache / "demo" / hex_of(sid) and path.is_absolute()
    for f in ("core-1.img", "pages-1.img"):
        assert (path / f).read_bytes() == (images / f).read_bytes()
        assert stat.S_IMODE((path / f).stat().st_mode) == 0o600
    for d in (world.cache, world.cache / "demo", path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert read_json(path / "manifest.json")["id"] == sid
    assert "sha256 verified" in plan["_stderr"]
    again = world.fetch()  # already cached: no copy
    assert again["path"] == plan["path"] and "copied" not in again["_stderr"]


def test_newest_compatible_snapshot_of_the_workload_wins(world: World) -> None:
    world.publish(small(world, "old"))
    other_node = world.publish(small(world, "h200"), f=facts(gpu={"product": "NVIDIA-H200", "count": 8}))
    world.publish(small(world, "w2"), workload="w2")
    newest = world.publish(small(world, "new"))
    plan = world.fetch()
    assert plan["snapshot"] == newest
    assert world.fetch(f=facts(gpu={"product": "NVIDIA-H200", "count": 8}))["snapshot"] == other_node


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
    out = thaw(*args)
    assert out.returncode == 0, out.stderr
    plan = read_json(world.plan)
    assert plan["action"] == "cold" and needle in plan["reason"], plan
    assert f"cold start: {plan['reason']}" in out.stderr
    if setup == "driver":
        assert "driver 580.159.04 here vs 550.54.15 in the snapshot" in plan["reason"]
    assert not any(p.is_dir() and not p.name.startswith(".") for p in world.cache.glob("*/*"))


def test_tampered_file_is_refused_and_leaves_nothing(world: World) -> None:
    sid = world.publish(small(world))
    victim = world.store / "demo" / hex_of(sid) / "pages-1.img"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    plan = world.fetch()
    assert plan["action"] == "cold"
    assert plan["reason"].startswith("digest mismatch:") and "pages-1.img" in plan["reason"]
    assert cache_entries(world.cache) == ["demo", f"demo/{hex_of(sid)}.fetch"]  # only the (free) lock file


def test_a_tampered_newest_falls_back_to_an_older_verified_snapshot(world: World) -> None:
    good = world.publish(small(world, "old"))
    bad = world.publish(small(world, "new"))
    (world.store / "demo" / hex_of(bad) / "core-1.img").write_bytes(b"evil")
    plan = world.fetch()
    assert plan["snapshot"] == good
    assert f"not restoring {bad}: digest mismatch" in plan["_stderr"]


def test_bad_signature_is_refused(world: World) -> None:
    sid = world.publish(small(world))
    src = world.store / "demo" / hex_of(sid)
    m = read_json(src / "manifest.json")
    m["created"] = "2099-01-01T00:00:00.000000Z"  # newer, re-addressed, but the signature is the old one
    m["id"] = compute_id(m)
    dst = world.store / "demo" / hex_of(m["id"])
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_bytes(dump_manifest(m))
    plan = world.fetch()
    # The forged one is refused; the genuine older one is restored.
    assert plan["snapshot"] == sid
    assert "bad signature" in plan["_stderr"]
    shutil.rmtree(src)
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("bad signature:"), plan
    assert "does not verify" in plan["reason"]


def test_unsigned_refused_then_accepted_with_the_flag_or_the_env(world: World) -> None:
    m = publish(DirectoryStore(world.store), "demo", "w1", small(world), None, FACTS)
    plan = world.fetch()
    assert plan["action"] == "cold" and plan["reason"].startswith("unsigned:")
    assert "--allow-unsigned" in plan["reason"]
    assert world.fetch("--allow-unsigned")["snapshot"] == m["id"]
    shutil.rmtree(world.cache)
    assert world.fetch(env={"THAW_ALLOW_UNSIGNED": "1"})["snapshot"] == m["id"]


def test_snapshot_signed_by_an_untrusted_key(world: World) -> None:
    stranger = Ed25519PrivateKey.generate()
    m = sign_manifest(publish(DirectoryStore(world.store), "demo", "w1", small(world), None, FACTS), stranger)
    (world.store / "demo" / hex_of(m["id"]) / "manifest.json").write_bytes(dump_manifest(m))
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
         "import sys; from pathlib import Path; from thaw.snapshot.cache import in_use\n"
         "with in_use(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()",
         first["path"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        plan = world.fetch("--budget", budget, name="bbb")
        assert (
            plan["action"] == "cold" and "1 cached snapshot(s) in use could not be evicted" in plan["reason"]
        )
        assert Path(first["path"], "manifest.json").is_file()
    finally:
        holder.communicate("")
    plan = world.fetch("--budget", budget, name="bbb")
    assert plan["action"] == "restore"
    assert not Path(first["path"]).exists()  # least recently used, no longer in use: evicted


def _fifo_world(world: World, size: int) -> tuple[str, Path, bytes]:
    """A published snapshot whose big file in the store is replaced by a FIFO the test feeds: the
    test decides when the copy stalls, and a second read of the file would hang (so: one copy)."""
    payload = os.urandom(size)
    sid = world.publish(world.images("fifo", {"core-1.img": b"core", "pages-1.img": payload}))
    fifo = world.store / "demo" / hex_of(sid) / "pages-1.img"
    fifo.unlink()
    os.mkfifo(fifo, 0o600)
    return sid, fifo, payload


def _wait_for_temp_bytes(world: World, proc: subprocess.Popen[str], at_least: int) -> Path:
    while True:
        assert proc.poll() is None, proc.communicate()
        for f in world.cache.glob("demo/.tmp-*/pages-1.img"):
            if f.stat().st_size >= at_least:
                return f.parent
        threading.Event().wait(0.005)


def test_interrupted_copy_is_never_used_and_the_next_fetch_recovers(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    proc = subprocess.Popen([THAW, *map(str, world.fetch_args())], stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        tmp = _wait_for_temp_bytes(world, proc, 4 * MIB)
        proc.send_signal(signal.SIGKILL)  # the node lost power, the init container was OOM-killed...
        proc.communicate()
    assert read_plan(world.plan)["action"] == "cold"  # no plan: thaw exec cold-starts
    assert tmp.exists()
    assert not (world.cache / "demo" / hex_of(sid)).exists()
    no_partial_snapshot(world)
    inv = thaw(
        "agent", "--cache", world.cache, "--budget", "1000000000", "--facts", world.facts_file(), "--once"
    )
    assert orjson.loads(orjson.loads(inv.stdout)["thaw.dev/cache"])["snapshots"] == []  # never advertised
    assert not tmp.exists()  # the agent cleaned the dead fetch's temp (its fetch lock was free)

    fifo.unlink()
    fifo.write_bytes(payload)
    proc = subprocess.Popen([THAW, *map(str, world.fetch_args())], stderr=subprocess.PIPE, text=True)
    proc.communicate(timeout=60)
    plan = read_plan(world.plan)
    assert plan.get("snapshot") == sid
    assert Path(plan["path"], "pages-1.img").read_bytes() == payload
    assert not list(world.cache.glob("demo/.tmp-*"))


def test_a_killed_fetch_is_recovered_by_the_next_fetch_alone(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    proc = subprocess.Popen([THAW, *map(str, world.fetch_args())], stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        _wait_for_temp_bytes(world, proc, 4 * MIB)
        proc.kill()
        proc.communicate()
    fifo.unlink()
    fifo.write_bytes(payload)
    plan = world.fetch()
    assert plan["snapshot"] == sid and "interrupted fetch" in plan["_stderr"]
    assert not list(world.cache.glob("demo/.tmp-*"))


def test_two_concurrent_fetches_copy_once_and_both_restore(world: World) -> None:
    sid, fifo, payload = _fifo_world(world, 12 * MIB)
    args_a = world.fetch_args()
    args_b = list(args_a)
    plan_b = world.root / "plan-b" / "plan.json"
    args_b[args_b.index("--plan") + 1] = plan_b
    a = subprocess.Popen([THAW, *map(str, args_a)], stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as w:
        w.write(payload[: 6 * MIB])
        w.flush()
        _wait_for_temp_bytes(world, a, 4 * MIB)
        b = subprocess.Popen([THAW, *map(str, args_b)], stderr=subprocess.PIPE, text=True)
        assert b.stderr is not None
        for line in b.stderr:  # b reaches the fetch lock and waits for a
            if "is staging it here; waiting" in line:
                break
        else:
            pytest.fail("second fetch never waited for the first")
        w.write(payload[6 * MIB :])
    a.communicate(timeout=60)
    b.communicate(timeout=60)  # had b opened the FIFO again it would hang here: one copy only
    pa, pb = read_plan(world.plan), read_plan(plan_b)
    assert pa["action"] == pb["action"] == "restore"
    assert pa["path"] == pb["path"] and pa["snapshot"] == pb["snapshot"] == sid
    assert Path(pa["path"], "pages-1.img").read_bytes() == payload
    assert [p.name for p in (world.cache / "demo").iterdir() if p.is_dir()] == [hex_of(sid)]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real filesystem that runs out of room (and a cache in node memory)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False
        ).returncode
    ):
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_cache_full_when_the_disk_cannot_hold_it_and_memory_tier(world: World, small_tmpfs: Path) -> None:
    world.publish(world.images("big", {"pages-1.img": os.urandom(2 * MIB)}), name="big")
    args = world.fetch_args(name="big")
    args[args.index("--cache") + 1] = small_tmpfs
    out = thaw(*args)
    plan = read_json(world.plan)
    assert out.returncode == 0 and plan["action"] == "cold", plan
    assert plan["reason"].startswith("cache full:") and "free on the filesystem" in plan["reason"]
    assert not list(small_tmpfs.glob("big/*/"))
    inv = thaw("agent", "--cache", small_tmpfs, "--budget", "1000", "--facts", world.facts_file(), "--once")
    assert orjson.loads(orjson.loads(inv.stdout)["thaw.dev/cache"])["free_bytes"] == 0
