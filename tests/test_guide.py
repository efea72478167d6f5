"""The operator's guide (README.md) against the code: every ``thaw ...`` command in it parses with the
real parser, every command is run by the demo or a test, and the example Deployment is valid and
admitted with full injection by the webhook."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shlex

import kubernetes_validate
import yaml

from tests.conftest import REPO
from thaw.cli import build_parser
from thaw.dev.demo import admission_review
from webhook.config import WebhookConfig
from webhook.patches import Prepared
from webhook.review import build_response

README = REPO / "README.md"
EXAMPLE = REPO / "manifests" / "examples" / "vllm-deployment.yaml"

# Where each command of the guide really runs: the demo (thaw/dev/demo*.py, checked by
# tests/test_demo.py) or a test that calls it through the CLI.
EXERCISED = {
    "demo": ["tests/test_demo.py"],
    "webhook": ["thaw/dev/demo.py", "tests/webhook/test_server.py"],
    "extender": ["extender/demo.py", "tests/extender/test_server.py"],
    "certs": ["webhook/launch.py", "tests/test_foundation.py"],
    "keys": ["thaw/dev/demo_node.py"],
    "fetch": ["thaw/dev/demo_node.py", "tests/runtime/test_exec_criu.py"],
    "exec": ["thaw/dev/sandbox.py", "tests/runtime/test_exec_criu.py"],
    "capture-pod-files": ["thaw/runtime/podfiles.py", "tests/runtime/test_pod_files_logic.py"],
    "agent": ["thaw/dev/demo_node.py", "tests/runtime/test_agent.py"],
    "healthcheck": ["tests/runtime/test_agent.py"],
    "check": ["tests/node/test_check.py"],
    "publish": ["tests/runtime/test_store.py"],
    "status": ["tests/runtime/test_status.py"],
    "simulate": ["tests/extender/test_simulate.py"],
    "gc": ["tests/registry/test_gc.py"],
}


def guide_commands(text: str) -> list[str]:
    """``thaw ...`` commands in code blocks and inline code, synopses' ``[optional]`` parts and
    ``NAME...`` repetitions removed. Pure."""
    found: list[str] = []
    for block in re.findall(r"```(?:sh|console|bash)?\n(.*?)```", text, flags=re.S):
        for raw in block.splitlines():
            line = raw.split("#", 1)[0].strip().removeprefix("$ ")
            if line.startswith("thaw "):
                found.append(line)
    for span in re.findall(r"`(thaw [^`]+)`", text):
        found.append(span)
    out = []
    for cmd in found:
        bare = re.sub(r"\[[^\]]*\]", "", cmd).replace("...", "").replace("…", "")
        out.append(" ".join(bare.split()))
    return sorted(set(out))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices[name]
    return sub


def _split(cmd: str) -> tuple[list[str], list[str]]:
    """(global flags, the command's argv) of ``thaw ...``."""
    argv = shlex.split(cmd)[1:]
    head: list[str] = []
    while argv and argv[0] == "--log-level":
        head, argv = head + argv[:2], argv[2:]
    return head, argv


def _commands() -> list[str]:
    # A span like `thaw fetch: cold start: REASON` is a log line the guide quotes, not a command.
    return [c for c in guide_commands(README.read_text()) if not shlex.split(c)[1].endswith(":")]


def test_every_guide_command_parses() -> None:
    """A whole command line must parse as it is; a fragment the prose names (`thaw agent --budget
    BYTES`, `thaw exec --key`) must name flags that command has, with an allowed value."""
    commands = _commands()
    assert len(commands) > 15, commands
    parser = build_parser()
    whole = 0
    for cmd in commands:
        head, argv = _split(cmd)
        if argv[0] == "exec" and "--" not in argv:
            argv = [*argv, "--", "true"]
        try:
            parser.parse_args([*head, *argv])
            whole += 1
            continue
        except SystemExit:
            pass
        sub = _subparser(parser, argv[0])
        flags = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        for i, token in enumerate(flags):
            if not token.startswith("--"):
                continue
            action = sub._option_string_actions.get(token)
            assert action is not None, f"README: {cmd}: thaw {argv[0]} has no {token}"
            value = flags[i + 1] if i + 1 < len(flags) else None
            if action.choices is not None and value is not None:
                assert value in action.choices, f"README: {cmd}: {value} not in {list(action.choices)}"
    assert whole >= 10, whole


def test_every_guide_command_is_run_by_the_demo_or_a_test() -> None:
    subs = {_split(c)[1][0] for c in _commands()}
    assert subs <= set(EXERCISED), subs - set(EXERCISED)
    for sub in subs:
        for path in EXERCISED[sub]:
            text = (REPO / path).read_text()
            assert re.search(rf'"{sub}"|thaw {sub}\b', text), f"{path} does not run thaw {sub}"


def test_example_deployment_is_valid() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    for version in ("1.30", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_example_deployment_is_admitted_with_full_injection() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    template = doc["spec"]["template"]
    pod = {"kind": "Pod", "apiVersion": "v1", "metadata": template["metadata"], "spec": template["spec"]}
    review = admission_review(pod, doc["metadata"]["namespace"], "guide-0001")
    answer = build_response(json.dumps(review).encode(), Prepared.build(WebhookConfig()), True)
    response = json.loads(answer.body)["response"]
    assert response["allowed"] and "patch" in response, response
    # The one warning: its tag is not pinned by digest (the example cannot know the digest of the
    # image you pull; its comment says how to pin it).
    warnings = response.get("warnings", [])
    assert [w for w in warnings if "has no digest" not in w] == [] and len(warnings) == 1, warnings
    ops = json.loads(base64.b64decode(response["patch"]))
    added = [op["value"] for op in ops if op["path"] == "/spec/containers/0/env/-"]  # the pod has env
    env = {e["name"]: e.get("value") for e in added}
    assert env["THAW_READY"] == "http://127.0.0.1:8000/health"
    assert env["THAW_SLEEP"] == "http://127.0.0.1:8000/sleep?level=1"  # vLLM's sleep mode endpoints
    assert env["THAW_WAKE"] == "http://127.0.0.1:8000/wake_up"
