"""Table-driven tests: the exact JSON Patch operations each builder emits."""

from __future__ import annotations

from typing import Any

import jsonpatch
import pytest

from webhook import patches as P
from webhook.config import WebhookConfig
from webhook.types import pointer

C = {"name": "thaw-tools"}
D = {"name": "thaw-fetch"}


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("metadata", "annotations", "thaw.dev/injected"), "/metadata/annotations/thaw.dev~1injected"),
        (("a~b", "c/d~1"), "/a~0b/c~1d~01"),  # ~ first, so a literal "~1" survives as "~01"
        (("spec", "containers", 3, "env"), "/spec/containers/3/env"),
        (("",), "/"),
    ],
)
def test_pointer_escapes(parts: tuple[str | int, ...], expected: str) -> None:
    assert pointer(*parts) == expected


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, [{"op": "add", "path": "/metadata/annotations", "value": {"thaw.dev/injected": "v1"}}]),
        ({}, [{"op": "add", "path": "/metadata/annotations/thaw.dev~1injected", "value": "v1"}]),
        ({"a": "b"}, [{"op": "add", "path": "/metadata/annotations/thaw.dev~1injected", "value": "v1"}]),
    ],
)
def test_annotation_ops(existing: dict[str, str] | None, expected: list[dict[str, Any]]) -> None:
    assert P.annotation_ops(existing, {"thaw.dev/injected": "v1"}) == expected


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, [{"op": "add", "path": "/spec/initContainers", "value": [C, D]}]),
        (
            [{"name": "mine"}],
            [
                {"op": "add", "path": "/spec/initContainers/0", "value": C},
                {"op": "add", "path": "/spec/initContainers/1", "value": D},
            ],
        ),
        (
            [],
            [
                {"op": "add", "path": "/spec/initContainers/0", "value": C},
                {"op": "add", "path": "/spec/initContainers/1", "value": D},
            ],
        ),
    ],
)
def test_init_container_ops_put_ours_first(
    existing: list[Any] | None, expected: list[dict[str, Any]]
) -> None:
    ops = P.init_container_ops(existing, [C, D])
    assert ops == expected
    pod = {"spec": {} if existing is None else {"initContainers": list(existing)}}
    names = [c["name"] for c in jsonpatch.apply_patch(pod, ops)["spec"]["initContainers"]]
    assert names[:2] == ["thaw-tools", "thaw-fetch"] and names[2:] == [c["name"] for c in existing or []]


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, [{"op": "add", "path": "/spec/volumes", "value": [{"name": "v"}]}]),
        ([{"name": "x"}], [{"op": "add", "path": "/spec/volumes/-", "value": {"name": "v"}}]),
    ],
)
def test_volume_ops(existing: list[Any] | None, expected: list[dict[str, Any]]) -> None:
    assert P.volume_ops(existing, [{"name": "v"}]) == expected


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        (
            {"command": ["srv"]},
            [
                {
                    "op": "replace",
                    "path": "/spec/containers/1/command",
                    "value": ["/thaw/rt/bin/thaw", "exec", "--", "srv"],
                }
            ],
        ),
        (
            {"command": ["srv", "-x"], "args": ["--port", "80"]},
            [
                {
                    "op": "replace",
                    "path": "/spec/containers/1/command",
                    "value": ["/thaw/rt/bin/thaw", "exec", "--", "srv", "-x", "--port", "80"],
                },
                {"op": "remove", "path": "/spec/containers/1/args"},
            ],
        ),
        (
            {"command": ["srv"], "args": []},
            [
                {
                    "op": "replace",
                    "path": "/spec/containers/1/command",
                    "value": ["/thaw/rt/bin/thaw", "exec", "--", "srv"],
                },
                {"op": "remove", "path": "/spec/containers/1/args"},
            ],
        ),
    ],
)
def test_command_ops(container: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert P.command_ops(1, container) == expected


E1 = {"name": "THAW_NAME", "value": "s"}
E2 = {"name": "THAW_READY", "value": "tcp:1"}


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, [{"op": "add", "path": "/spec/containers/0/env", "value": [E1, E2]}]),
        (
            [{"name": "A", "value": "1"}],
            [
                {"op": "add", "path": "/spec/containers/0/env/-", "value": E1},
                {"op": "add", "path": "/spec/containers/0/env/-", "value": E2},
            ],
        ),
        # A name the user set wins: THAW_READY overrides the probe-derived target.
        (
            [{"name": "THAW_READY", "value": "file:/x"}],
            [{"op": "add", "path": "/spec/containers/0/env/-", "value": E1}],
        ),
        ([E1, E2], []),
    ],
)
def test_env_ops(existing: list[Any] | None, expected: list[dict[str, Any]]) -> None:
    assert P.env_ops(0, existing, [E1, E2]) == expected


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (
            None,
            [
                {
                    "op": "add",
                    "path": "/spec/containers/0/securityContext",
                    "value": {"capabilities": {"add": ["A", "B"]}},
                }
            ],
        ),
        (
            {},
            [
                {
                    "op": "add",
                    "path": "/spec/containers/0/securityContext/capabilities",
                    "value": {"add": ["A", "B"]},
                }
            ],
        ),
        (
            {"capabilities": {"drop": ["ALL"]}},
            [
                {
                    "op": "add",
                    "path": "/spec/containers/0/securityContext/capabilities/add",
                    "value": ["A", "B"],
                }
            ],
        ),
        (
            {"capabilities": {"add": ["B", "NET_ADMIN"]}},
            [{"op": "add", "path": "/spec/containers/0/securityContext/capabilities/add/-", "value": "A"}],
        ),
        ({"capabilities": {"add": ["CAP_A", "B"]}}, []),
    ],
)
def test_capability_ops(ctx: dict[str, Any] | None, expected: list[dict[str, Any]]) -> None:
    assert P.capability_ops(0, ctx, ["A", "B"]) == expected


