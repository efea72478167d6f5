"""The agent's admission policies: checked in force before the agent writes anything.

RBAC gives the agent ``patch`` on every Node and ``create`` on every Event; two
ValidatingAdmissionPolicies (manifests/base/agent-policy.yaml) narrow that to its own Node's
``thaw.dev/*`` annotations and to Events on Thaw pods bound to its node. A cluster where they are
missing (never applied, deleted, a Kubernetes without them) would let a compromised agent write far
more, so the agent reads each policy and its binding through the API at start and refuses to run
without them. ``--allow-without-node-policy`` is the explicit opt-out; the agent then runs without
making the writes the missing policies guard (no Node patch, no Events): it never gets more than
the policies would allow, only less.

``policy_problem`` is pure; ``read_policy`` and :class:`GuardedApi` are the I/O around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from thaw.errors import ThawError

log = logging.getLogger("thaw.agent")

NODE_POLICY = "thaw-agent-own-node"  # guards patch_node
EVENTS_POLICY = "thaw-agent-events"  # guards create_namespaced_event
AGENT_POLICIES = (NODE_POLICY, EVENTS_POLICY)
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
RECHECK_S = 600.0  # a policy deleted while the agent runs stops its writes within this long
HTTP_NOT_FOUND = 404
HTTP_FORBIDDEN = 403


class PolicyMissing(ThawError):
    """The agent's admission policies are not in force, and it was not told to run without them."""


def policy_problem(
    name: str,
    policy: Mapping[str, Any] | None,
    binding: Mapping[str, Any] | None,
    username: str | None = None,
) -> str | None:
    """Why ValidatingAdmissionPolicy ``name`` with its binding of the same name does not guard the
    agent, or None. ``username``, when known (SelfSubjectReview), must be the one it matches."""
    if policy is None:
        return f"ValidatingAdmissionPolicy {name} is missing"
    if binding is None:
        return f"ValidatingAdmissionPolicyBinding {name} is missing"
    spec, bspec = policy.get("spec") or {}, binding.get("spec") or {}
    if bspec.get("policyName") != name:
        return f"ValidatingAdmissionPolicyBinding {name} binds {bspec.get('policyName')!r}, not {name}"
    if "Deny" not in (bspec.get("validationActions") or []):
        actions = bspec.get("validationActions") or []
        return f"ValidatingAdmissionPolicyBinding {name} does not deny (validationActions {actions})"
    if bspec.get("matchResources"):
        return f"ValidatingAdmissionPolicyBinding {name} narrows matchResources: it may not cover the agent"
    if spec.get("failurePolicy", "Fail") != "Fail":
        return f"ValidatingAdmissionPolicy {name} has failurePolicy {spec.get('failurePolicy')}, not Fail"
    if not spec.get("validations"):
        return f"ValidatingAdmissionPolicy {name} has no validations"
    if username is not None:
        conditions = " ".join(str(c.get("expression", "")) for c in spec.get("matchConditions") or [])
        if f"'{username}'" not in conditions:
            return f"ValidatingAdmissionPolicy {name} does not match this agent's identity {username}"
    return None


