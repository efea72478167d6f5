"""The pure mutation: decisions, refusals, idempotence, configuration."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from thaw.contract.workload import EnvAllowlist, image_identity, is_pinned, workload_hash
from webhook.config import ConfigError, WebhookConfig, load_config, parse_config
from webhook.mutate import MalformedPod, Mutation, Refusal, mutate
from webhook.patches import Prepared

PREPARED = Prepared.build(WebhookConfig())
# Pinned by digest: an image with only a tag gets a warning (tested on its own below).
IMAGE = "vllm/vllm-openai@sha256:" + "ab" * 32


def pod(annotations: dict[str, str] | None = None, **container: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "server", "image": IMAGE, "command": ["vllm", "serve"]}
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
    assert [c["name"] for c in spec["initContainers"]] == [
        "thaw-tools",
        "thaw-fetch",
        "thaw-sidecar",
        "download",
    ]
    target = spec["containers"][1]
    assert target["command"] == ["/thaw/rt/bin/thaw", "exec", "--", "vllm", "serve", "--port", "8000"]
    assert "args" not in target
    assert spec["containers"][0] == {"name": "proxy", "image": "envoy"}
    env = env_of(out, 1)
    assert env["THAW_CHECKPOINT"] == "never" and "THAW_KEY" not in env
    assert env["THAW_CONTAINER"] == "server" and env["THAW_NAME"] == "qwen3-8b-vllm"
    assert env["THAW_NODE_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
    assert "thaw-key" not in {v["name"] for v in spec["volumes"]}
    assert target["securityContext"]["capabilities"]["add"] == ["CHECKPOINT_RESTORE", "SYS_PTRACE"]
    # The workload hash is the original container's in the request's namespace, and the runtime can
    # recompute it from the injected one (Thaw's mounts and extended resource are not part of it).
    original = p["spec"]["containers"][1]
    expected = workload_hash(original, PREPARED.allowlist, "ml")
    assert out["metadata"]["annotations"]["thaw.dev/workload"] == expected
    assert (
        workload_hash(
            target | {"command": original["command"], "args": ["--port", "8000"]}, PREPARED.allowlist, "ml"
        )
        == expected
    )
    for init in spec["initContainers"][1:3]:
        assert {e["name"]: e.get("value") for e in init["env"]}["THAW_WORKLOAD"] == env["THAW_WORKLOAD"]
    assert result.warnings == []


def test_on_ready_gives_the_signing_key_to_the_sidecar_only_and_derives_ready_from_probe() -> None:
    p = pod(
        SNAP,
        ports=[{"name": "http", "containerPort": 8000}],
        readinessProbe={"httpGet": {"path": "/health", "port": "http"}},
    )
    out, result = mutated(p)
    env = env_of(out)
    assert env["THAW_CHECKPOINT"] == "on-ready"
    assert env["THAW_READY"] == "http://127.0.0.1:8000/health"
    assert "THAW_KEY" not in env and "THAW_STORE" not in env
    sidecar = init_named(out, "thaw-sidecar")
    assert sidecar["restartPolicy"] == "Always"
    assert {e["name"]: e.get("value") for e in sidecar["env"]}["THAW_KEY"] == "/etc/thaw/key/signing.key"
    assert {"name": "thaw-key", "mountPath": "/etc/thaw/key", "readOnly": True} in sidecar["volumeMounts"]
    assert result.warnings == []


def init_named(p: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in p["spec"]["initContainers"] if c["name"] == name)
    return found


def test_without_probe_no_checkpoint_and_without_signing_key_no_publish() -> None:
    out, result = mutated(pod(SNAP))
    # Never on-ready without a readiness target: the pod starts, and says why it will not checkpoint.
    assert env_of(out)["THAW_CHECKPOINT"] == "never" and "THAW_READY" not in env_of(out)
    (warning,) = result.warnings
    assert (
        "no readinessProbe" in warning and "THAW_READY" in warning and "thaw.dev/checkpoint: never" in warning
    )
    assert "thaw-key" not in {v["name"] for v in out["spec"]["volumes"]}
    # Saying never yourself silences it.
    _, result = mutated(pod({**SNAP, "thaw.dev/checkpoint": "never"}))
    assert result.warnings == []
    # An exec readinessProbe names nothing thaw exec can probe: the same.
    _, result = mutated(pod(SNAP, readinessProbe={"exec": {"command": ["true"]}}))
    assert any("no readinessProbe" in w for w in result.warnings)
    prepared = Prepared.build(parse_config({"signingKey": None}))
    out, result = mutated(pod(SNAP, readinessProbe={"tcpSocket": {"port": 8000}}), prepared=prepared)
    assert env_of(out)["THAW_CHECKPOINT"] == "never"
    assert all("THAW_KEY" not in {e["name"] for e in c.get("env", [])} for c in out["spec"]["initContainers"])
    assert any("no signing key" in w for w in result.warnings)


def test_user_env_wins_and_non_root_is_warned() -> None:
    p = pod(SNAP, env=[{"name": "THAW_READY", "value": "file:/tmp/up"}], securityContext={"runAsUser": 1000})
    out, result = mutated(p)
    names = [e["name"] for e in out["spec"]["containers"][0]["env"]]
    assert names.count("THAW_READY") == 1 and env_of(out)["THAW_READY"] == "file:/tmp/up"
    # A user THAW_READY is a readiness target: the pod checkpoints.
    assert env_of(out)["THAW_CHECKPOINT"] == "on-ready"
    assert [w for w in result.warnings if "runs as non-root" in w]


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
    h = workload_hash(base, allow, "ml")
    assert len(h) == 32 and h == workload_hash(copy.deepcopy(base), allow, "ml")
    same = copy.deepcopy(base)
    same["env"][1]["value"] = "/home"  # not allowlisted
    same["volumeMounts"][0]["name"] = "kube-api-access-abcde"  # random suffix: by path, not name
    same["volumeMounts"].append({"name": "thaw-tools", "mountPath": "/thaw"})  # Thaw's own
    same["volumeMounts"].append({"name": "thaw-snapshots", "mountPath": "/var/lib/thaw/cache/ml/q"})
    same["resources"] = {"requests": {"thaw.dev/restore": "1"}}
    assert workload_hash(same, allow, "ml") == h
    # Version 2: the namespace counts; two namespaces never share a snapshot.
    assert workload_hash(base, allow, "other") != h
    for change in (
        {"image": "j"},
        {"args": ["c"]},
        {"env": [{"name": "MODEL", "value": "r"}]},
        {"env": [{"name": "MODEL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {"envFrom": [{"secretRef": {"name": "creds"}}]},
        {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    ):
        assert workload_hash({**base, **change}, allow, "ml") != h, change


@pytest.mark.parametrize(
    ("image", "identity", "pinned"),
    [
        ("vllm/vllm-openai:v0.9", "vllm/vllm-openai:v0.9", False),
        ("vllm/vllm-openai", "vllm/vllm-openai", False),
        ("vllm/vllm-openai@sha256:" + "a" * 64, "vllm/vllm-openai@sha256:" + "a" * 64, True),
        # The digest decides; the tag beside it is a label (two tags of one digest are one workload).
        ("vllm/vllm-openai:v0.9@sha256:" + "a" * 64, "vllm/vllm-openai@sha256:" + "a" * 64, True),
        ("reg.local:5000/vllm:v1@sha256:" + "b" * 64, "reg.local:5000/vllm@sha256:" + "b" * 64, True),
        ("reg.local:5000/vllm", "reg.local:5000/vllm", False),
    ],
)
def test_image_by_digest(image: str, identity: str, pinned: bool) -> None:
    assert image_identity(image) == identity and is_pinned(image) is pinned
    allow = EnvAllowlist.parse([])
    if pinned:
        retagged = image.split("@", maxsplit=1)[0].rsplit(":", 1)[0] + ":other@" + image.split("@")[1]
        assert workload_hash({"image": retagged}, allow, "ml") == workload_hash({"image": image}, allow, "ml")


def test_mutable_tag_is_warned_with_why_and_the_fix() -> None:
    _, result = mutated(pod(SNAP, image="vllm/vllm-openai:latest", readinessProbe={"tcpSocket": {"port": 1}}))
    (warning,) = result.warnings
    assert "'vllm/vllm-openai:latest' has no digest" in warning
    assert "re-pushed" in warning and "old" in warning and "@sha256:" in warning


def test_pod_identity_is_forced_with_a_warning() -> None:
    env = [
        {"name": "THAW_POD_NAMESPACE", "value": "kube-system"},
        {"name": "MODEL", "value": "m"},
        {"name": "THAW_POD_NAME", "value": "kube-apiserver-x"},
        {"name": "THAW_POD_NAME", "value": "etcd-x"},
    ]
    p = pod(SNAP, env=env, readinessProbe={"tcpSocket": {"port": 1}})
    out, result = mutated(p)
    got = out["spec"]["containers"][0]["env"]
    by_name = [e for e in got if e["name"].startswith("THAW_POD_") or e["name"] == "THAW_NODE_NAME"]
    # Every entry of those names is the downward API's, none is the user's, none was dropped.
    assert [e["name"] for e in by_name] == [
        "THAW_POD_NAMESPACE",
        "THAW_POD_NAME",
        "THAW_POD_NAME",
        "THAW_POD_UID",
        "THAW_NODE_NAME",
    ]
    assert all("value" not in e and e["valueFrom"]["fieldRef"]["fieldPath"] for e in by_name)
    assert {"name": "MODEL", "value": "m"} in got
    (warning,) = result.warnings
    assert "THAW_POD_NAMESPACE, THAW_POD_NAME" in warning and "replaced" in warning
    # The identity is the same in every Thaw container that reads it.
    for c in out["spec"]["initContainers"][1:]:
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
        assert fields == {
            "THAW_POD_NAME": "metadata.name",
            "THAW_POD_NAMESPACE": "metadata.namespace",
            "THAW_POD_UID": "metadata.uid",
            "THAW_NODE_NAME": "spec.nodeName",
        }


def test_other_schedulers_are_left_alone_with_a_warning() -> None:
    prepared = Prepared.build(parse_config({"scheduler": {"name": "thaw-scheduler"}}))
    for name in ("volcano", "kai-scheduler", "hami-scheduler"):
        p = pod(SNAP)
        p["spec"]["schedulerName"] = name
        for restore in (True, False):
            result = run(p, restore=restore, prepared=prepared)
            assert isinstance(result, Mutation) and result.ops == []
            (warning,) = result.warnings
            assert f"schedulerName is {name!r}" in warning and "unchanged" in warning and "cold" in warning
    for name in ("default-scheduler", "thaw-scheduler", ""):
        p = pod(SNAP, readinessProbe={"tcpSocket": {"port": 1}})
        p["spec"]["schedulerName"] = name
        out, result = mutated(p, prepared=prepared)
        assert out["spec"]["schedulerName"] == "thaw-scheduler" and result.warnings == []


def test_inductor_default_unless_the_container_sets_it() -> None:
    out, _ = mutated(pod(SNAP))
    assert env_of(out)["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    out, _ = mutated(pod(SNAP, env=[{"name": "TORCHINDUCTOR_COMPILE_THREADS", "value": "8"}]))
    assert env_of(out)["TORCHINDUCTOR_COMPILE_THREADS"] == "8"


def test_replica_env_and_config_mounts() -> None:
    p = pod(
        SNAP,
        env=[
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
        volumeMounts=[
            {"name": "cm", "mountPath": "/etc/b"},
            {"name": "sec", "mountPath": "/etc/a", "subPath": "x"},
            {"name": "proj", "mountPath": "/etc/c"},
            {"name": "sa", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
            {"name": "data", "mountPath": "/data"},
        ],
    )
    p["spec"]["volumes"] = [
        {"name": "cm", "configMap": {"name": "c"}},
        {"name": "sec", "secret": {"secretName": "s"}},
        {"name": "proj", "projected": {"sources": [{"configMap": {"name": "c"}}]}},
        {"name": "sa", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
        {"name": "data", "emptyDir": {}},
    ]
    out, _ = mutated(p)
    env = env_of(out)
    assert env["THAW_REPLICA_ENV"] == "POD_IP,MEM"
    assert env["THAW_CONFIG_MOUNTS"] == "/etc/a,/etc/b,/etc/c"
    out, _ = mutated(pod(SNAP))
    assert env_of(out)["THAW_REPLICA_ENV"] == "" and env_of(out)["THAW_CONFIG_MOUNTS"] == ""


def test_the_workload_gets_only_its_own_snapshots_read_only() -> None:
    """notes/POD-LAYOUT.md's trust boundary: no store, no key, no writable cache in the workload;
    its plan read-only; its snapshots <cache>/<namespace>/<name> read-only, at thaw-fetch's path."""
    out, _ = mutated(pod(SNAP, readinessProbe={"tcpSocket": {"port": 1}}), ns="team-a")
    spec = out["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    target = spec["containers"][0]
    mounts = {m["mountPath"]: m for m in target["volumeMounts"]}
    for m in target["volumeMounts"]:
        source = volumes[m["name"]]
        if "hostPath" in source or m["mountPath"] == "/run/thaw/plan":
            assert m.get("readOnly") is True, m
    assert not {"thaw-store", "thaw-key", "thaw-cache", "thaw-trust", "thaw-state"} & {
        m["name"] for m in target["volumeMounts"]
    }
    own = mounts["/var/lib/thaw/cache/team-a/qwen3-8b-vllm"]
    assert volumes[own["name"]]["hostPath"]["path"] == "/var/lib/thaw/cache/team-a/qwen3-8b-vllm"
    assert mounts["/run/thaw/work"].get("readOnly") is not True
    assert not {n for n in env_of(out) if n in ("THAW_KEY", "THAW_STORE", "THAW_CACHE")}
    # The writers of shared state are Thaw's containers.
    fetch, sidecar = init_named(out, "thaw-fetch"), init_named(out, "thaw-sidecar")
    assert {m["mountPath"] for m in fetch["volumeMounts"] if not m.get("readOnly")} == {
        "/run/thaw/plan",
        "/var/lib/thaw/cache",
    }
    assert {e["name"]: e.get("value") for e in fetch["env"]}["THAW_NAMESPACE"] == "team-a"
    assert {m["mountPath"] for m in sidecar["volumeMounts"] if not m.get("readOnly")} == {
        "/var/lib/thaw/cache",
        "/var/lib/thaw/store",
        "/run/thaw/work",
        "/run/thaw/state",
    }
    tools = init_named(out, "thaw-tools")
    assert tools["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert tools["securityContext"]["runAsUser"] == 0


def test_a_namespace_that_is_no_label_is_not_made_into_a_path() -> None:
    with pytest.raises(MalformedPod, match="namespace"):
        run(pod(SNAP), ns="../etc")


def test_ready_gate_is_behind_its_switch() -> None:
    out, _ = mutated(pod(SNAP))
    assert "startupProbe" not in out["spec"]["containers"][0]
    prepared = Prepared.build(parse_config({"ready": {"startupProbe": True}}))
    out, _ = mutated(pod(SNAP), prepared=prepared)
    probe = out["spec"]["containers"][0]["startupProbe"]
    assert probe["exec"]["command"][:4] == [
        "/thaw/rt/bin/thaw",
        "healthcheck",
        "--file",
        "/run/thaw/work/ready",
    ]
    own = {"httpGet": {"path": "/started", "port": 8000}, "failureThreshold": 60}
    out, _ = mutated(pod(SNAP, startupProbe=own), prepared=prepared)
    assert out["spec"]["containers"][0]["startupProbe"] == own


def test_sidecar_resources_are_small_and_configurable() -> None:
    out, _ = mutated(pod(SNAP))
    assert init_named(out, "thaw-sidecar")["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    prepared = Prepared.build(parse_config({"sidecarResources": {"requests": {"cpu": "50m"}}}))
    out, _ = mutated(pod(SNAP), prepared=prepared)
    assert init_named(out, "thaw-sidecar")["resources"] == {"requests": {"cpu": "50m"}}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy='Sometimes'"),
        ({"store": {"hostPath": "/a", "claimName": "b"}}, "exactly one of hostPath, claimName"),
        ({"store": {"registry": "https://reg/thaw"}}, "oci://HOST[:PORT]/REPOSITORY"),
        ({"store": {"hostPath": "/a", "authSecretName": "r"}}, "only with registry"),
        ({"store": {"registry": "oci://reg/t", "caSecret": "a", "caConfigMap": "b"}}, "at most one of"),
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
