"""The guide (README.md and the pages of docs/) against the code: every ``thaw ...`` command in it
parses with the real parser, every command is run by the demo or a test, and the example Deployment
is valid and admitted with full injection by the webhook."""

from __future__ import annotations

import argparse
import ast
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
DOCS = REPO / "docs"
EXAMPLE = REPO / "manifests" / "examples" / "vllm-deployment.yaml"

# Every ``thaw`` command (the CLI's, not only the guide's) and the tests that run it for real, through
# the CLI (``python -m thaw CMD``, the runtime bundle's ``bin/thaw`` or ``thaw.cli.main``), by pytest
# node id. The ids are checked to name test functions; what each runs is said beside it.
EXERCISED: dict[str, tuple[str, ...]] = {
    # `python -m thaw demo`, interrupted; the demo's steps end to end (webhook, fetch, exec, agent).
    "demo": (
        "tests/test_demo.py::test_ctrl_c_leaves_no_process_and_no_namespace",
        "tests/test_demo.py::test_demo_checkpoints_places_and_restores_for_real",
    ),
    "webhook": ("tests/webhook/test_server.py::test_bad_config_stops_before_serving",),
    "extender": ("tests/extender/test_server.py::test_bad_nodes_file_is_a_usage_error",),
    "certs": ("tests/test_foundation.py::test_exit_codes_and_one_line_errors",),
    # `thaw keys generate` by the demo's node step and by the real-cluster test's setup.
    "keys": (
        "tests/test_demo.py::test_demo_checkpoints_places_and_restores_for_real",
        "tests/e2e/test_real_pods.py::test_checkpoint_in_one_pod_restore_in_another",
    ),
    "fetch": ("tests/runtime/test_exec_criu.py::test_restore_answers_with_pre_checkpoint_state",),
    "exec": ("tests/runtime/test_exec_criu.py::test_restore_answers_with_pre_checkpoint_state",),
    # CRIU's post-dump action script execs `thaw capture-pod-files` with CRIU's environment.
    "capture-pod-files": (
        "tests/runtime/test_pod_files_logic.py::test_the_action_script_runs_the_capture_as_criu_would",
    ),
    # thaw-tools: a bundle installed into a node directory by three pods, linked into each.
    "install-runtime": (
        "tests/runtime/test_install_runtime.py::test_first_pod_copies_later_pods_link",
        "tests/runtime/test_install_runtime.py::test_the_built_runtime_installs_itself_without_capabilities",
    ),
    # thaw-sidecar: `thaw sidecar` as a process answering thaw exec's requests and publishing.
    "sidecar": (
        "tests/runtime/test_sidecar.py::test_thaw_exec_side_of_the_protocol",
        "tests/runtime/test_exec_criu.py::"
        "test_the_sidecar_publishes_what_thaw_exec_dumped_and_the_key_never_reaches_the_workload",
    ),
    "agent": ("tests/runtime/test_agent.py::test_agent_loop_patches_changes_and_stops_on_sigterm",),
    "healthcheck": ("tests/runtime/test_agent.py::test_heartbeat_and_healthcheck",),
    # `thaw check node` on this machine; `thaw check cluster` against a real kube-apiserver.
    "check": (
        "tests/node/test_check.py::test_thaw_check_node_on_this_machine",
        "tests/node/test_check.py::test_a_working_install_passes",
    ),
    "publish": ("tests/runtime/test_store.py::test_publish_with_a_cache_keeps_the_nodes_copy_signed",),
    "status": ("tests/runtime/test_status.py::test_status_table_from_the_cluster",),
    "simulate": ("tests/extender/test_simulate.py::test_cli_reports_and_plots",),
    # Both stores: a directory and a real registry server.
    "gc": ("tests/registry/test_gc.py::test_thaw_gc",),
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


def guide_pages() -> list[tuple[str, str]]:
    """(name, text) of README.md and every page of docs/, the pages in name order."""
    pages = [("README.md", README.read_text())]
    pages += [(f"docs/{p.relative_to(DOCS)}", p.read_text()) for p in sorted(DOCS.rglob("*.md"))]
    return pages


def _commands() -> list[str]:
    # A span like `thaw fetch: cold start: REASON` is a log line the guide quotes, not a command.
    found = {c for _, text in guide_pages() for c in guide_commands(text)}
    return sorted(c for c in found if not shlex.split(c)[1].endswith(":"))


def test_the_guide_has_commands_in_readme_and_docs() -> None:
    """The README's quick start and the docs both hold commands, so both are checked below."""
    readme = guide_commands(README.read_text())
    docs = {c for name, text in guide_pages() if name.startswith("docs/") for c in guide_commands(text)}
    assert any(c.startswith("thaw keys generate") for c in readme), readme
    assert any(c.startswith("thaw check cluster") for c in readme), readme
    assert len(docs) > 15, sorted(docs)


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
            assert action is not None, f"guide: {cmd}: thaw {argv[0]} has no {token}"
            value = flags[i + 1] if i + 1 < len(flags) else None
            if action.choices is not None and value is not None:
                assert value in action.choices, f"guide: {cmd}: {value} not in {list(action.choices)}"
    assert whole >= 10, whole


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(), filename=path)
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_command_is_run_by_a_test() -> None:
    """Every command of the CLI and of the guide has tests that run it, and each named test exists."""
    parser = build_parser()
    commands = set(_subparser_names(parser))
    guide = {_split(c)[1][0] for c in _commands()}
    assert guide <= commands, guide - commands
    assert set(EXERCISED) == commands, (
        f"commands without a test: {sorted(commands - set(EXERCISED))}; "
        f"listed but not commands: {sorted(set(EXERCISED) - commands)}"
    )
    for command, node_ids in EXERCISED.items():
        assert node_ids, command
        for node_id in node_ids:
            path, _, name = node_id.partition("::")
            assert name in _test_functions(path), f"thaw {command}: {node_id} is not a test function"


def _subparser_names(parser: argparse.ArgumentParser) -> list[str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


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
