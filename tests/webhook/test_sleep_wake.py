"""The webhook's sleep/wake hooks (thaw.dev/sleep, thaw.dev/wake): validated at admission, resolved
against the container's readinessProbe, handed to thaw exec as THAW_SLEEP / THAW_WAKE."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from webhook.mutate import Mutation, Refusal

from .test_mutate import SNAP, env_of, mutated, pod, run

PROBE = {"readinessProbe": {"httpGet": {"path": "/health", "port": "http"}}}
PORTS = {"ports": [{"name": "http", "containerPort": 8000}]}
HOOKS = {"thaw.dev/sleep": "/sleep?level=1", "thaw.dev/wake": "/wake_up"}


def test_paths_resolve_against_the_readiness_probe() -> None:
    out, result = mutated(pod({**SNAP, **HOOKS}, **PROBE, **PORTS))
    env = env_of(out)
    assert env["THAW_READY"] == "http://127.0.0.1:8000/health"
    assert env["THAW_SLEEP"] == "http://127.0.0.1:8000/sleep?level=1"
    assert env["THAW_WAKE"] == "http://127.0.0.1:8000/wake_up"
    assert result.warnings == []


def test_exact_env_ops() -> None:
    hooks = {"thaw.dev/sleep": "http://127.0.0.1:9000/sleep", "thaw.dev/wake": "http://127.0.0.1:9000/wake"}
    result = run(pod({**SNAP, **hooks}))
    assert isinstance(result, Mutation)
    env_op: Any = next(op for op in result.ops if op["path"] == "/spec/containers/0/env")
    names = [e["name"] for e in env_op["value"]]
    i = names.index("THAW_SLEEP")
    assert env_op["value"][i : i + 3] == [
        {"name": "THAW_SLEEP", "value": "http://127.0.0.1:9000/sleep"},
        {"name": "THAW_WAKE", "value": "http://127.0.0.1:9000/wake"},
        {"name": "THAW_NAME", "value": "qwen3-8b-vllm"},
    ]


def test_without_hooks_no_env() -> None:
    out, _ = mutated(pod(SNAP, **PROBE, **PORTS))
    assert not {"THAW_SLEEP", "THAW_WAKE"} & set(env_of(out))


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize(
    ("hooks", "words"),
    [
        ({"thaw.dev/sleep": "/sleep"}, "annotation thaw.dev/sleep needs annotation thaw.dev/wake too"),
        ({"thaw.dev/wake": "/wake"}, "annotation thaw.dev/wake needs annotation thaw.dev/sleep too"),
        (
            {"thaw.dev/sleep": "sleep", "thaw.dev/wake": "/wake"},
            "annotation thaw.dev/sleep='sleep' is not valid: use an http:// or https:// URL",
        ),
        (
            {"thaw.dev/sleep": "/sleep", "thaw.dev/wake": "tcp:8000"},
            "annotation thaw.dev/wake='tcp:8000' is not valid",
        ),
        (
            {"thaw.dev/sleep": "/sleep?level=2", "thaw.dev/wake": '["/wake_up", '},
            "annotation thaw.dev/wake starts with '[' but is not valid JSON",
        ),
        (
            {
                "thaw.dev/sleep": "/sleep?level=2",
                "thaw.dev/wake": '["/wake_up", {"url": "/rpc", "args": []}]',
            },
            "annotation thaw.dev/wake step 2 has unknown keys ['args']: a step object has only 'url'",
        ),
        (
            {"thaw.dev/sleep": '["/a","/b","/c","/d","/e","/f","/g","/h","/i"]', "thaw.dev/wake": "/wake_up"},
            "annotation thaw.dev/sleep has 9 steps: use a JSON array of 1 to 8 steps",
        ),
        (
            {
                "thaw.dev/sleep": "/sleep",
                "thaw.dev/wake": '[{"url": "/collective_rpc", "body": "reload_weights"}]',
            },
            "annotation thaw.dev/wake step 1's body must be a JSON object, not str",
        ),
        (
            {"thaw.dev/sleep": "/sleep", "thaw.dev/wake": '["/wake_up", "http://vllm.svc:8000/wake_up"]'},
            "annotation thaw.dev/wake step 2='http://vllm.svc:8000/wake_up' is not valid: the host must be",
        ),
    ],
)
def test_invalid_hooks_refused_on_both_paths(hooks: dict[str, str], words: str, restore: bool) -> None:
    result = run(pod({**SNAP, **hooks}, **PROBE, **PORTS), restore=restore)
    assert isinstance(result, Refusal) and result.code == 400
    assert words in result.message


def test_a_path_without_an_http_probe_is_refused_with_the_fix() -> None:
    tcp = {"readinessProbe": {"tcpSocket": {"port": 8000}}}
    result = run(pod({**SNAP, **HOOKS}, **tcp))
    assert isinstance(result, Refusal) and result.code == 400
    assert "container 'server'" in result.message
    assert "annotation thaw.dev/sleep='/sleep?level=1' is a path" in result.message
    assert "tcp:8000" in result.message and "give a full http:// URL" in result.message
    # full URLs need no probe
    full = {"thaw.dev/sleep": "http://127.0.0.1:8000/sleep", "thaw.dev/wake": "http://127.0.0.1:8000/wake"}
    assert isinstance(run(pod({**SNAP, **full}, **tcp)), Mutation)


def test_a_sequence_resolves_against_the_readiness_probe() -> None:
    """vLLM's level-2 wake (weights back, reloaded from the model files, then the KV cache): the
    paths of every step are resolved, the sequence handed to thaw exec as JSON."""
    wake = (
        '["/wake_up?tags=weights", {"url": "/collective_rpc", "body": {"method": "reload_weights"}},'
        ' "/wake_up?tags=kv_cache"]'
    )
    out, result = mutated(
        pod({**SNAP, "thaw.dev/sleep": "/sleep?level=2", "thaw.dev/wake": wake}, **PROBE, **PORTS)
    )
    env = env_of(out)
    assert env["THAW_SLEEP"] == "http://127.0.0.1:8000/sleep?level=2"
    assert json.loads(env["THAW_WAKE"]) == [
        {"url": "http://127.0.0.1:8000/wake_up?tags=weights"},
        {"url": "http://127.0.0.1:8000/collective_rpc", "body": {"method": "reload_weights"}},
        {"url": "http://127.0.0.1:8000/wake_up?tags=kv_cache"},
    ]
    assert result.warnings == []


def test_a_path_step_without_an_http_probe_is_refused_naming_the_step() -> None:
    tcp = {"readinessProbe": {"tcpSocket": {"port": 8000}}}
    hooks = {
        "thaw.dev/sleep": "http://127.0.0.1:8000/sleep",
        "thaw.dev/wake": '["http://127.0.0.1:8000/w", "/r"]',
    }
    result = run(pod({**SNAP, **hooks}, **tcp))
    assert isinstance(result, Refusal) and result.code == 400
    assert "annotation thaw.dev/wake step 2='/r' is a path" in result.message


def _documented_hooks() -> list[dict[str, str]]:
    """Every YAML block of docs/sleep-mode.md and README.md that sets thaw.dev/sleep."""
    found = []
    for page in (REPO / "docs" / "sleep-mode.md", REPO / "README.md"):
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S):
            doc = yaml.safe_load(block)
            hooks = doc.get("annotations", doc)
            if "thaw.dev/sleep" in hooks:
                found.append({k: hooks[k] for k in ("thaw.dev/sleep", "thaw.dev/wake")})
    return found


def test_the_documented_hooks_are_admitted() -> None:
    documented = _documented_hooks()
    assert len(documented) >= 4  # level 1, vLLM level 2 (the guide and the README), SGLang
    for hooks in documented:
        out, result = mutated(pod({**SNAP, **hooks}, **PROBE, **PORTS))
        assert result.warnings == [] and env_of(out)["THAW_WAKE"].startswith(
            ("http://127.0.0.1:8000/", "[")
        ), hooks
