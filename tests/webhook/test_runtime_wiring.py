"""The injected containers agree with the runtime they run (notes/POD-LAYOUT.md; issues 10, 11).

- ``thaw-tools`` runs the image's own runtime, ``thaw install-runtime``, as root with every
  capability dropped, into the runtime hostPath and the tools emptyDir; the workload mounts that
  hostPath read-only at the same path, so the link ``/thaw/rt`` resolves there, and runs
  ``/thaw/rt/bin/thaw``.
- ``thaw-fetch`` and the workload name the same bundle's CRIU (the image's ``/opt/thaw`` and the
  workload's ``/thaw/rt`` are one bundle), so both record the same node facts; without it fetch's
  facts say "criu none" and every plan is cold.
- Every ``THAW_*`` value the webhook hands a runtime command is a flag of that command (thaw/cli.py:
  each flag falls back to ``THAW_<FLAG>``): a name the runtime renamed would otherwise be ignored
  without a word.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import FIXTURES
from tests.webhook.helpers import annotated, answer, apply, load_review
from thaw.cli import build_parser
from webhook.patches import (
    CRIU_BIN,
    FETCH_CONTAINER,
    IMAGE_RUNTIME,
    RUNTIME_BIN,
    RUNTIME_DIR,
    RUNTIME_LINK,
    SIDECAR_CONTAINER,
    THAW_BIN,
    TOOLS_CONTAINER,
)

# Read from the environment, not flags: the downward API's identity, and CRIU's path
# (thaw/runtime/criu.py find_criu).
NOT_FLAGS = {"THAW_POD_NAME", "THAW_POD_NAMESPACE", "THAW_POD_UID", "THAW_NODE_NAME", "THAW_CRIU"}
# Read by thaw exec from the environment (the configuration digest), not flags.
EXEC_ENV_ONLY = {"THAW_CONTAINER", "THAW_REPLICA_ENV", "THAW_CONFIG_MOUNTS", "THAW_TCP_ESTABLISHED"}


def injected_pod(readiness: bool = True) -> dict[str, Any]:
    review = annotated(load_review(FIXTURES / "admissionreview-v1-pod-create.request.json"))
    if readiness:
        container = review["request"]["object"]["spec"]["containers"][0]
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    status, out = answer(review, restore=True)
    assert status == 200 and out["response"]["allowed"]
    pod: dict[str, Any] = apply(review["request"]["object"], out["response"])
    return pod


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_tools_installs_the_runtime_the_workload_runs() -> None:
    pod = injected_pod()
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    tools = init[TOOLS_CONTAINER]
    assert tools["command"] == [RUNTIME_BIN, "install-runtime"]
    assert tools["securityContext"]["runAsUser"] == 0
    assert tools["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    tools_mounts = {m["mountPath"]: m for m in tools["volumeMounts"]}
    assert "hostPath" in volumes[tools_mounts[RUNTIME_DIR]["name"]]
    assert env_values(tools) == {"THAW_RUNTIME_DIR": RUNTIME_DIR, "THAW_LINK": RUNTIME_LINK}
    target = pod["spec"]["containers"][0]
    assert target["command"][0] == THAW_BIN and THAW_BIN.startswith(RUNTIME_LINK + "/")
    target_mounts = {m["mountPath"]: m for m in target["volumeMounts"]}
    # The link's target, read-only, at the same path; the link itself from the tools emptyDir.
    assert target_mounts[RUNTIME_DIR] == {**tools_mounts[RUNTIME_DIR], "readOnly": True}
    assert target_mounts[os.path.dirname(RUNTIME_LINK)]["name"] == tools_mounts["/thaw"]["name"]


def test_fetch_runs_with_the_runtime_criu() -> None:
    pod = injected_pod()
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    fetch_env = env_values(init[FETCH_CONTAINER])
    target_env = env_values(pod["spec"]["containers"][0])
    # The fetch container runs the image's runtime; the workload runs the same bundle through the
    # link thaw-tools made. Both name the same bundle's CRIU, so both see the same node facts.
    assert init[FETCH_CONTAINER]["command"][0] == RUNTIME_BIN
    assert fetch_env["THAW_CRIU"] == IMAGE_RUNTIME + "/bin/criu"
    assert target_env["THAW_CRIU"] == CRIU_BIN == RUNTIME_LINK + "/bin/criu"


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("THAW_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _flag_envs(command: str) -> set[str] | None:
    """The THAW_* names the CLI reads for ``command``'s flags, or None when it has no such command."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        return None
    return {
        "THAW_" + opt.lstrip("-").upper().replace("-", "_")
        for action in sub.choices[command]._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }


def _runtime_command(container: dict[str, Any]) -> str:
    command: list[str] = container["command"]
    return command[1]


@pytest.mark.parametrize("which", [TOOLS_CONTAINER, FETCH_CONTAINER, SIDECAR_CONTAINER, "workload"])
def test_every_env_the_webhook_sets_is_a_flag_of_the_command(which: str) -> None:
    pod = injected_pod()
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    container = pod["spec"]["containers"][0] if which == "workload" else init[which]
    command = _runtime_command(container)
    flags = _flag_envs(command)
    assert flags is not None, f"the webhook runs `thaw {command}`, which thaw/cli.py does not have"
    given = {e["name"] for e in container["env"] if e["name"].startswith("THAW_")} - NOT_FLAGS
    if command == "exec":
        given -= EXEC_ENV_ONLY
    assert given <= flags, (
        f"thaw {command} has no flag for {sorted(given - flags)} (its flags: {sorted(flags)})"
    )
    # And the CLI parses with exactly that environment (types, choices).
    with environment(env_values(container)):
        build_parser().parse_args([command] + (["--", "true"] if command == "exec" else []))


def test_replica_lists_are_written_as_the_runtime_reads_them() -> None:
    from thaw.contract import workload
    from thaw.runtime import replica_config

    assert (workload.REPLICA_ENV, workload.CONFIG_MOUNTS) == (
        replica_config.REPLICA_ENV,
        replica_config.CONFIG_MOUNTS,
    )
    for names in ([], ["POD_NAME"], ["POD_NAME", "POD_IP"], ["/etc/app", "/var/run/secrets/app/token"]):
        assert replica_config.names_list(workload.render_names(names)) == names
    pod = injected_pod()
    env = env_values(pod["spec"]["containers"][0])
    assert replica_config.names_list(env[workload.REPLICA_ENV]) == []
