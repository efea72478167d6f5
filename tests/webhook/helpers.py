"""Shared helpers for the webhook tests: captured reviews, annotated copies, applying answers."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch

from tests.conftest import FIXTURES
from webhook.config import WebhookConfig
from webhook.patches import Prepared
from webhook.review import build_response

THAW = {"thaw.dev/snapshot": "qwen3-8b-vllm"}
COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
ARGS = ["--model", "Qwen/Qwen3-8B", "--port", "8000"]


def review_files() -> list[Path]:
    """Every captured file that holds an AdmissionReview request (top level and raw/)."""
    found = []
    for path in sorted(FIXTURES.rglob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "AdmissionReview" and "request" in doc:
            found.append(path)
    return found


def load_review(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def annotated(
    review: dict[str, Any], annotations: dict[str, str] | None = None, args: bool = True
) -> dict[str, Any]:
    """A copy of ``review`` whose pod opts in to Thaw and whose first container has a command."""
    out = copy.deepcopy(review)
    pod = out["request"]["object"]
    pod["metadata"].setdefault("annotations", {}).update(annotations or THAW)
    container = pod["spec"]["containers"][0]
    container["command"] = list(COMMAND)
    if args:
        container["args"] = list(ARGS)
    return out


def answer(
    review: dict[str, Any], restore: bool, config: WebhookConfig | None = None
) -> tuple[int, dict[str, Any]]:
    prepared = Prepared.build(config or WebhookConfig())
    result = build_response(json.dumps(review).encode(), prepared, restore)
    return result.http_status, json.loads(result.body)


def patch_ops(response: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod as kube-apiserver would store it after this response (the patch must apply)."""
    result: dict[str, Any] = jsonpatch.apply_patch(pod, patch_ops(response), in_place=False)
    return result