R = "/spec/containers/2/resources"


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (
            None,
            [
                {
                    "op": "add",
                    "path": R,
                    "value": {"requests": {"thaw.dev/restore": "1"}, "limits": {"thaw.dev/restore": "1"}},
                }
            ],
        ),
        (
            {},
            [
                {"op": "add", "path": R + "/requests", "value": {"thaw.dev/restore": "1"}},
                {"op": "add", "path": R + "/limits", "value": {"thaw.dev/restore": "1"}},
            ],
        ),
        (
            {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
            [
                {"op": "add", "path": R + "/requests/thaw.dev~1restore", "value": "1"},
                {"op": "add", "path": R + "/limits/thaw.dev~1restore", "value": "1"},
            ],
        ),
    ],
)
def test_extended_resource_ops(resources: dict[str, Any] | None, expected: list[dict[str, Any]]) -> None:
    assert P.extended_resource_ops(2, resources) == expected


@pytest.mark.parametrize(
    ("spec", "name", "expected"),
    [
        ({"schedulerName": "default-scheduler"}, None, []),
        (
            {"schedulerName": "default-scheduler"},
            "thaw",
            [{"op": "add", "path": "/spec/schedulerName", "value": "thaw"}],
        ),
        ({}, "thaw", [{"op": "add", "path": "/spec/schedulerName", "value": "thaw"}]),
        ({"schedulerName": "thaw"}, "thaw", []),
    ],
)
def test_scheduler_name_ops(spec: dict[str, Any], name: str | None, expected: list[dict[str, Any]]) -> None:
    assert P.scheduler_name_ops(spec, name) == expected


PORTS = [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 9000}]


@pytest.mark.parametrize(
    ("probe", "default", "expected"),
    [
        ({"httpGet": {"path": "/health", "port": 8000}}, None, ("http://127.0.0.1:8000/health", None)),
        (
            {"httpGet": {"path": "/v1/models", "port": "http", "scheme": "HTTPS"}},
            None,
            ("https://127.0.0.1:8000/v1/models", None),
        ),
        ({"httpGet": {"port": 8080}}, None, ("http://127.0.0.1:8080/", None)),
        ({"httpGet": {"port": "8080", "path": "ready"}}, None, ("http://127.0.0.1:8080/ready", None)),
        ({"tcpSocket": {"port": "grpc"}}, None, ("tcp:9000", None)),
        ({"grpc": {"port": 50051}}, None, ("tcp:50051", None)),
        ({"exec": {"command": ["true"]}}, "tcp:1", ("tcp:1", None)),
        (None, "file:/tmp/ready", ("file:/tmp/ready", None)),
        (None, None, (None, None)),
        (
            {"httpGet": {"port": "nope"}},
            None,
            (None, "readinessProbe.httpGet.port 'nope' names no port of the container"),
        ),
    ],
)
def test_ready_target(
    probe: dict[str, Any] | None, default: str | None, expected: tuple[str | None, str | None]
) -> None:
    container: dict[str, Any] = {"name": "c", "ports": PORTS}
    if probe is not None:
        container["readinessProbe"] = probe
    assert P.ready_target(container, default) == expected


