"""Issue 6: the webhook's tensor-parallel path (thaw.dev/tensor-parallel, or nvidia.com/gpu > 1)."""

from __future__ import annotations

from typing import Any

import pytest

from thaw.contract.annotations import AnnotationError, parse_spec
from webhook.mutate import Mutation
from webhook.patches import TP_ENV

from .test_mutate import SNAP, env_of, mutated, pod, run

TP = dict(TP_ENV)


def gpus(n: int, part: str = "limits") -> dict[str, Any]:
    return {part: {"nvidia.com/gpu": str(n) if part == "requests" else n}}


@pytest.mark.parametrize(
    ("annotation", "resources", "tp"),
    [
        (None, None, False),
        (None, gpus(1), False),
        (None, gpus(2), True),
        (None, gpus(8, "requests"), True),
        ("auto", gpus(4), True),
        ("false", gpus(4), False),
        ("true", None, True),
        ("true", gpus(1), True),
    ],
)
def test_tp_env_and_net_admin(annotation: str | None, resources: dict[str, Any] | None, tp: bool) -> None:
    ann = {**SNAP, **({"thaw.dev/tensor-parallel": annotation} if annotation else {})}
    extra = {"resources": resources} if resources else {}
    out, _ = mutated(pod(ann, **extra))
    env = env_of(out)
    caps = out["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    if tp:
        assert {k: env[k] for k in TP} == TP
        assert env["THAW_TCP_ESTABLISHED"] == "true" and env["NCCL_NVLS_ENABLE"] == "0"
        assert caps == ["CHECKPOINT_RESTORE", "SYS_PTRACE", "NET_ADMIN"]
    else:
        assert not set(TP) & set(env)
        assert caps == ["CHECKPOINT_RESTORE", "SYS_PTRACE"]


def test_exact_ops_for_tp_env_and_caps() -> None:
    result = run(
        pod(
            {**SNAP, "thaw.dev/tensor-parallel": "true"},
            securityContext={"capabilities": {"add": ["SYS_PTRACE"]}},
        )
    )
    assert isinstance(result, Mutation)
    cap_ops = [op for op in result.ops if "securityContext" in op["path"]]
    assert cap_ops == [
        {
            "op": "add",
            "path": "/spec/containers/0/securityContext/capabilities/add/-",
            "value": "CHECKPOINT_RESTORE",
        },
        {"op": "add", "path": "/spec/containers/0/securityContext/capabilities/add/-", "value": "NET_ADMIN"},
    ]
    env_op: Any = next(op for op in result.ops if op["path"] == "/spec/containers/0/env")
    # the measured minimal set (docs/tensor-parallel.md, "The settings"), pinned: a change here is a
    # contract change
    assert env_op["op"] == "add" and env_op["value"][-len(TP_ENV) :] == [
        {"name": "NCCL_P2P_DISABLE", "value": "1"},
        {"name": "NCCL_CUMEM_ENABLE", "value": "0"},
        {"name": "NCCL_IB_DISABLE", "value": "1"},
        {"name": "NCCL_NVLS_ENABLE", "value": "0"},
        {"name": "TORCH_NCCL_ENABLE_MONITORING", "value": "0"},
        {"name": "THAW_TCP_ESTABLISHED", "value": "true"},
    ]
    assert "NCCL_SHM_DISABLE" not in {e["name"] for e in env_op["value"]}


def test_user_env_overrides_a_tp_setting() -> None:
    out, _ = mutated(
        pod({**SNAP, "thaw.dev/tensor-parallel": "true"}, env=[{"name": "NCCL_IB_DISABLE", "value": "0"}])
    )
    assert env_of(out)["NCCL_IB_DISABLE"] == "0"


def test_invalid_value_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(AnnotationError, match=r"thaw.dev/tensor-parallel='yes'.*auto, true, false"):
        parse_spec({**SNAP, "thaw.dev/tensor-parallel": "yes"})
