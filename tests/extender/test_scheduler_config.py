"""The shipped KubeSchedulerConfiguration names what the extender really serves."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from extender.app import AppConfig, create_app
from extender.synthetic import WORKLOAD, cluster
from thaw.cli import build_parser
from thaw.contract.annotations import EXTENDED_RESOURCE

CONFIG = Path(__file__).resolve().parents[2] / "extender" / "scheduler-config.yaml"


def test_scheduler_config_matches_the_server(tmp_path: Path) -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    assert doc["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert doc["kind"] == "KubeSchedulerConfiguration"
    [ext] = doc["extenders"]
    nodes = tmp_path / "nodes.json"
    nodes.write_text(__import__("json").dumps(cluster(3)))
    app = create_app(AppConfig(nodes_file=nodes))
    client = app.test_client()
    # A Thaw pod, and a node that holds its snapshot (a prioritize answer lists only nodes > 0).
    thaw = {"thaw.dev/snapshot": "qwen3-8b-vllm", "thaw.dev/workload": WORKLOAD}
    pod = {"metadata": {"name": "p", "annotations": thaw}}
    body = {"Pod": pod, "Nodes": None, "NodeNames": ["gpu-00000"]}
    for verb in (ext["filterVerb"], ext["prioritizeVerb"]):
        resp = client.post(f"/{verb}", json=body)
        assert resp.status_code == 200 and resp.content_type == "application/json", verb
        assert b"gpu-00000" in resp.data
    url = urlsplit(ext["urlPrefix"])
    default_port = build_parser().parse_args(["extender"]).port
    assert url.scheme == "https" and ext["enableHTTPS"] is True and url.port == default_port
    assert ext["managedResources"] == [{"name": EXTENDED_RESOURCE, "ignoredByScheduler": True}]
    assert ext["nodeCacheCapable"] is True and ext["ignorable"] is True
    assert ext["weight"] >= 1 and ext["tlsConfig"]["caFile"].endswith("ca.crt")