def _get(call: Callable[[], Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The object ``call`` reads (the raw JSON), None when it does not exist, or why it failed."""
    import orjson
    from kubernetes.client.exceptions import ApiException

    try:
        response = call()
    except ApiException as exc:
        if exc.status == HTTP_NOT_FOUND:
            return None, None
        why = "forbidden (RBAC)" if exc.status == HTTP_FORBIDDEN else f"{exc.status} {exc.reason}"
        return None, why
    value = orjson.loads(response.data)
    return (value if isinstance(value, dict) else None), None


def read_policy(
    api_client: Any, name: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(policy, binding, error) for ``name`` through the API."""
    from kubernetes import client

    adm = client.AdmissionregistrationV1Api(api_client)
    policy, err = _get(lambda: adm.read_validating_admission_policy(name, _preload_content=False))
    if err is not None:
        return None, None, f"cannot read ValidatingAdmissionPolicy {name}: {err}"
    binding, err = _get(lambda: adm.read_validating_admission_policy_binding(name, _preload_content=False))
    if err is not None:
        return policy, None, f"cannot read ValidatingAdmissionPolicyBinding {name}: {err}"
    return policy, binding, None


def whoami(api_client: Any) -> tuple[str | None, list[str]]:
    """This client's username and its node-name extra (SelfSubjectReview, Kubernetes >= 1.28), or
    (None, []) where the API cannot say."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        review = client.AuthenticationV1Api(api_client).create_self_subject_review(
            client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1", kind="SelfSubjectReview")
        )
    except (ApiException, ValueError):
        return None, []
    info = getattr(getattr(review, "status", None), "user_info", None)
    if info is None:
        return None, []
    extra = getattr(info, "extra", None) or {}
    return getattr(info, "username", None), list(extra.get(NODE_NAME_EXTRA) or [])


def policy_problems(api_client: Any, username: str | None = None) -> dict[str, str]:
    """Each agent policy that is not in force, with why."""
    out: dict[str, str] = {}
    for name in AGENT_POLICIES:
        policy, binding, err = read_policy(api_client, name)
        why = err or policy_problem(name, policy, binding, username)
        if why is not None:
            out[name] = why
    return out


@dataclass
class GuardedApi:
    """The agent's CoreV1Api, with the writes whose policy is not in force turned into logged no-ops
    (only possible with ``allow_without``). Everything else passes through."""

    api: Any
    allow_without: bool
    node: str | None = None
    clock: Callable[[], float] = time.monotonic
    missing: dict[str, str] = field(default_factory=dict)
    _checked: float = field(default=float("-inf"))
    _warned: set[str] = field(default_factory=set)

    def check(self) -> None:
        """Read the policies (again); raise PolicyMissing when one is missing and not allowed."""
        username, nodes = whoami(self.api.api_client)
        if self.node is not None and nodes and nodes != [self.node]:
            raise PolicyMissing(
                f"this agent's credentials are bound to node {','.join(nodes)}, but --node is {self.node}: "
                "the node policy would refuse every patch (is THAW_NODE the downward API's spec.nodeName?)"
            )
        self.missing = policy_problems(self.api.api_client, username)
        self._checked = self.clock()
        if self.missing and not self.allow_without:
            raise PolicyMissing(
                "refusing to run: "
                + "; ".join(self.missing.values())
                + ". These policies narrow the agent's RBAC to its own Node and its own node's pods "
                "(manifests/base/agent-policy.yaml, Kubernetes >= 1.30). Apply them, or pass "
                "--allow-without-node-policy to run without the writes they guard "
                "(docs/install.md, step 4)"
            )
        for name, why in self.missing.items():
            if name not in self._warned:
                self._warned.add(name)
                log.warning("running without %s (%s): %s", name, why, _GUARDS[name])

    def allowed(self, name: str) -> bool:
        if self.clock() - self._checked > RECHECK_S:
            try:
                self.check()
            except PolicyMissing as exc:
                log.error("%s", exc)
                self.missing = {n: str(exc) for n in AGENT_POLICIES}
                self._checked = self.clock()
        return name not in self.missing

    def patch_node(self, name: str, body: Any, **kw: Any) -> Any:
        if not self.allowed(NODE_POLICY):
            log.debug("not patching node %s: %s is not in force", name, NODE_POLICY)
            return None
        return self.api.patch_node(name, body, **kw)

    def create_namespaced_event(self, namespace: str, body: Any, **kw: Any) -> Any:
        if not self.allowed(EVENTS_POLICY):
            log.debug("not posting an event in %s: %s is not in force", namespace, EVENTS_POLICY)
            return None
        return self.api.create_namespaced_event(namespace, body, **kw)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.api, attr)


_GUARDS = {
    NODE_POLICY: "the agent does not patch its Node (no thaw.dev/facts or thaw.dev/cache for the extender)",
    EVENTS_POLICY: "the agent posts no Events on pods",
}


def guard(api: Any, allow_without: bool, node: str | None) -> GuardedApi:
    """The agent's API, checked: raises PolicyMissing when a policy is missing and not allowed."""
    guarded = GuardedApi(api, allow_without, node)
    guarded.check()
    return guarded
