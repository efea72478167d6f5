"""One snapshot's life in the GPU benchmarks, measured the same way for every workload (the
transformers server, the stand-in and its levers, the compatibility matrix), with the runtime pods
get (bench/gpu/bundle.py) in fresh-container pods (bench/gpu/harness.py):

1. checkpoint pod: a cold start with ``--checkpoint on-ready``; the server's answer before and after
   its checkpoint is the reference every restore must match;
2. miss (issue 16.2): ``thaw fetch`` into another node's empty cache, timed, then a restore right
   away (the image as the fetch left it in page cache): what a node that must fetch first gives;
3. hits: the same snapshot restored from disk (page cache dropped), from page cache, and from a
   tmpfs cache (the ``memory`` tier), each beside the storage bound of what it reads (image bytes /
   that tier's read bandwidth, measured in the same run on the image's own files, issue 12), and
   publish and fetch beside theirs (the same files copied durably beside the store: read from page
   cache, written, fsynced), each as a share of it (``transfer_rates``);
4. cold pod (page cache dropped; the pod's compile caches are fresh as every pod's are).

Standard library and orjson (carried as a wheel to the GPU machine's Python, for thaw.contract); the
pods run Thaw from the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu.bundle import Runtime
from bench.gpu.harness import drop_caches, phase
from thaw.contract.workload import DEFAULT_ENV
from thaw.dev.sandbox import read_json

# What the webhook gives every Thaw pod's workload unless the pod sets it (inductor compiles in the
# server's process, so no compile workers hold the GPU: issue 10.3).
WEBHOOK_ENV = dict(DEFAULT_ENV)
READ_CHUNK = 16 << 20
BANDWIDTH_SAMPLE = 4 << 30  # bytes of the image read per tier: enough for a stable rate, not the whole image


@dataclass
class Suite:
    """Where a suite works and how its pods run."""

    root: Path  # work directory (stores, caches, plans)
    out: Path  # $OUT: results come back from here
    rt: Runtime
    wrap: list[str]  # the pod's capabilities (sandbox.with_caps)
    log: Path  # every pod's stdout, appended
    deadline: float  # time.monotonic() after which optional steps are skipped
    facts: Path | None = None  # --facts for every Thaw command (CPU tests); None: detected
    hard_deadline: float = float("inf")  # no pod may run past it (the command's own limit)
    save: Callable[[], None] | None = None  # writes the suite's results so far (after every phase)
    keys: Path = field(init=False)
    trust: Path = field(init=False)

    def __post_init__(self) -> None:
        self.keys, self.trust = self.root / "keys", self.root / "trust"
        if not (self.keys / "signing.key").exists():
            r = self.rt.cli("keys", "generate", "--out", str(self.keys))
            if r.returncode != 0:
                raise RuntimeError(f"thaw keys generate: {r.stderr[-500:]}")
        self.trust.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.keys / "signing.pub", self.trust / "signing.pub")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def hard_left_s(self) -> float:
        return self.hard_deadline - time.monotonic()

    def pod_timeout(self, wanted: float) -> float:
        """A pod's limit within the hard deadline (a pod may take ~90 s past its own limit to stop)."""
        return max(30.0, min(wanted, self.hard_left_s() - 90.0))

    def saved(self) -> None:
        if self.save is not None:
            self.save()

    def facts_args(self) -> list[str]:
        return ["--facts", str(self.facts)] if self.facts else []


# The current path (stock CRIU, as before the fast-restore build) is every suite's baseline; the new
# path re-runs each tier's hit with the fast-restore CRIU (``life``'s ``variants``), in the same run.
CURRENT_PATH_ENV = {"THAW_CRIU_STOCK": "1"}
NEW_PATH: tuple[tuple[str, dict[str, str]], ...] = (("fast CRIU", {"THAW_CRIU_STOCK": "0"}),)


@dataclass
class Workload:
    """A server as a pod runs it, and the request whose answer is compared."""

    name: str  # snapshot name (DNS-1123 label) and row label
    cmd: list[str]
    port: int
    body: dict[str, Any] | None
    path: str = "/generate"
    ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    checkpoint_flags: list[str] = field(default_factory=list)  # e.g. --sleep/--wake
    timeout: float = 420.0  # one pod's budget
    answer_key: str = "tokens"
    webhook_env: bool = True  # False: the pod's env without the webhook's defaults (as the user wrote it)
    wrap: list[str] = field(default_factory=list)  # more argv before the pod's capabilities (a cgroup)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def ready(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.ready_path}"


