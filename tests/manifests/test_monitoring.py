"""manifests/components/monitoring: the rules pass promtool (check and unit tests), and every metric a
rule or a dashboard panel names is one that Thaw's running servers serve (or a listed
kube-state-metrics / Prometheus series), with label names they carry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.launch import extender_command, start_ready
from tests.fakekube import FakeKube, running
from tests.images import require
from tests.manifests.test_manifests import MANIFESTS, find, kubectl
from tests.node.agentproc import running_agent
from tests.runtime.snapshots import node
from thaw.serve.serving import free_port
from webhook.launch import make_certs, running_webhook

COMPONENT = MANIFESTS / "components" / "monitoring"
CERT = "thaw_serving_certificate_expiry_timestamp_seconds"
# Series from elsewhere that the rules read, and where they come from.
EXTERNAL = {
    "up": "Prometheus (one per scrape target)",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_pod_status_phase": "kube-state-metrics",
    "kube_pod_annotations": "kube-state-metrics (--metric-annotations-allowlist=pods=[thaw.dev/snapshot])",
}
# Labels Prometheus adds to every series of a target (the ServiceMonitors' relabelings add node).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container", "node", "le"}
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan",
}  # fmt: skip


def render_component(tmp: Path) -> list[dict[str, Any]]:
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS / "overlays" / "default", tmp)],
                "components": [os.path.relpath(COMPONENT, tmp)],
            }
        )
    )
    out = subprocess.run([kubectl(), "kustomize", str(tmp)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def objs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render_component(tmp_path_factory.mktemp("monitoring"))


def rule_groups(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = find(objs, "PrometheusRule", "thaw")["spec"]["groups"]
    return groups


def dashboard(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = find(objs, "ConfigMap", "thaw-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    d: dict[str, Any] = json.loads(cm["data"]["thaw.json"])
    return d


def queries(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and every panel target and template query."""
    out = [(f"alert {r['alert']}", r["expr"]) for g in rule_groups(objs) for r in g["rules"]]
    d = dashboard(objs)
    for p in d["panels"]:
        out += [(f"panel {p['title']!r}", t["expr"]) for t in p["targets"]]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append(
                (f"variable {v['name']}", re.sub(r"^label_values\((.*), *\w+\)$", r"\1", v["definition"]))
            )
    return out


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses. A small tokenizer: strings, ranges
    and durations out; label matchers and grouping clauses give labels; an identifier not
    followed by '(' that is no keyword is a metric."""
    expr = expr.replace("$__rate_interval", "5m")
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {s.strip() for s in body.split(",") if s.strip()}
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    metrics = {
        m.group(0)
        for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*(?![\w(])(?!\s*\()", expr)
        if m.group(0).lower() not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", m.group(0))
    }
    return metrics, labels


def test_the_tokenizer_finds_metrics_and_labels() -> None:
    m, labels = names_in(
        'sum by (node) (increase(foo_total{reason=~"a|b"}[1h])) / on () bar > 0.2'
        ' and time() - baz{x="y"} > 5 * 86400'
    )
    assert m == {"foo_total", "bar", "baz"}
    assert labels == {"node", "reason", "x"}


# ---- promtool -----------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    require(None if found else "promtool is missing: scripts/ensure-tools installs Debian's prometheus")
    assert found is not None
    return found


def test_rules_pass_promtool_check(objs: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = tmp_path / "thaw.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(objs)}))
    out = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups(objs))} rules found" in out.stdout


def unit_rules(objs: list[dict[str, Any]], path: Path) -> Path:
    """The rules for promtool test rules, without annotations (promtool would compare them; their
    templates are checked by promtool check rules)."""
    groups = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in rule_groups(objs)
    ]
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def _alerts(objs: list[dict[str, Any]]) -> set[str]:
    return {r["alert"] for g in rule_groups(objs) for r in g["rules"]}


def test_alerts_fire_when_they_should_and_not_otherwise(objs: list[dict[str, Any]], tmp_path: Path) -> None:
    """promtool test rules: series as the agent, the webhook and kube-state-metrics would serve them."""
    rules = unit_rules(objs, tmp_path / "thaw.rules.yaml")
    gpu = 'job="thaw-agent",node="gpu-1",instance="10.0.0.1:9477"'
    ok = 'job="thaw-agent",node="gpu-2",instance="10.0.0.2:9477"'
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # gpu-1: 10 restores attempted, 4 failed, in the hour; gpu-2: 10, none failed.
                    {"series": f'thaw_agent_starts_total{{{gpu},reason="restored"}}', "values": "0+0.1x90"},
                    {
                        "series": f'thaw_agent_starts_total{{{gpu},reason="restore failed: cuda"}}',
                        "values": "0+0.07x90",
                    },
                    {"series": f'thaw_agent_starts_total{{{ok},reason="restored"}}', "values": "0+0.2x90"},
                    {"series": f'thaw_agent_starts_total{{{ok},reason="untrusted"}}', "values": "0+0x90"},
                    {"series": f"thaw_agent_cache_bytes{{{gpu}}}", "values": "99x90"},
                    {"series": f"thaw_agent_cache_budget_bytes{{{gpu}}}", "values": "100x90"},
                    {"series": f"thaw_agent_cache_bytes{{{ok}}}", "values": "10x90"},
                    {"series": f"thaw_agent_cache_budget_bytes{{{ok}}}", "values": "100x90"},
                    {"series": f"thaw_agent_cache_free_bytes{{{ok}}}", "values": "1e12x90"},
                    {"series": f"up{{{gpu}}}", "values": "1x90"},
                    {"series": f"up{{{ok}}}", "values": "1x30 0x60"},
                    {
                        "series": f"thaw_agent_last_pass_success_timestamp_seconds{{{gpu}}}",
                        "values": "0+60x90",
                    },
                    {
                        "series": f"thaw_agent_last_pass_success_timestamp_seconds{{{ok}}}",
                        "values": "0+60x30 1800x60",
                    },
                    {"series": f'thaw_agent_policy_writes_enabled{{{gpu},write="events"}}', "values": "1x90"},
                    {
                        "series": f'{CERT}{{job="thaw-webhook",instance="a"}}',
                        "values": "864000x90",
                    },
                    {
                        "series": f'{CERT}{{job="thaw-extender",instance="b"}}',
                        "values": "86400000x90",
                    },
                    {
                        "series": "kube_deployment_status_replicas_available"
                        '{namespace="thaw-system",deployment="thaw-scheduler"}',
                        "values": "2x40 0x50",
                    },
                    {
                        "series": 'kube_pod_status_phase{namespace="llm",pod="p1",phase="Pending"}',
                        "values": "1x90",
                    },
                    {
                        "series": "kube_pod_annotations"
                        '{namespace="llm",pod="p1",annotation_thaw_dev_snapshot="qwen"}',
                        "values": "1x90",
                    },
                    {
                        "series": 'kube_pod_status_phase{namespace="web",pod="w1",phase="Pending"}',
                        "values": "1x90",
                    },
                    {
                        "series": 'thaw_webhook_admissions_total{path="/mutate",outcome="error"}',
                        "values": "0x90",
                    },
                    {"series": 'thaw_extender_ready{instance="e1"}', "values": "1x90"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "90m",
                        "alertname": "ThawRestoreFailureRatioHigh",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "node": "gpu-1"}}],
                    },
                    {"eval_time": "90m", "alertname": "ThawSnapshotsUntrusted", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "ThawCacheFull",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "node": "gpu-1"}}],
                    },
                    {"eval_time": "90m", "alertname": "ThawCacheDiskLow", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "ThawPodsPendingSchedulerDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                    {"eval_time": "30m", "alertname": "ThawPodsPendingSchedulerDown", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "ThawCertificateExpiresSoon",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "critical", "job": "thaw-webhook", "instance": "a"}}
                        ],
                    },
                    {"eval_time": "90m", "alertname": "ThawWebhookErrors", "exp_alerts": []},
                    {"eval_time": "90m", "alertname": "ThawExtenderNotReady", "exp_alerts": []},
                    {"eval_time": "90m", "alertname": "ThawAgentWithoutPolicy", "exp_alerts": []},
                ],
            }
        ],
    }
    spec = tmp_path / "thaw.test.yaml"
    spec.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = subprocess.run(
        [promtool(), "test", "rules", spec.name], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # ThawAgentNotReporting on gpu-2 (its scrape is down, its last report stale): checked apart,
    # because its two arms give the alert different label sets.
    tested = {t["alertname"] for t in tests["tests"][0]["alert_rule_test"]}  # type: ignore[index]
    assert tested | {"ThawAgentNotReporting"} == _alerts(objs)


def test_agent_not_reporting_fires_for_the_silent_node(objs: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = unit_rules(objs, tmp_path / "thaw.rules.yaml")
    ok = 'job="thaw-agent",node="gpu-1",instance="i1"'
    silent = 'job="thaw-agent",node="gpu-2",instance="i2"'
    spec = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"up{{{ok}}}", "values": "1x60"},
                    {
                        "series": f"thaw_agent_last_pass_success_timestamp_seconds{{{ok}}}",
                        "values": "0+60x60",
                    },
                    {"series": f"up{{{silent}}}", "values": "1x60"},
                    {
                        "series": f"thaw_agent_last_pass_success_timestamp_seconds{{{silent}}}",
                        "values": "0+60x20 1200x40",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "60m",
                        "alertname": "ThawAgentNotReporting",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "node": "gpu-2"}}],
                    },
                    {"eval_time": "25m", "alertname": "ThawAgentNotReporting", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [promtool(), "test", "rules", "t.yaml"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- every metric named exists --------------------------------------------------------------------


def parse_exposition(text: str) -> dict[str, set[str]]:
    """Series name -> label names, from a /metrics page (families from # TYPE, with the suffixes
    their type gives; label names from the samples)."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
            }
            for suffix in suffixes.get(kind, ("",)):
                series.setdefault(name + suffix if not name.endswith(suffix) else name, set())
            if kind == "counter" and name.endswith("_total"):
                series.setdefault(name, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            if m:
                series.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
    return series


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Every series the running agent, webhook and extender serve (each after some work)."""
    import ssl
    import urllib.request
    import uuid

    import orjson

    from thaw.snapshot.outcome_copy import write_outcome_copy

    tmp = tmp_path_factory.mktemp("served")
    out: dict[str, set[str]] = {}
    kube: FakeKube
    with running() as kube:
        kube.add(node("gpu-1"))
        cache = tmp / "cache"
        outcome = {
            "result": "restored",
            "started": "s",
            "timings": {"total_s": 3.0},
            "plan": {"action": "restore", "fetch": {"bytes": 10, "seconds": 1.0}},
        }
        write_outcome_copy(cache, str(uuid.uuid4()), orjson.dumps(outcome))
        with running_agent(tmp, cache, kube.url) as agent:
            agent.wait("a counted start", lambda: 'reason="restored"' in agent.get("/metrics")[1])
            out.update(parse_exposition(agent.get("/metrics")[1]))
    certs = make_certs(tmp / "tls")
    with running_webhook(certs, workers=1, threads=2) as hook:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        body = json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "u1",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "operation": "CREATE",
                    "namespace": "x",
                    "object": {
                        "metadata": {"name": "p"},
                        "spec": {"containers": [{"name": "c", "image": "i"}]},
                    },
                },
            }
        ).encode()
        req = urllib.request.Request(
            f"{hook.url}/mutate", data=body, headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(req, context=ctx, timeout=10).read()
        for k, v in parse_exposition(
            urllib.request.urlopen(f"{hook.url}/metrics", context=ctx, timeout=10).read().decode()
        ).items():
            out.setdefault(k, set()).update(v)
    nodes = tmp / "nodes.json"
    nodes.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "NodeList",
                "metadata": {"resourceVersion": "1"},
                "items": [node("gpu-1")],
            }
        )
    )
    port = free_port()
    proc = start_ready(extender_command(port, nodes), port)
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/prioritize",
            data=json.dumps({"Pod": {"metadata": {"name": "p"}}, "NodeNames": ["gpu-1"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()
        for k, v in parse_exposition(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ).items():
            out.setdefault(k, set()).update(v)
    finally:
        proc.terminate()
        proc.wait(10)
    yield out


def test_every_query_names_metrics_and_labels_that_exist(
    objs: list[dict[str, Any]], served: dict[str, set[str]]
) -> None:
    assert "thaw_serving_certificate_expiry_timestamp_seconds" in served  # the webhook's, over TLS
    problems: list[str] = []
    for where, expr in queries(objs):
        metrics, labels = names_in(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        for m in sorted(metrics):
            if m not in served and m not in EXTERNAL:
                problems.append(f"{where}: {m} is served by nothing")
        thaw_labels = set().union(*(served.get(m, set()) for m in metrics if m in served))
        external = any(m in EXTERNAL for m in metrics)
        for label in sorted(labels - TARGET_LABELS):
            if not external and label not in thaw_labels:
                problems.append(f"{where}: label {label} is on none of {sorted(metrics)}")
    assert problems == []


def test_the_check_catches_a_misspelt_metric(served: dict[str, set[str]]) -> None:
    metrics, _ = names_in("sum(rate(thaw_agent_start_total[5m]))")
    assert metrics == {"thaw_agent_start_total"} and "thaw_agent_start_total" not in served
