"""Extender latency through the real gunicorn server, beside a trivial handler in the same run.

Client: a precise Python client (``http.client``, one keep-alive connection, requests in sequence,
``perf_counter_ns`` around each request: send, wait, read the whole answer) — the scheduler's own
pattern (one extender call at a time per scheduling cycle). Servers: ``thaw extender --nodes FILE``
and, as the baseline, a Flask handler that returns ``[]`` served by the same
``thaw.serve.serving.serve`` settings (1 gthread worker). Plain HTTP on loopback.

Also: the handler alone (in process, no HTTP: ``extender.handlers`` on the same request bodies), so
the share of the end-to-end time that is Thaw's own work is clear, and memory of a 5,000-node index
(tracemalloc, with every node's decision memoised for one pod).
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from extender.index import NodeIndex
from extender.launch import extender_command, start_ready
from extender.synthetic import WORKLOAD, cluster
from thaw.serve.serving import free_port

SNAPSHOT = "qwen3-8b-vllm"
GOALS = {("names", 5000): 2.0, ("nodes", 5000): 150.0}  # p99 ms
MEMORY_GOAL_MB = 200.0
REPO = Path(__file__).resolve().parent.parent


def trivial_app() -> Any:
    from flask import Flask, Response, request

    app = Flask("trivial")

    @app.post("/filter")
    @app.post("/prioritize")
    def answer() -> Response:
        request.get_data(cache=False)  # read the body, as any handler must on a kept-alive connection
        return Response(b"[]", mimetype="application/json")

    @app.get("/readyz")
    def ready() -> str:
        return "ok"

    return app


def measure(port: int, path: str, body: bytes, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    out = []
    for i in range(n + max(3, n // 20)):  # the first requests warm up (memoised decisions)
        t = time.perf_counter_ns()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        resp.read()
        dt = (time.perf_counter_ns() - t) / 1e6
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}")
        if i >= max(3, n // 20):
            out.append(dt)
    conn.close()
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bodies(doc: dict[str, Any], n: int) -> dict[str, bytes]:
    pod = json.loads(
        (REPO / "tests/fixtures/k8s/extender-filter-nodecachecapable-true.request.json").read_text()
    )["Pod"]
    pod["metadata"]["annotations"] = {
        "thaw.dev/snapshot": SNAPSHOT,
        "thaw.dev/workload": WORKLOAD,
        "thaw.dev/placement": "required",
    }
    items = doc["items"][:n]
    return {
        "names": orjson.dumps(
            {"Pod": pod, "Nodes": None, "NodeNames": [i["metadata"]["name"] for i in items]}
        ),
        "nodes": orjson.dumps({"Pod": pod, "Nodes": {"metadata": {}, "items": items}, "NodeNames": None}),
    }


def handler_only(doc: dict[str, Any], n: int = 5000) -> list[str]:
    """p50/p99 ms of each handler called in process on the benchmark's bodies (warm memo)."""
    from extender import handlers

    items = orjson.loads(orjson.dumps(doc["items"]))
    idx = NodeIndex()
    idx.replace_all(items, "1")
    b = bodies(doc, n)
    out = []
    for mode in ("names", "nodes"):
        reps = 2000 if mode == "names" else 40
        for verb, fn in (("filter", handlers.filter_), ("prioritize", handlers.prioritize)):
            xs = []
            for i in range(reps + 5):
                t = time.perf_counter_ns()
                status, _ = fn(idx, b[mode])
                dt = (time.perf_counter_ns() - t) / 1e6
                assert status == 200
                if i >= 5:
                    xs.append(dt)
            out.append(
                f"handler  {mode:<6} {n:>5} {verb:<10} {statistics.median(xs):>8.2f} {pct(xs, 0.99):>8.2f}"
                "   (in process, no HTTP)"
            )
    return out


def index_memory(doc: dict[str, Any]) -> float:
    raw = orjson.dumps(doc)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    items = orjson.loads(raw)["items"]
    idx = NodeIndex()
    idx.replace_all(items, "1")
    memo = idx.decisions(SNAPSHOT, WORKLOAD)
    for name in list(idx.nodes):
        memo.fragment(name)
    del items
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(idx.nodes) == len(doc["items"])
    return used / 2**20


def main(argv: list[str]) -> int:
    doc = cluster(5000)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        nodes_file = Path(tmp) / "nodes.json"
        nodes_file.write_bytes(orjson.dumps(doc))
        ports = {"thaw": free_port(), "trivial": free_port()}
        env_py = sys.executable
        servers = {
            "thaw": start_ready(extender_command(ports["thaw"], nodes_file, threads=4), ports["thaw"]),
            "trivial": start_ready(
                [
                    env_py,
                    "-c",
                    "from thaw.serve.serving import ServeOptions, serve; serve(ServeOptions("
                    f"app='bench.extender:trivial_app', host='127.0.0.1', port={ports['trivial']}, "
                    "cert_dir=None, workers=1, threads=4))",
                ],
                ports["trivial"],
            ),
        }
        try:
            head = f"{'server':<8} {'mode':<6} {'nodes':>5} {'verb':<10} {'p50 ms':>8} {'p99 ms':>8}"
            print(f"{head} {'goal':>10}")
            for n in (500, 5000):
                b = bodies(doc, n)
                for mode in ("names", "nodes"):
                    reps = 1000 if mode == "names" else (200 if n == 500 else 40)
                    for server in ("trivial", "thaw"):
                        for verb in ("filter", "prioritize"):
                            xs = measure(ports[server], "/" + verb, b[mode], reps)
                            goal = GOALS.get((mode, n)) if server == "thaw" else None
                            met = (
                                ""
                                if goal is None
                                else f"<= {goal:g} " + ("ok" if pct(xs, 0.99) <= goal else "MISS")
                            )
                            ok &= goal is None or pct(xs, 0.99) <= goal
                            print(
                                f"{server:<8} {mode:<6} {n:>5} {verb:<10} {statistics.median(xs):>8.2f} "
                                f"{pct(xs, 0.99):>8.2f} {met:>10}",
                                flush=True,
                            )
        finally:
            for p in servers.values():
                p.terminate()
                p.wait(timeout=15)
    for line in handler_only(doc):
        print(line, flush=True)
    mb = index_memory(doc)
    ok &= mb <= MEMORY_GOAL_MB
    print(
        f"index of 5000 nodes (decisions memoised for one pod): {mb:.1f} MiB (goal <= {MEMORY_GOAL_MB:g} MB)"
    )
    print(f"machine: {os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}")
    return 0 if ok else 1