def answer(result: dict[str, Any], key: str, which: str = "first") -> Any:
    return (result.get(which) or {}).get(key)


def pod_env(s: Suite, w: Workload, more: dict[str, str] | None = None) -> dict[str, str]:
    """The workload's env in a Thaw pod: the webhook's defaults (unless ``w.webhook_env`` is off),
    the runtime's CRIU, the workload's own."""
    return {**(WEBHOOK_ENV if w.webhook_env else {}), **s.rt.env(), **w.env, **(more or {})}


def _spec(
    s: Suite, w: Workload, name: str, outcome: Path, thaw_args: list[str], **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "url": w.url,
        "body": w.body,
        "health": w.ready,
        "cmd": w.cmd,
        "thaw": list(s.rt.thaw),
        "env": pod_env(s, w),
        "wrap": [*w.wrap, *s.wrap],
        "timeout": s.pod_timeout(w.timeout),
        "request_timeout": 60,
        "outcome": str(outcome),
        "log": str(s.log),
        "thaw_args": thaw_args,
        **extra,
    }


def cold(s: Suite, w: Workload, name: str = "cold") -> dict[str, Any]:
    """A cold start in a fresh pod, page cache dropped first."""
    drop_caches()
    outcome = s.root / w.name / f"pod-{name}" / "outcome.json"
    return phase(_spec(s, w, name, outcome, ["--outcome", str(outcome)]))


def checkpoint(s: Suite, w: Workload, store: Path, cache: Path) -> dict[str, Any]:
    """The checkpoint pod (a cold start, page cache dropped): answers before and after its
    checkpoint; ``result["outcome"]["checkpoint"]`` says how it went."""
    drop_caches()
    outcome = s.root / w.name / "pod-checkpoint" / "outcome.json"
    args = [
        "--checkpoint", "on-ready", "--ready", w.ready, "--store", str(store),
        "--key", str(s.keys / "signing.key"), "--name", w.name, "--workload", f"bench-{w.name}",
        "--outcome", str(outcome), "--cache", str(cache),
        *s.facts_args(), *w.checkpoint_flags,
    ]  # fmt: skip
    return phase(_spec(s, w, "checkpoint", outcome, args, wait_checkpoint=True))


def fetch(s: Suite, w: Workload, store: Path, cache: Path, plan: Path) -> dict[str, Any]:
    """``thaw fetch`` into ``cache`` (another node's), timed."""
    t = time.monotonic()
    r = s.rt.cli(
        "fetch", "--store", str(store), "--cache", str(cache), "--name", w.name,
        "--workload", f"bench-{w.name}", "--trust", str(s.trust), "--plan", str(plan), *s.facts_args(),
    )  # fmt: skip
    seconds = round(time.monotonic() - t, 3)
    return {"fetch_s": seconds, "exit": r.returncode, "plan": read_json(plan), "log": r.stderr[-600:]}


