"""Property tests: arbitrary pods and malformed reviews never give a 500 (an exception out of
build_response), a patch that does not apply, or a second patch on reinvocation."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from webhook.config import WebhookConfig, parse_config
from webhook.patches import Prepared
from webhook.review import build_response

CONFIGS = [
    Prepared.build(WebhookConfig()),
    Prepared.build(parse_config({"scheduler": {"extendedResource": True, "name": "s"}, "signingKey": None})),
]

# Mostly ordinary values, so that most pods are injected; sometimes the ones that must be refused.
names = st.sampled_from(["c", "server", "sidecar"] * 4 + ["thaw-tools", "thaw-fetch", "x/y", "a~b", ""])
text = st.text(max_size=12)
json_leaf = st.none() | st.booleans() | st.integers(-3, 70000) | text
json_any = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
maybe = lambda s: st.none() | s  # noqa: E731

env_var = st.fixed_dictionaries(
    {"name": st.sampled_from(["THAW_READY", "THAW_PLAN", "MODEL", "VLLM_X", "A"])}, optional={"value": text}
)
mount = st.fixed_dictionaries(
    {"name": names, "mountPath": st.sampled_from(["/data", "/thaw", "/run/thaw", "/models", "/a/b"])},
    optional={"readOnly": st.booleans()},
)
probe = st.one_of(
    st.fixed_dictionaries(
        {
            "httpGet": st.fixed_dictionaries(
                {"port": st.integers(0, 70000) | st.sampled_from(["http", "9", "nope"])},
                optional={"path": text},
            )
        }
    ),
    st.fixed_dictionaries({"tcpSocket": st.fixed_dictionaries({"port": st.integers(1, 65535) | names})}),
    st.fixed_dictionaries({"exec": st.fixed_dictionaries({"command": st.lists(text, max_size=2)})}),
)
quantities = st.dictionaries(
    st.sampled_from(["cpu", "memory", "nvidia.com/gpu", "thaw.dev/restore"]),
    st.sampled_from(["1", "2Gi", "100m"]),
    max_size=3,
)
container = st.fixed_dictionaries(
    {"name": names, "image": st.just("img")},
    optional={
        "noCommand": st.just(True),
        "command": st.lists(text, min_size=1, max_size=3),
        "args": st.lists(text, max_size=3),
        "env": st.lists(env_var, max_size=3),
        "volumeMounts": st.lists(mount, max_size=3),
        "ports": st.lists(
            st.fixed_dictionaries({"name": names, "containerPort": st.integers(1, 65535)}), max_size=2
        ),
        "readinessProbe": probe,
        "resources": st.fixed_dictionaries({}, optional={"requests": quantities, "limits": quantities}),
        "securityContext": st.fixed_dictionaries(
            {},
            optional={
                "runAsUser": st.integers(0, 2000),
                "capabilities": st.fixed_dictionaries(
                    {},
                    optional={
                        "add": st.lists(
                            st.sampled_from(["SYS_PTRACE", "NET_ADMIN", "CAP_CHECKPOINT_RESTORE"]), max_size=2
                        ),
                        "drop": st.just(["ALL"]),
                    },
                ),
            },
        ),
    },
)
pod_annotations = st.fixed_dictionaries(
    {"thaw.dev/snapshot": st.sampled_from(["qwen3", "qwen3", "qwen3", "Bad_Value"])},
    optional={
        "thaw.dev/container": st.sampled_from(["c", "server", "sidecar"]),
        "thaw.dev/checkpoint": st.sampled_from(["on-ready", "never"]),
        "thaw.dev/placement": st.sampled_from(["preferred", "required"]),
        "thaw.dev/workload": st.just("forged"),
        "a/b~c": st.just("x"),
    },
) | st.dictionaries(
    st.sampled_from(
        [
            "thaw.dev/snapshot",
            "thaw.dev/container",
            "thaw.dev/checkpoint",
            "thaw.dev/placement",
            "thaw.dev/injected",
            "thaw.dev/workload",
            "other/x",
        ]
    ),
    st.sampled_from(
        ["qwen3", "c", "server", "on-ready", "never", "preferred", "required", "Bad_Value", "", "v1"]
    ),
    max_size=5,
)
pod = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"annotations": pod_annotations}, optional={"name": text, "generateName": st.just("p-")}
        ),
        "spec": st.fixed_dictionaries(
            {"containers": st.lists(container, min_size=1, max_size=3)},
            optional={
                "initContainers": st.lists(container, max_size=2),
                "volumes": st.lists(
                    st.fixed_dictionaries({"name": names, "emptyDir": st.just({})}), max_size=2
                ),
                "schedulerName": st.sampled_from(["default-scheduler", "s"]),
            },
        ),
    }
)


def _commands(p: dict[str, Any]) -> dict[str, Any]:
    # A command unless the container asked for none ("noCommand", dropped here): most have one.
    for c in p["spec"]["containers"] + p["spec"].get("initContainers", []):
        if not c.pop("noCommand", False):
            c.setdefault("command", ["run"])
    return p


def review(obj: Any, namespace: Any = "ns") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": obj,
        },
    }


def respond(doc: Any, restore: bool, prepared: Prepared) -> tuple[int, dict[str, Any]]:
    a = build_response(json.dumps(doc).encode(), prepared, restore)
    out = json.loads(a.body)
    if a.http_status == 200:
        assert out["response"]["uid"] == "u-1" and isinstance(out["response"]["allowed"], bool)
    else:
        assert a.http_status == 400 and out["error"]
    return a.http_status, out


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=pod, restore=st.sampled_from([True, True, True, False]), which=st.integers(0, 1))
def test_arbitrary_pods_patch_applies_and_is_idempotent(
    pod: dict[str, Any], restore: bool, which: int
) -> None:
    prepared = CONFIGS[which]
    pod = _commands(pod)
    status, out = respond(review(pod), restore, prepared)
    assert status == 200
    response = out["response"]
    event("patched" if "patch" in response else ("refused" if not response["allowed"] else "unchanged"))
    if "patch" not in response:
        return
    assert response["allowed"] is True
    ops = json.loads(base64.b64decode(response["patch"]))
    mutated = jsonpatch.apply_patch(pod, ops)  # raises if any op does not apply
    assert mutated["metadata"]["annotations"]["thaw.dev/injected"] == "v2"
    status, again = respond(review(mutated), restore, prepared)
    assert status == 200 and "patch" not in again["response"]


@settings(max_examples=300, deadline=None)
@given(obj=json_any, namespace=json_any, restore=st.booleans())
def test_arbitrary_objects_in_a_review_never_fail(obj: Any, namespace: Any, restore: bool) -> None:
    status, _ = respond(review(obj, namespace), restore, CONFIGS[0])
    assert status == 200


@settings(max_examples=300, deadline=None)
@given(doc=json_any, restore=st.booleans())
def test_arbitrary_json_bodies_are_400_or_a_valid_review(doc: Any, restore: bool) -> None:
    respond(doc, restore, CONFIGS[0])


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64))
def test_arbitrary_bytes_are_answered(body: bytes) -> None:
    a = build_response(body, CONFIGS[0], True)
    assert a.http_status in (200, 400)
    json.loads(a.body)