IDENTITY = {
    "name": "THAW_POD_NAME",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
}
FORCED = {"THAW_POD_NAME"}


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        # Not set by the user: appended like any other.
        (None, [{"op": "add", "path": "/spec/containers/0/env", "value": [E1, IDENTITY]}]),
        (
            [{"name": "A", "value": "1"}],
            [
                {"op": "add", "path": "/spec/containers/0/env/-", "value": E1},
                {"op": "add", "path": "/spec/containers/0/env/-", "value": IDENTITY},
            ],
        ),
        # Set by the user: replaced where it stands (not appended: a later entry would win anyway,
        # but an earlier one of the user's would stay in the pod spec).
        (
            [{"name": "THAW_POD_NAME", "value": "kube-apiserver-x"}],
            [
                {"op": "replace", "path": "/spec/containers/0/env/0", "value": IDENTITY},
                {"op": "add", "path": "/spec/containers/0/env/-", "value": E1},
            ],
        ),
        # Every entry of the name, and a non-forced name the user set is still theirs.
        (
            [
                {"name": "THAW_POD_NAME", "value": "a"},
                {"name": "THAW_NAME", "value": "mine"},
                {"name": "THAW_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ],
            [
                {"op": "replace", "path": "/spec/containers/0/env/0", "value": IDENTITY},
                {"op": "replace", "path": "/spec/containers/0/env/2", "value": IDENTITY},
            ],
        ),
    ],
)
def test_env_ops_force_identity(existing: list[Any] | None, expected: list[dict[str, Any]]) -> None:
    ops = P.env_ops(0, existing, [E1, IDENTITY], FORCED)
    assert ops == expected
    pod = {"spec": {"containers": [{"name": "c"} if existing is None else {"name": "c", "env": existing}]}}
    env = jsonpatch.apply_patch(pod, ops)["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "THAW_POD_NAME"] and all(
        e == IDENTITY for e in env if e["name"] == "THAW_POD_NAME"
    )


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, []),
        ([{"name": "A"}, "junk", {"name": 3}], []),
        (
            [{"name": "THAW_POD_UID"}, {"name": "THAW_POD_NAME"}, {"name": "THAW_POD_UID"}],
            ["THAW_POD_UID", "THAW_POD_NAME"],
        ),
    ],
)
def test_forced_names_set(existing: list[Any] | None, expected: list[str]) -> None:
    assert P.forced_names_set(existing, P.IDENTITY_NAMES) == expected


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        ({"name": "c"}, [{"op": "add", "path": "/spec/containers/3/startupProbe", "value": P.READY_PROBE}]),
        ({"name": "c", "startupProbe": {"tcpSocket": {"port": 1}}}, []),
    ],
)
def test_startup_probe_ops(container: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    ops = P.startup_probe_ops(3, container)
    assert ops == expected
    if ops:  # each answer has its own copy of the template
        ops[0]["value"]["exec"]["command"].clear()  # type: ignore[typeddict-item]
        assert P.startup_probe_ops(3, container) == expected and P.READY_PROBE["exec"]["command"]


def test_ready_probe_command_is_the_runtime_link_and_the_work_dir_ready_file() -> None:
    command = P.READY_PROBE["exec"]["command"]
    assert command[0] == P.THAW_BIN and command[1] == "healthcheck"
    assert command[command.index("--file") + 1] == P.WORK_DIR + "/ready"
    # Its budget outlasts thaw exec's default --ready-timeout (a startupProbe that runs out kills).
    assert P.READY_PROBE["periodSeconds"] * P.READY_PROBE["failureThreshold"] > 1800


def test_fresh_parts_are_per_pod() -> None:
    prepared = P.Prepared.build(WebhookConfig())
    a = prepared.fresh(True, "ns-a", "snap", "w1", "on-ready")
    b = prepared.fresh(False, "ns-b", "snap", "w2", "never")
    assert a["volumes"][-1]["hostPath"]["path"] == "/var/lib/thaw/cache/ns-a/snap"
    assert b["volumes"][-1]["hostPath"]["path"] == "/var/lib/thaw/cache/ns-b/snap"
    assert {"name": "thaw-snapshots", "mountPath": "/var/lib/thaw/cache/ns-b/snap", "readOnly": True} in b[
        "mounts"
    ]
    assert "thaw-key" in {v["name"] for v in a["volumes"]} and "thaw-key" not in {
        v["name"] for v in b["volumes"]
    }
    sidecar_env = {e["name"]: e.get("value") for e in b["init"][2]["env"]}
    assert sidecar_env["THAW_CHECKPOINT"] == "never" and sidecar_env["THAW_WORKLOAD"] == "w2"


def test_thaw_mounts_never_count_in_the_workload_hash() -> None:
    from thaw.contract.workload import CACHE_MOUNT_ROOT, EXCLUDED_MOUNT_PATHS

    assert set(P.MOUNT_PATHS) <= EXCLUDED_MOUNT_PATHS and P.CACHE_DIR == CACHE_MOUNT_ROOT
    prepared = P.Prepared.build(WebhookConfig())
    for m in prepared.fresh(True, "ns", "snap", "w", "on-ready")["mounts"]:
        assert m["mountPath"] in EXCLUDED_MOUNT_PATHS or m["mountPath"].startswith(CACHE_MOUNT_ROOT + "/")


@pytest.mark.parametrize(
    ("store", "env", "volumes"),
    [
        (
            {"registry": "oci://reg.example:5000/thaw"},
            {"THAW_STORE": "oci://reg.example:5000/thaw"},
            {},
        ),
        (
            {
                "registry": "oci://reg.example/thaw",
                "authSecretName": "pull",
                "caSecret": "ca",
                "caKey": "r.pem",
            },
            {
                "THAW_STORE": "oci://reg.example/thaw",
                "THAW_REGISTRY_AUTH": "/etc/thaw/registry-auth",
                "THAW_REGISTRY_CA": "/etc/thaw/registry-ca/r.pem",
            },
            {
                "thaw-registry-auth": {
                    "secret": {"secretName": "pull", "optional": True, "defaultMode": 0o400}
                },
                "thaw-registry-ca": {"secret": {"secretName": "ca", "optional": True}},
            },
        ),
        (
            {"registry": "oci://reg.example/thaw", "caConfigMap": "ca"},
            {"THAW_STORE": "oci://reg.example/thaw", "THAW_REGISTRY_CA": "/etc/thaw/registry-ca/ca.crt"},
            {"thaw-registry-ca": {"configMap": {"name": "ca", "optional": True}}},
        ),
    ],
)
def test_registry_store_reaches_fetch_and_sidecar_only(
    store: dict[str, str], env: dict[str, str], volumes: dict[str, dict[str, Any]]
) -> None:
    """A registry store (issue 13) is env and optional Secret/ConfigMap volumes for thaw-fetch and
    thaw-sidecar; no store volume at all; the workload sees none of it."""
    from webhook.config import parse_config

    parts = P.Prepared.build(parse_config({"store": store})).fresh(True, "ns", "snap", "w", "on-ready")
    tools, fetch, sidecar = parts["init"]
    by_name = {v["name"]: v for v in parts["volumes"]}
    assert P.VOL_STORE not in by_name
    assert {n: {k: v for k, v in by_name[n].items() if k != "name"} for n in volumes} == volumes
    assert not {P.VOL_REGISTRY_AUTH, P.VOL_REGISTRY_CA} - set(volumes) & set(by_name)
    for c in (fetch, sidecar):
        got = {
            e["name"]: e["value"] for e in c["env"] if e["name"].startswith(("THAW_STORE", "THAW_REGISTRY"))
        }
        assert got == env, c["name"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        for name in volumes:
            assert mounts[name]["readOnly"] is True and mounts[name]["mountPath"].startswith("/etc/thaw/")
        assert P.VOL_STORE not in mounts
    workload_env = {e["name"] for e in parts["env"]}
    assert not workload_env & {"THAW_STORE", "THAW_REGISTRY_AUTH", "THAW_REGISTRY_CA"}
    assert not {m["name"] for m in parts["mounts"]} & {P.VOL_STORE, *volumes}
    assert not {m["name"] for m in tools["volumeMounts"]} & {P.VOL_STORE, *volumes}
