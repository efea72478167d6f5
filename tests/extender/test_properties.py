"""Property tests: malformed input never gives a 500, and answers never name a node not asked about."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extender import handlers
from extender.index import NodeIndex
from extender.scoring import Params
from extender.synthetic import node
from tests.conftest import load_fixture
from tests.extender.conftest import SNAPSHOT, annotate, fixture_nodes

INDEX = NodeIndex(Params(placed_window_s=0))  # answers must not move the scores between calls
INDEX.replace_all(fixture_nodes(), "1")
POD = load_fixture("raw/extender-filter-ncc-true-1.json")["Pod"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
names = st.lists(
    st.sampled_from(["node-1", "node-2", "node-3", "other-h100"]) | st.text(min_size=1, max_size=12),
    max_size=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries({"Pod": json_values, "Nodes": json_values, "NodeNames": json_values}).map(
        lambda v: json.dumps(v).encode()
    )
)
def test_malformed_input_is_200_or_400_never_an_exception(body: bytes) -> None:
    for fn in (handlers.filter_, handlers.prioritize):
        status, out = fn(INDEX, body)
        assert status in (200, 400)
        doc = orjson.loads(out)
        if status == 400:
            assert doc["Error"]


def check(args: dict[str, Any], asked: list[str]) -> None:
    status, out = handlers.filter_(INDEX, orjson.dumps(args))
    assert status == 200
    res = orjson.loads(out)
    passed = (
        res["NodeNames"] if "NodeNames" in res else [n["metadata"]["name"] for n in res["Nodes"]["items"]]
    )
    assert set(passed) <= set(asked) and set(res["FailedNodes"]) <= set(asked)
    assert set(passed).isdisjoint(res["FailedNodes"])
    assert set(passed) | set(res["FailedNodes"]) == set(asked)
    status, out = handlers.prioritize(INDEX, orjson.dumps(args))
    scores = orjson.loads(out)
    # A partial list (handlers' docstring): the asked nodes that score above 0, in the order asked.
    listed = {h["Host"] for h in scores}
    assert [h["Host"] for h in scores] == [n for n in asked if n in listed]
    assert all(type(h["Score"]) is int and 1 <= h["Score"] <= 10 for h in scores)
    thaw = args["Pod"]["metadata"].get("annotations", {}).get("thaw.dev/workload")
    if thaw is None:
        assert scores == []
    else:  # a node the index knows is listed exactly when it scores above 0
        memo = INDEX.decisions(SNAPSHOT, thaw)
        known = set(INDEX.nodes)
        assert listed & known == {n for n in asked if n in known and memo.decision(n).score > 0}
        if args["NodeNames"] is not None:  # names only: what the index does not know scores 0
            assert listed <= known


@settings(max_examples=200, deadline=None)
@given(asked=names, placement=st.sampled_from([None, "preferred", "required"]), thaw=st.booleans())
def test_never_a_node_not_in_the_input_names(asked: list[str], placement: str | None, thaw: bool) -> None:
    args: dict[str, Any] = {"Pod": POD, "Nodes": None, "NodeNames": asked}
    check(annotate(args, placement) if thaw else args, asked)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(asked=names, placement=st.sampled_from([None, "required"]))
def test_never_a_node_not_in_the_input_nodes(asked: list[str], placement: str | None) -> None:
    items = [node(n) for n in asked]
    args: dict[str, Any] = {"Pod": POD, "Nodes": {"metadata": {}, "items": items}, "NodeNames": None}
    check(annotate(args, placement), asked)