def restore(s: Suite, w: Workload, plan: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A restore in a fresh pod from ``plan``; ``again`` asks a second time. Its work directory is
    the plan's (beside --outcome), so ``<work>/ready`` is watched there."""
    args = ["--plan", str(plan), "--ready", w.ready, "--outcome", str(plan.parent / "outcome.json")]
    spec = _spec(
        s, w, name, plan.parent / "outcome.json", args, again=True, ready_file=str(plan.parent / "ready")
    )
    return phase({**spec, **extra})


# --- storage bounds (issue 12) -------------------------------------------------------------------


def image_files(snapshot_dir: Path) -> list[Path]:
    """The snapshot's regular files, largest first."""
    files = [p for p in snapshot_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(files, key=lambda p: -p.stat().st_size)


def read_rate(files: list[Path], limit: int = BANDWIDTH_SAMPLE) -> dict[str, float]:
    """Read up to ``limit`` bytes of ``files`` in large reads; bytes, seconds and GB/s."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    done = 0
    t = time.monotonic()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < limit:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                done += n
        finally:
            os.close(fd)
        if done >= limit:
            break
    seconds = max(time.monotonic() - t, 1e-9)
    return {"bytes": done, "s": round(seconds, 3), "gb_s": round(done / seconds / 1e9, 2)}


def copy_rate(files: list[Path], dst_dir: Path, limit: int = BANDWIDTH_SAMPLE) -> dict[str, float]:
    """Copy up to ``limit`` bytes of ``files`` into one new file in ``dst_dir`` in large reads and
    writes, fsync it (``dd conv=fsync``'s durable copy), remove it; bytes, seconds and GB/s. The
    bound of a publish or a fetch: neither can write durably faster than this."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    done = 0
    dst_path = dst_dir / ".bench-durable-copy"
    t = time.monotonic()
    out = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                while done < limit:
                    n = os.readv(fd, [view[: limit - done]])
                    if n <= 0:
                        break
                    written = 0
                    while written < n:
                        written += os.write(out, view[written:n])
                    done += n
            finally:
                os.close(fd)
            if done >= limit:
                break
        os.fsync(out)
    finally:
        os.close(out)
        dst_path.unlink(missing_ok=True)
    seconds = max(time.monotonic() - t, 1e-9)
    return {"bytes": done, "s": round(seconds, 3), "gb_s": round(done / seconds / 1e9, 2)}


COPY = "durable copy"  # the bandwidths key of copy_rate (not a read tier)


def bandwidths(disk_copy: Path, tmpfs_copy: Path | None, copy_dir: Path | None = None) -> dict[str, Any]:
    """This machine's read bandwidth per tier, on the image's own files: disk (page cache dropped
    first), page cache (the same bytes again), tmpfs; and, with ``copy_dir`` (the store's
    filesystem), the durable copy rate of those bytes from page cache (publish's and fetch's bound)."""
    files = image_files(disk_copy)
    out: dict[str, Any] = {"dropped": drop_caches()}
    out["disk"] = read_rate(files)
    out["page cache"] = read_rate(files)
    if tmpfs_copy is not None:
        out["tmpfs"] = read_rate(image_files(tmpfs_copy))
    if copy_dir is not None:
        out[COPY] = copy_rate(files, copy_dir)
    return out


def transfer_rates(res: dict[str, Any]) -> dict[str, Any]:
    """Publish and fetch beside their bound (pure): the image's bytes over each one's seconds, the
    durable copy rate measured in the same run on the same filesystem (the bound: a copy that must
    reach the disk goes no faster than the slower of reading its source and writing it), and what
    that share of it is. The source's read rate is given too: both read from page cache here (the
    dump as CRIU just wrote it; the store's copy as publish just wrote it)."""
    image = res.get("image_bytes") or 0
    bw = res.get("bandwidth") or {}
    bound = (bw.get(COPY) or {}).get("gb_s")
    source = (bw.get("page cache") or {}).get("gb_s")
    ck = ((res.get("checkpoint") or {}).get("outcome") or {}).get("checkpoint") or {}
    out: dict[str, Any] = {}
    for what, seconds in (
        ("publish", ck.get("publish_s")),
        ("fetch", (res.get("fetch") or {}).get("fetch_s")),
    ):
        if not seconds or not image:
            continue
        gb_s = image / seconds / 1e9
        out[what] = {
            "s": seconds,
            "gb_s": round(gb_s, 2),
            "bound_gb_s": bound,
            "of_bound": round(gb_s / bound, 2) if bound else None,
            "source": "page cache",
            "source_gb_s": source,
            "of_source": round(gb_s / source, 2) if source else None,
        }
    return out


def _rate_text(t: dict[str, Any] | None) -> str:
    """A rate and its share of the bound, e.g. `` (0.54 GB/s, 43% of the 1.26 GB/s durable-copy
    bound)`` (pure)."""
    if not t:
        return ""
    if not t.get("bound_gb_s"):
        return f" ({t['gb_s']:.2f} GB/s)"
    return f" ({t['gb_s']:.2f} GB/s, {t['of_bound']:.0%} of the {t['bound_gb_s']} GB/s durable-copy bound)"


def bound_s(
    image_bytes: int | None, gb_s: float | None, extra_bytes: int = 0, extra_gb_s: float | None = None
) -> float | None:
    """Seconds to read ``image_bytes`` at ``gb_s``, plus ``extra_bytes`` at ``extra_gb_s`` (pure)."""
    if not image_bytes or not gb_s or (extra_bytes and not extra_gb_s):
        return None
    return round(image_bytes / (gb_s * 1e9) + (extra_bytes / (extra_gb_s * 1e9) if extra_gb_s else 0.0), 3)


def mount_tmpfs(path: Path, size_bytes: int) -> bool:
    """A tmpfs at ``path`` (a cache in node memory, as the agent's ``memory`` tier may be)."""
    path.mkdir(parents=True, exist_ok=True)
    gib = max(1, -(-size_bytes // (1 << 30)) + 1)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={gib}g,mode=0700", "tmpfs", str(path)], check=False
    )
    return r.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# --- the whole life --------------------------------------------------------------------------------


def snapshot_dir(plan: dict[str, Any]) -> Path | None:
    p = plan.get("path")
    return Path(p) if isinstance(p, str) and p else None


def life(
    s: Suite,
    w: Workload,
    *,
    res: dict[str, Any] | None = None,
    tiers: tuple[str, ...] = ("disk", "page cache", "tmpfs"),
    with_cold: bool = True,
    cold_min_left_s: float = 150.0,
    extra_restores: tuple[tuple[str, dict[str, str]], ...] = (),
    variants: tuple[tuple[str, dict[str, str]], ...] = (),
    extra_read_bytes: int = 0,
) -> dict[str, Any]:
    """Checkpoint, fetch + restore (miss), restores from ``tiers`` (hits), optional extra page-cache
    restores with more pod env (``extra_restores``: label, env; thaw exec reads its flags from
    ``THAW_<FLAG>``), each tier's hit again per ``variants`` (label, env: the new path beside the
    current one, e.g. another CRIU build), then a cold pod when at least ``cold_min_left_s`` is left
    before the soft deadline. ``extra_read_bytes``: what a restore reads besides the image (weights
    reloaded on wake), for the storage bound. Fills and returns ``res`` (the caller's, so that
    ``s.save`` writes what is done after every phase); a step without time left before the hard
    deadline is skipped and named in ``res["skipped"]``."""
    d = s.root / w.name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    res = {} if res is None else res
    res.update(workload=w.name, cmd=w.cmd, env=pod_env(s, w), extra_read_bytes=extra_read_bytes, skipped=[])

    def time_for(step: str, need_s: float = 60.0) -> bool:
        s.saved()
        if s.hard_left_s() > need_s:
            return True
        res["skipped"].append(f"{step} ({s.hard_left_s():.0f} s left)")
        return False

    ck = checkpoint(s, w, d / "store", d / "cache-a")
    res["checkpoint"] = ck
    info = (ck.get("outcome") or {}).get("checkpoint", {})
    res["image_bytes"] = info.get("bytes")
    if info.get("status") != "published":
        res["stopped"] = f"checkpoint {info.get('status')}: {info.get('reason') or ck.get('error')}"
        s.saved()
        return res
    # 2. a node that must fetch first
    plan = d / "b" / "plan.json"
    plan.parent.mkdir(parents=True)
    f = fetch(s, w, d / "store", d / "cache-b", plan)
    res["fetch"] = f
    if f["plan"].get("action") != "restore":
        res["stopped"] = f"fetch: {f['plan'].get('reason') or f['log']}"
        s.saved()
        return res
    if time_for("restore, miss"):
        res["miss"] = restore(s, w, plan, "restore, miss (fetched just now)")
    # 3. a node that holds it: disk, page cache, tmpfs
    disk_copy = snapshot_dir(f["plan"])
    tmpfs_plan: Path | None = None
    tmpfs_dir = d / "cache-tmpfs"
    image = int(res["image_bytes"] or 0)
    if "tmpfs" in tiers and time_for("tmpfs fetch", 120) and mount_tmpfs(tmpfs_dir, image):
        tmpfs_plan = d / "c" / "plan.json"
        tmpfs_plan.parent.mkdir(parents=True)
        tf = fetch(s, w, d / "store", tmpfs_dir, tmpfs_plan)
        res["fetch_tmpfs"] = tf
        if tf["plan"].get("action") != "restore":
            tmpfs_plan = None
    if disk_copy is not None and tiers and time_for("bandwidth", 90):
        res["bandwidth"] = bandwidths(
            disk_copy, snapshot_dir(json.loads(tmpfs_plan.read_text())) if tmpfs_plan else None, copy_dir=d
        )
        res["transfer"] = transfer_rates(res)
    hits: dict[str, Any] = {}
    res["hits"] = hits
    if "disk" in tiers and time_for("restore, disk"):
        drop_caches()
        hits["disk"] = restore(s, w, plan, "restore, disk")
    if "page cache" in tiers and time_for("restore, page cache"):
        if "disk" not in hits:
            restore(s, w, plan, "warm the page cache")
        hits["page cache"] = restore(s, w, plan, "restore, page cache")
    for label, env in extra_restores:
        if time_for(f"restore, page cache, {label}"):
            hits[label] = restore(s, w, plan, f"restore, page cache, {label}", env=pod_env(s, w, env))
    if tmpfs_plan is not None and time_for("restore, tmpfs"):
        hits["tmpfs"] = restore(s, w, tmpfs_plan, "restore, tmpfs")
    tier_of: dict[str, str] = {}
    res["hit_tier"] = tier_of
    for label, env in variants:
        for tier, tier_plan in (("disk", plan), ("page cache", plan), ("tmpfs", tmpfs_plan)):
            if tier not in hits or tier_plan is None or not time_for(f"restore, {tier}, {label}"):
                continue
            if tier == "disk":
                drop_caches()
            key = f"{tier}, {label}"
            tier_of[key] = tier
            hits[key] = restore(s, w, tier_plan, f"restore, {key}", env=pod_env(s, w, env))
    if tmpfs_dir.exists():
        unmount(tmpfs_dir)
    # 4. cold
    if with_cold and s.left_s() > cold_min_left_s and time_for("cold", 120):
        res["cold"] = cold(s, w)
    elif with_cold:
        res["skipped"].append(f"cold ({s.left_s():.0f} s left before the soft deadline)")
    s.saved()
    return res


# --- the table --------------------------------------------------------------------------------------


def _timings(r: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = (r.get("outcome") or {}).get("timings") or {}
    return t


def gpu_back_s(r: dict[str, Any]) -> float | None:
    """Seconds from the pod's start until its GPU state was back, at the least (CRIU + CUDA
    restore; thaw exec started a moment after the pod did)."""
    t = _timings(r)
    if "criu_restore_s" not in t:
        return None
    return round(float(t["criu_restore_s"]) + float(t.get("cuda_restore_s", 0.0)), 3)


def health_before_gpu(r: dict[str, Any]) -> str:
    """Whether a health check answered before the GPU state was back (pure): "yes" when the first
    answer to the readiness URL came before even the lower bound of that moment."""
    h, back = r.get("first_health_s"), gpu_back_s(r)
    if h is None or back is None:
        return "-"
    return "yes" if h < back else "no"


def rows(res: dict[str, Any], key: str = "tokens") -> list[dict[str, Any]]:
    """One row per run (pure): first answer, speed-up on cold, CRIU and CUDA seconds and shares,
    storage bound, same answer as the checkpointed server."""
    ck = res.get("checkpoint") or {}
    ref = answer(ck, key, "after_checkpoint") or answer(ck, key)
    cold_r = res.get("cold")
    base = (cold_r or {}).get("first_answer_s") or ((ck.get("outcome") or {}).get("checkpoint") or {}).get(
        "ready_s"
    )
    bw = res.get("bandwidth") or {}
    image = res.get("image_bytes")
    extra = int(res.get("extra_read_bytes") or 0)
    out: list[dict[str, Any]] = []

    def row(label: str, r: dict[str, Any], *, extra_s: float = 0.0, tier: str | None = None) -> None:
        t = _timings(r)
        fa = r.get("first_answer_s")
        total = round(fa + extra_s, 3) if fa is not None else None
        # what a wake reloads (the model files) comes from the disk after the page cache was
        # dropped, else from page cache, whatever tier holds the image
        extra_tier = "disk" if tier == "disk" else "page cache"
        bound = (
            bound_s(image, (bw.get(tier) or {}).get("gb_s"), extra, (bw.get(extra_tier) or {}).get("gb_s"))
            if tier
            else None
        )
        out.append(
            {
                "run": label,
                "result": (r.get("outcome") or {}).get("result"),
                "reason": (r.get("outcome") or {}).get("reason") or r.get("error"),
                "first_answer_s": total,
                "speedup": round(base / total, 1) if base and total else None,
                "criu_s": t.get("criu_restore_s"),
                "cuda_s": t.get("cuda_restore_s"),
                "criu_share": round(t["criu_restore_s"] / total, 2)
                if total and "criu_restore_s" in t
                else None,
                "cuda_share": round(t["cuda_restore_s"] / total, 2)
                if total and "cuda_restore_s" in t
                else None,
                "bound_s": bound,
                "x_bound": round(total / bound, 1) if total and bound and "criu_restore_s" in t else None,
                "health_before_gpu": health_before_gpu(r),
                "first_health_s": r.get("first_health_s"),
                "ready_file_s": r.get("ready_file_s"),
                "gpu_back_s": gpu_back_s(r),
                "wake_s": t.get("wake_s"),
                "gate_s": t.get("gate_s"),
                "stopped_gate": t.get("stopped_gate"),
                "same": (answer(r, key) == ref and ref is not None) if label != "cold" else None,
                "same_as_cold": answer(r, key) == answer(cold_r or {}, key) if cold_r else None,
            }
        )

    if cold_r:
        row("cold", cold_r)
    hits = res.get("hits") or {}
    for tier in ("tmpfs", "page cache", "disk"):
        if tier in hits:
            row(f"hit, {tier}", hits[tier], tier=tier)
    tier_of = res.get("hit_tier") or {}
    for label, r in hits.items():
        if label in tier_of:  # a variant of a tier's hit: its key names the tier
            row(f"hit, {label}", r, tier=tier_of[label])
        elif label not in ("tmpfs", "page cache", "disk"):
            row(f"hit, page cache, {label}", r, tier="page cache")
    if "miss" in res:
        row("miss: fetch + restore", res["miss"], extra_s=float(res["fetch"]["fetch_s"]))
    return out


def compare(current: dict[str, Any], new: dict[str, Any], label: str | None = None) -> list[str]:
    """Per tier, the current path's first answer and distance to the storage bound beside the new
    path's (pure): ``new``'s hit of the tier, or with ``label`` its variant ``"<tier>, <label>"``;
    "helps" only where the new path answered sooner with the checkpointed server's answer."""
    a = {r["run"]: r for r in rows(current)}
    b = {r["run"]: r for r in rows(new)}
    name = label or new.get("workload", "new")
    pairs = [
        (f"hit, {t}", f"hit, {t}, {label}" if label else f"hit, {t}") for t in ("tmpfs", "page cache", "disk")
    ]
    if not label:  # a variant re-runs the hits only; another life has its own miss
        pairs.append(("miss: fetch + restore", "miss: fetch + restore"))
    out = []
    for run, other in pairs:
        x, y = a.get(run), b.get(other)
        if not x or not y:
            continue
        fx, fy = x["first_answer_s"], y["first_answer_s"]
        verdict = "helps" if fx and fy and fy < fx and y["same"] else "does not help"
        out.append(
            f"{run:22} current {fx} s ({x['x_bound'] or '-'}x bound), "
            f"{name} {fy} s ({y['x_bound'] or '-'}x bound): {verdict}"
        )
    return out


def all_restored(res: dict[str, Any], key: str = "tokens") -> bool:
    """Every restore of the life restored with the checkpointed server's answer (pure)."""
    restores = [r for r in rows(res, key) if r["run"] != "cold"]
    return (
        res.get("stopped") is None
        and bool(restores)
        and all(r["result"] == "restored" and r["same"] for r in restores)
    )


def short_reason(reason: object, limit: int = 220) -> str:
    """The part of a failure's reason that says what failed: CRIU's error lines first (pure)."""
    text = str(reason)
    parts = [p.strip() for p in text.split(" | ")]
    errors = [p for p in parts[1:] if "Error" in p or "Can't" in p]
    if errors:
        text = f"{parts[0].split(': (', 1)[0]}: {' | '.join(errors[:2])}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


EXTENDER_NOTE = (
    "hit = a node that holds the snapshot; miss = a node that must fetch it first (fetch included). "
    "The extender ranks nodes holding the snapshot first (memory tier, then disk, then fetch), so once "
    "a node holds it, hits are the common case; a miss is each node's first replica."
)


def table(res: dict[str, Any], key: str = "tokens") -> str:
    """The rows as text, with the image, checkpoint, fetch and bandwidth lines."""
    ck = ((res.get("checkpoint") or {}).get("outcome") or {}).get("checkpoint") or {}
    lines = [f"-- {res['workload']}"]
    if res.get("stopped"):
        lines.append(f"stopped: {res['stopped']}")
    image = res.get("image_bytes") or 0
    f = res.get("fetch") or {}
    bw = res.get("bandwidth") or {}
    rates = transfer_rates(res)
    lines.append(
        f"image {image / 1e9:.2f} GB; checkpoint pause: cuda {ck.get('cuda_checkpoint_s')} s, criu dump "
        f"{ck.get('criu_dump_s')} s, cuda restore {ck.get('cuda_restore_s')} s; "
        f"publish {ck.get('publish_s')} s{_rate_text(rates.get('publish'))}; "
        f"fetch {f.get('fetch_s')} s{_rate_text(rates.get('fetch')) or ' (-)'}"
    )
    if bw:
        lines.append(
            "read bandwidth (this run, the image's files): "
            + ", ".join(f"{k} {v['gb_s']} GB/s" for k, v in bw.items() if isinstance(v, dict) and k != COPY)
            + (
                f"; durable copy (read from page cache, written and fsynced beside the store) "
                f"{bw[COPY]['gb_s']} GB/s"
                if isinstance(bw.get(COPY), dict)
                else ""
            )
        )
    lines.append(
        f"{'run':34} {'answer s':>8} {'speedup':>7} {'criu s':>7} {'cuda s':>7} {'bound s':>7} "
        f"{'x bound':>7} {'health s':>8} {'ready s':>7} {'health<gpu':>10}  same"
    )
    for r in rows(res, key):
        same = r["same"] if r["run"] != "cold" else "-"
        speedup = f"{r['speedup']}x" if r["speedup"] else "-"
        lines.append(
            f"{r['run']:34} {r['first_answer_s']!s:>8} {speedup:>7} "
            f"{r['criu_s'] or '-'!s:>7} {r['cuda_s'] or '-'!s:>7} {r['bound_s'] or '-'!s:>7} "
            f"{r['x_bound'] or '-'!s:>7} {r['first_health_s'] or '-'!s:>8} {r['ready_file_s'] or '-'!s:>7} "
            f"{r['health_before_gpu']:>10}  {same}"
            + (
                f"  ({r['result']}: {short_reason(r['reason'])})"
                if r["result"] not in ("restored", None) and r["run"] != "cold"
                else ""
            )
        )
    if res.get("skipped"):
        lines.append("skipped for time: " + "; ".join(res["skipped"]))
    lines.append(EXTENDER_NOTE)
    return "\n".join(lines)


SUITE_DIRS = ("hf", "matrix", "speed")  # under $THAW_BENCH_DIR; the unpacked bundle stays


def clear(path: Path) -> None:
    """Remove ``path`` with whatever tmpfs caches a stopped run left mounted under it."""
    try:
        with open("/proc/mounts") as f:
            mounts = [ln.split()[1] for ln in f]
    except OSError:
        mounts = []
    prefix = str(path).rstrip("/") + "/"
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        unmount(Path(m))
    shutil.rmtree(path, ignore_errors=True)


def fresh_suite_dir(path: Path) -> None:
    """An empty work directory for a suite, and none of the other suites' left on this disk (64 GiB
    on the GPU machine: one suite's stores and caches take up to ~35 GB)."""
    for name in SUITE_DIRS:
        clear(path.parent / name)
    clear(path)
    path.mkdir(parents=True)


def save_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` whole or not at all (the command may be stopped at its limit mid-write)."""
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def keep_log_tail(log: Path, dest: Path, limit: int = 8 << 20) -> None:
    """The last ``limit`` bytes of the pods' log into ``dest`` (what comes back from $OUT is capped)."""
    try:
        size = log.stat().st_size
        with open(log, "rb") as src, open(dest, "wb") as out:
            src.seek(max(0, size - limit))
            shutil.copyfileobj(src, out)
    except OSError:
        pass
