"""``thaw extender --nodes FILE`` reloads the file when it changes (FileView), off the request path:
a node whose restore queue grows loses its lead, a broken file keeps the last good view."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from extender.app import AppConfig, FileView, create_app
from extender.index import NodeIndex
from extender.synthetic import cached, node
from tests.extender.conftest import SIZE, SNAPSHOT, annotate


def _cluster(restoring_a: int, rv: str) -> dict[str, Any]:
    snap = cached(SNAPSHOT, SIZE, "memory")
    return {
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
        "items": [node("gpu-a", snapshots=[snap], restoring=restoring_a), node("gpu-b", snapshots=[snap])],
    }


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)  # as the demo writes it: readers see the old file or the new one


def _scores(client: Any) -> dict[str, int]:
    pod = annotate({"Pod": {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}})["Pod"]
    body = {"Pod": pod, "Nodes": None, "NodeNames": ["gpu-a", "gpu-b"]}
    resp = client.post("/prioritize", data=json.dumps(body), content_type="application/json")
    assert resp.status_code == 200
    return {h["Host"]: h["Score"] for h in resp.get_json()}


def test_load_only_when_the_file_changed(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.json"
    _write(nodes, _cluster(0, "1"))
    view = FileView(NodeIndex(), nodes)
    assert view.load() is True
    assert view.load() is False  # unchanged: no reload
    _write(nodes, _cluster(4, "2"))
    assert view.load() is True
    assert view.index.resource_version == "2"
    assert view.reloads == 2


def test_broken_file_keeps_the_last_view(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.json"
    _write(nodes, _cluster(0, "1"))
    view = FileView(NodeIndex(), nodes)
    view.load()
    nodes.write_text('{"kind": "NodeList", "items": 3}')
    assert view.load() is False
    assert sorted(view.index.nodes) == ["gpu-a", "gpu-b"]
    assert view.index.resource_version == "1"


def test_served_scores_follow_the_file(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.json"
    _write(nodes, _cluster(0, "1"))
    app = create_app(AppConfig(nodes_file=nodes, nodes_check_s=0.05))
    client = app.test_client()
    try:
        assert client.get("/readyz").data == b"ok: 2 nodes at resourceVersion 1\n"
        before = _scores(client)
        assert before["gpu-a"] == before["gpu-b"]
        _write(nodes, _cluster(4, "2"))  # gpu-a now restores 4 snapshots: it must fall behind gpu-b
        deadline = time.monotonic() + 10
        while client.get("/readyz").data != b"ok: 2 nodes at resourceVersion 2\n":
            assert time.monotonic() < deadline, "the extender did not reload the changed file"
            time.sleep(0.05)
        after = _scores(client)
        assert after["gpu-a"] < after["gpu-b"], after
    finally:
        app.config["view"].stop()
