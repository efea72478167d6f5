"""The pure mutation: decisions, refusals, idempotence, configuration."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from thaw.contract.workload import EnvAllowlist, workload_hash
from webhook.config import ConfigError, WebhookConfig, load_config, parse_config
from webhook.mutate import MalformedPod, Mutation, Refusal, mutate
from webhook.patches import Prepared

PREPARED = Prepared.build(WebhookConfig())


def pod(annotations: dict[str, str] | None = None, **container: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "server", "image": "vllm/vllm-openai:v0.9", "command": ["vllm", "serve"]}
    c.update(container)
    meta: dict[str, Any] = {"generateName": "qwen-"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [c]}}


SNAP = {"thaw.dev/snapshot": "qwen3-8b-vllm"}


def run(
    p: dict[str, Any], ns: str = "ml", restore: bool = True, prepared: Prepared = PREPARED
) -> Mutation | Refusal:
    return mutate(p, ns, prepared, restore)


def mutated(p: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], Mutation]:
    result = run(p, **kw)
    assert isinstance(result, Mutation), result
    out: dict[str, Any] = jsonpatch.apply_patch(p, result.ops)
    return out, result


def env_of(p: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in p["spec"]["containers"][index].get("env", [])
    }


def test_no_annotation_or_excluded_namespace_is_untouched() -> None:
    assert run(pod()) == Mutation()
    assert run(pod({"other": "x"})) == Mutation()
    assert run(pod(SNAP), ns="kube-system") == Mutation()
    assert run(pod(SNAP), ns="thaw-system") == Mutation()


@pytest.mark.parametrize(
    ("annotations", "key", "value"),
    [
        ({"thaw.dev/snapshot": "Qwen_3"}, "thaw.dev/snapshot", "Qwen_3"),
        ({**SNAP, "thaw.dev/checkpoint": "always"}, "thaw.dev/checkpoint", "always"),
        ({**SNAP, "thaw.dev/placement": "anywhere"}, "thaw.dev/placement", "anywhere"),
        ({**SNAP, "thaw.dev/container": "Bad Name"}, "thaw.dev/container", "Bad Name"),
    ],
)
@pytest.mark.parametrize("restore", [True, False])
def test_invalid_annotation_refused_naming_key_value_and_allowed(
    annotations: dict[str, str], key: str, value: str, restore: bool
) -> None:
    result = run(pod(annotations), restore=restore)
    assert isinstance(result, Refusal) and result.code == 400
    assert key in result.message and repr(value) in result.message
    assert "allowed" in result.message or "must" in result.message


def test_container_annotation_naming_no_container_is_refused_with_the_names() -> None:
    result = run(pod({**SNAP, "thaw.dev/container": "sidecar"}))
    assert isinstance(result, Refusal)
    assert "thaw.dev/container='sidecar'" in result.message and "'server'" in result.message


def test_target_without_command_is_refused_saying_to_set_it() -> None:
    p = pod(SNAP)
    del p["spec"]["containers"][0]["command"]
    result = run(p)
    assert (
        isinstance(result, Refusal) and "has no command" in result.message and "Set command" in result.message
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.update(volumes=[{"name": "thaw-plan", "emptyDir": {}}]), "volume named 'thaw-plan'"),
        (
            lambda s: s.update(initContainers=[{"name": "thaw-fetch", "image": "x"}]),
            "container named 'thaw-fetch'",
        ),
        (
            lambda s: s["containers"].append({"name": "thaw-tools", "image": "x"}),
            "container named 'thaw-tools'",
        ),
        (
            lambda s: s["containers"][0].update(volumeMounts=[{"name": "v", "mountPath": "/thaw"}]),
            "already mounts something at '/thaw'",
        ),
    ],
)
def test_clashes_are_refused(change: Any, needle: str) -> None:
    p = pod(SNAP)
    change(p["spec"])
    result = run(p)
    assert isinstance(result, Refusal) and needle in result.message
    assert "rename yours" in result.message or "move yours" in result.message


def test_unlabelled_namespace_warns_and_mentions_what_would_be_refused() -> None:
    p = pod(SNAP)
    del p["spec"]["containers"][0]["command"]
    result = run(p, restore=False)
    assert isinstance(result, Mutation) and result.ops == []
    assert "kubectl label namespace ml thaw.dev/restore=allowed" in result.warnings[0]
    assert "has no command" in result.warnings[1]


def test_full_injection_targets_named_container_and_keeps_user_init_containers() -> None:
    p = pod({**SNAP, "thaw.dev/container": "server", "thaw.dev/checkpoint": "never"}, args=["--port", "8000"])
    p["spec"]["containers"].insert(0, {"name": "proxy", "image": "envoy"})
    p["spec"]["initContainers"] = [{"name": "download", "image": "busybox"}]
    out, result = mutated(p)
    spec = out["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["thaw-tools", "thaw-fetch", "download"]
    target = spec["containers"][1]
    assert target["command"] == ["/thaw/bin/thaw", "exec", "--", "vllm", "serve", "--port", "8000"]
    assert "args" not in target
    assert spec["containers"][0] == {"name": "proxy", "image": "envoy"}
    env = env_of(out, 1)
    assert env["THAW_CHECKPOINT"] == "never" and "THAW_KEY" not in env
    assert env["THAW_CONTAINER"] == "server" and env["THAW_NAME"] == "qwen3-8b-vllm"
    assert env["THAW_NODE_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    assert "thaw-key" not in {v["name"] for v in spec["volumes"]}
    assert target["securityContext"]["capabilities"]["add"] == ["CHECKPOINT_RESTORE", "SYS_PTRACE"]
    # The workload hash is the original container's, and the runtime can recompute it from the
    # injected one (Thaw's mounts and extended resource are not part of it).
    original = p["spec"]["containers"][1]
    assert out["metadata"]["annotations"]["thaw.dev/workload"] == workload_hash(original, PREPARED.allowlist)
    fetch_env = env_of(out)
    assert {e["name"]: e["value"] for e in spec["initContainers"][1]["env"]}["THAW_WORKLOAD"] == env[
        "THAW_WORKLOAD"
    ]
    assert fetch_env == {}  # container 0 (the proxy) is untouched
    assert result.warnings == []


def test_on_ready_mounts_signing_key_and_derives_ready_from_probe() -> None:
    p = pod(
        SNAP,
        ports=[{"name": "http", "containerPort": 8000}],
        readinessProbe={"httpGet": {"path": "/health", "port": "http"}},
    )
    out, result = mutated(p)
    env = env_of(out)
    assert env["THAW_CHECKPOINT"] == "on-ready"
    assert env["THAW_READY"] == "http://127.0.0.1:8000/health"
    assert env["THAW_KEY"] == "/etc/thaw/key/signing.key"
    assert {"name": "thaw-key", "mountPath": "/etc/thaw/key", "readOnly": True} in out["spec"]["containers"][
        0
    ]["volumeMounts"]
    assert result.warnings == []


def test_on_ready_without_probe_warns_and_without_signing_key_does_not_publish() -> None:
    _, result = mutated(pod(SNAP))
    assert any("no readinessProbe" in w for w in result.warnings)
    prepared = Prepared.build(parse_config({"signingKey": None}))
    out, result = mutated(pod(SNAP), prepared=prepared)
    assert env_of(out)["THAW_CHECKPOINT"] == "never" and "THAW_KEY" not in env_of(out)
    assert any("no signing key" in w for w in result.warnings)


def test_user_env_wins_and_non_root_is_warned() -> None:
    p = pod(SNAP, env=[{"name": "THAW_READY", "value": "file:/tmp/up"}], securityContext={"runAsUser": 1000})
    out, result = mutated(p)
    names = [e["name"] for e in out["spec"]["containers"][0]["env"]]
    assert names.count("THAW_READY") == 1 and env_of(out)["THAW_READY"] == "file:/tmp/up"
    assert any("runs as non-root" in w for w in result.warnings)


def test_user_set_workload_is_replaced_with_a_warning() -> None:
    out, result = mutated(pod({**SNAP, "thaw.dev/workload": "forged"}))
    assert out["metadata"]["annotations"]["thaw.dev/workload"] != "forged"
    assert any("set by the webhook" in w for w in result.warnings)


def test_idempotent_second_pass_adds_nothing() -> None:
    out, _ = mutated(pod(SNAP, args=["a"]))
    assert run(out) == Mutation()
    assert run(copy.deepcopy(out), restore=False) == Mutation()


def test_scheduler_options() -> None:
    prepared = Prepared.build(
        parse_config({"scheduler": {"extendedResource": True, "name": "thaw-scheduler"}})
    )
    out, _ = mutated(pod(SNAP, resources={"limits": {"nvidia.com/gpu": "1"}}), prepared=prepared)
    resources = out["spec"]["containers"][0]["resources"]
    assert resources == {
        "limits": {"nvidia.com/gpu": "1", "thaw.dev/restore": "1"},
        "requests": {"thaw.dev/restore": "1"},
    }
    assert out["spec"]["schedulerName"] == "thaw-scheduler"
    out, _ = mutated(pod(SNAP))  # defaults: neither
    assert "resources" not in out["spec"]["containers"][0] and "schedulerName" not in out["spec"]


def test_store_claim_and_trust_configmap() -> None:
    prepared = Prepared.build(
        parse_config({"store": {"claimName": "snapshots"}, "trust": {"configMapName": "keys"}})
    )
    out, _ = mutated(pod(SNAP), prepared=prepared)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["thaw-store"] == {
        "name": "thaw-store",
        "persistentVolumeClaim": {"claimName": "snapshots"},
    }
    assert volumes["thaw-trust"] == {"name": "thaw-trust", "configMap": {"name": "keys", "optional": True}}


def test_templates_are_not_shared_between_answers() -> None:
    first = run(pod(SNAP))
    assert isinstance(first, Mutation)
    for op in first.ops:
        if op["op"] == "add" and isinstance(op["value"], list):
            op["value"].clear()
    second = run(pod(SNAP))
    assert isinstance(second, Mutation)
    assert all(op["value"] for op in second.ops if op["op"] != "remove")


@pytest.mark.parametrize(
    "bad",
    [
        {"metadata": {"annotations": ["x"]}},
        {"metadata": {"annotations": SNAP}, "spec": {"containers": {"name": "c"}}},
        {"metadata": {"annotations": SNAP}, "spec": {"containers": [{"name": "c", "command": "run"}]}},
        {"metadata": {"annotations": SNAP}},
    ],
)
def test_malformed_pods_raise_malformed(bad: dict[str, Any]) -> None:
    with pytest.raises(MalformedPod):
        run(bad)


def test_workload_hash_is_stable_and_sensitive_to_what_matters() -> None:
    allow = EnvAllowlist.parse(["VLLM_*", "MODEL"])
    base: dict[str, Any] = {
        "image": "i",
        "command": ["a"],
        "args": ["b"],
        "env": [{"name": "MODEL", "value": "q"}, {"name": "HOME", "value": "/root"}],
        "volumeMounts": [
            {"name": "kube-api-access-x1y2z", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
        ],
    }
    h = workload_hash(base, allow)
    assert len(h) == 32 and h == workload_hash(copy.deepcopy(base), allow)
    same = copy.deepcopy(base)
    same["env"][1]["value"] = "/home"  # not allowlisted
    same["volumeMounts"][0]["name"] = "kube-api-access-abcde"  # random suffix: by path, not name
    same["volumeMounts"].append({"name": "thaw-tools", "mountPath": "/thaw"})  # Thaw's own
    same["resources"] = {"requests": {"thaw.dev/restore": "1"}}
    assert workload_hash(same, allow) == h
    for change in (
        {"image": "j"},
        {"args": ["c"]},
        {"env": [{"name": "MODEL", "value": "r"}]},
        {"env": [{"name": "MODEL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    ):
        assert workload_hash({**base, **change}, allow) != h, change


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy='Sometimes'"),
        ({"store": {"hostPath": "/a", "claimName": "b"}}, "exactly one of hostPath, claimName"),
        ({"cache": {"hostPath": "relative"}}, "cache.hostPath='relative'"),
        ({"capabilities": ["CAP_SYS_ADMIN"]}, "without CAP_"),
        ({"scheduler": {"extendedResource": "yes"}}, "scheduler.extendedResource='yes'"),
        ({"ready": {"default": "localhost:80"}}, "ready.default"),
        ({"colour": "blue"}, "known keys"),
        ({"scheduler": {"nmae": "x"}}, "scheduler.nmae"),
        ([1], "must hold a mapping"),
    ],
)
def test_config_errors_name_key_value_and_allowed(raw: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match="not valid") as err:
        parse_config(raw)
    assert needle in str(err.value)


def test_config_file_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("image: reg/thaw:1\nscheduler:\n  extendedResource: true\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.image == "reg/thaw:1" and config.extended_resource is True
    (tmp_path / "c.json").write_text('{"excludedNamespaces": ["a"]}')
    assert load_config(tmp_path / "c.json").excluded_namespaces == frozenset({"a"})
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None) == WebhookConfig()
