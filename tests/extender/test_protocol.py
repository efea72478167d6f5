"""The extender protocol against every captured ExtenderArgs fixture, both nodeCacheCapable modes."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from extender import handlers
from extender.index import NodeIndex
from tests.conftest import FIXTURES, load_fixture
from tests.extender.conftest import SNAPSHOT, annotate

REQUESTS = sorted(p.name for p in (FIXTURES / "raw").glob("extender-*[0-9].json"))
FILTERS = [n for n in REQUESTS if "-filter-" in n]
PRIORITIZES = [n for n in REQUESTS if "-prioritize-" in n]


def test_fixtures_found() -> None:
    # raw/ holds 9 filter and 8 prioritize requests; a missing copy must fail, not leave the
    # parametrized tests below with no case.
    assert (len(FILTERS), len(PRIORITIZES)) == (9, 8), REQUESTS


def call(fn: Any, index: NodeIndex, args: dict[str, Any]) -> tuple[int, Any]:
    status, body = fn(index, orjson.dumps(args))
    return status, orjson.loads(body)


def names_of(args: dict[str, Any]) -> list[str]:
    if args["NodeNames"] is not None:
        return list(args["NodeNames"])
    return [n["metadata"]["name"] for n in args["Nodes"]["items"]]


@pytest.mark.parametrize("name", FILTERS)
def test_unannotated_filter_passes_every_node_in_the_same_mode(index: NodeIndex, name: str) -> None:
    args = load_fixture(f"raw/{name}")
    status, out = call(handlers.filter_, index, args)
    assert status == 200
    if args["NodeNames"] is not None:
        assert out == {"NodeNames": args["NodeNames"], "FailedNodes": {}, "Error": ""}
    else:
        assert out == {"Nodes": args["Nodes"], "FailedNodes": {}, "Error": ""}


@pytest.mark.parametrize("name", PRIORITIZES)
def test_unannotated_prioritize_scores_zero(index: NodeIndex, name: str) -> None:
    # Every node scores 0, and kube-scheduler adds an extender's score only to the hosts it lists
    # (handlers' docstring): the answer lists none.
    args = load_fixture(f"raw/{name}")
    status, out = call(handlers.prioritize, index, args)
    assert status == 200 and out == []


@pytest.mark.parametrize("name", FILTERS)
def test_required_filters_incompatible_nodes_with_a_reason(index: NodeIndex, name: str) -> None:
    args = annotate(load_fixture(f"raw/{name}"), "required")
    status, out = call(handlers.filter_, index, args)
    assert status == 200
    reason = out["FailedNodes"]["node-3"]
    assert reason.startswith(f"thaw: cannot restore snapshot {SNAPSHOT}: ")
    assert "exists only for other node facts" in reason
    assert out["FailedAndUnresolvableNodes"] == {"node-3": reason}
    assert set(out["FailedNodes"]) == {"node-3"} and out["Error"] == ""
    kept = [n for n in names_of(args) if n != "node-3"]
    if args["NodeNames"] is not None:
        assert set(out) == {"NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
        assert out["NodeNames"] == kept
    else:
        assert set(out) == {"Nodes", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
        by_name = {n["metadata"]["name"]: n for n in args["Nodes"]["items"]}
        assert out["Nodes"] == {"metadata": args["Nodes"]["metadata"], "items": [by_name[n] for n in kept]}
    # The captured response has the same shape (a real kube-scheduler accepted it).
    captured = load_fixture(f"raw/{name.replace('.json', '.response.json')}")
    assert set(captured) <= set(out)


@pytest.mark.parametrize("name", FILTERS)
def test_preferred_filters_nothing(index: NodeIndex, name: str) -> None:
    args = annotate(load_fixture(f"raw/{name}"))
    _, out = call(handlers.filter_, index, args)
    assert out["FailedNodes"] == {} and "FailedAndUnresolvableNodes" not in out
    assert out.get("NodeNames", None) == args["NodeNames"] or out["Nodes"] == args["Nodes"]


@pytest.mark.parametrize("name", PRIORITIZES)
def test_prioritize_ranks_by_time_to_ready(index: NodeIndex, name: str) -> None:
    args = annotate(load_fixture(f"raw/{name}"))
    status, out = call(handlers.prioritize, index, args)
    assert status == 200
    # A partial list: the nodes that score above 0, in the order asked; node-3 (an H200, no build
    # for its facts) scores 0 and is left out, which is 0 to kube-scheduler too.
    assert [h["Host"] for h in out] == [n for n in names_of(args) if n != "node-3"]
    scores = {h["Host"]: h["Score"] for h in out}
    assert all(isinstance(s, int) and 1 <= s <= 10 for s in scores.values())
    assert scores["node-1"] > scores["node-2"] > 0  # memory hit beats fetch
    # Each element has the keys of the captured answer a real kube-scheduler accepted (that
    # answer lists every node; a shorter list is read the same way: the docstring's source).
    captured = load_fixture(f"raw/{name.replace('.json', '.response.json')}")
    assert {frozenset(h) for h in out} == {frozenset(h) for h in captured} == {frozenset({"Host", "Score"})}


def test_prioritize_lists_only_nodes_that_can_restore() -> None:
    from extender.synthetic import H200_FACTS, cached, node

    idx = NodeIndex()
    items = [node(f"h200-{i}", facts=H200_FACTS, snapshots=[]) for i in range(50)]
    items += [
        node("holder", snapshots=[cached(SNAPSHOT, 8_100_000_000, "disk")]),
        node("empty", snapshots=[]),
    ]
    idx.replace_all(items, "1")
    names = [n["metadata"]["name"] for n in items]
    args = annotate({"Pod": {"metadata": {"name": "p"}}, "Nodes": None, "NodeNames": names})
    _, out = call(handlers.prioritize, idx, args)
    assert [h["Host"] for h in out] == ["holder", "empty"] and out[0]["Score"] > out[1]["Score"] > 0


def test_both_modes_give_the_same_scores(still: NodeIndex) -> None:
    names = annotate(load_fixture("raw/extender-prioritize-ncc-true-2.json"))
    nodes = annotate(load_fixture("raw/extender-prioritize-ncc-false-2.json"))
    assert call(handlers.prioritize, still, names) == call(handlers.prioritize, still, nodes)


def test_unmutated_pod_is_not_a_thaw_pod(index: NodeIndex) -> None:
    args = load_fixture("raw/extender-filter-ncc-true-1.json")
    args["Pod"]["metadata"]["annotations"] = {"thaw.dev/snapshot": SNAPSHOT, "thaw.dev/placement": "required"}
    _, out = call(handlers.filter_, index, args)
    assert out == {"NodeNames": args["NodeNames"], "FailedNodes": {}, "Error": ""}


def test_unknown_nodes_fail_only_when_required(index: NodeIndex) -> None:
    args = annotate(load_fixture("raw/extender-filter-ncc-true-1.json"), "required")
    args["NodeNames"] = ["node-1", "node-9"]
    _, out = call(handlers.filter_, index, args)
    assert out["NodeNames"] == ["node-1"]
    assert "not in the extender's node view" in out["FailedNodes"]["node-9"]
    assert "FailedAndUnresolvableNodes" not in out  # the watch may catch up
    _, scores = call(handlers.prioritize, index, annotate(args))
    assert [h["Host"] for h in scores] == ["node-1"]  # node-9 scores 0: not listed


def test_full_nodes_unknown_to_the_index_are_read_from_the_request(index: NodeIndex) -> None:
    from extender.synthetic import cached, node

    args = annotate(load_fixture("raw/extender-prioritize-ncc-false-2.json"))
    args["Nodes"]["items"].append(node("fresh", snapshots=[cached(SNAPSHOT, 8_100_000_000, "memory")]))
    _, out = call(handlers.prioritize, index, args)
    assert out[-1]["Host"] == "fresh" and out[-1]["Score"] == out[0]["Score"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"NodeNames": ["a"]}', "Pod is missing"),
        (b'{"Pod": {"metadata": {}}, "Nodes": null, "NodeNames": null}', "neither Nodes nor NodeNames"),
        (b'{"Pod": {"metadata": {}}, "NodeNames": [1]}', "list of strings"),
        (b'{"Pod": {"metadata": {}}, "Nodes": {"items": [{}]}}', "items[0] has no metadata.name"),
        (
            b'{"Pod": {"metadata": {"annotations": {"thaw.dev/snapshot": "s",'
            b' "thaw.dev/placement": "maybe"}}}, "NodeNames": []}',
            "thaw.dev/placement='maybe' is not valid",
        ),
    ],
)
def test_bad_input_is_a_400_with_the_reason(index: NodeIndex, body: bytes, needle: str) -> None:
    status, out = handlers.filter_(index, body)
    assert status == 400
    assert needle in orjson.loads(out)["Error"]
    status, out = handlers.prioritize(index, body)
    assert status == 400 and needle in orjson.loads(out)["Error"]


def test_debug_log_explains_the_decision(index: NodeIndex, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="extender.decisions")
    args = annotate(load_fixture("raw/extender-prioritize-ncc-true-2.json"))
    call(handlers.prioritize, index, args)
    [line] = [r.getMessage() for r in caplog.records if r.name == "extender.decisions"]
    assert (
        f"snapshot={SNAPSHOT}" in line and "node-1 score 10: memory hit" in line
    )  # 2 of 4 nodes hold it: 10 * (1 - 0.1 * 0.5) = 9.5, rounds to 10


def _items_bytes(body: bytes) -> list[bytes]:
    """The raw bytes of each item of the request's Nodes.items, split independently of handlers."""
    doc = orjson.loads(body)
    return [orjson.dumps(item) for item in doc["Nodes"]["items"]]


def test_full_nodes_kept_items_are_the_requests_own_bytes(index: NodeIndex) -> None:
    args = annotate(load_fixture("raw/extender-filter-ncc-false-1.json"), "required")
    body = orjson.dumps(args)
    status, out = handlers.filter_(index, body)
    assert status == 200
    raw = _items_bytes(body)
    names = names_of(args)
    kept = b",".join(r for r, n in zip(raw, names, strict=True) if n != "node-3")
    # Same nodes, same order, byte for byte (orjson writes the request compactly, as Go does).
    assert b'"items":[' + kept + b"]}" in out
    assert orjson.loads(out)["Nodes"]["metadata"] == args["Nodes"]["metadata"]


def test_full_nodes_list_metadata_null_reads_as_empty(index: NodeIndex) -> None:
    args = annotate(load_fixture("raw/extender-filter-ncc-false-1.json"), "required")
    args["Nodes"]["metadata"] = None
    _, out = call(handlers.filter_, index, args)
    assert out["Nodes"]["metadata"] == {}
    del args["Nodes"]["metadata"]
    _, out = call(handlers.filter_, index, args)
    assert out["Nodes"]["metadata"] == {}


@pytest.mark.parametrize("name", FILTERS + PRIORITIZES)
@pytest.mark.parametrize("placement", ["required", "preferred"])
def test_fast_and_logged_paths_answer_the_same_bytes(
    still: NodeIndex, name: str, placement: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = orjson.dumps(annotate(load_fixture(f"raw/{name}"), placement))
    fn = handlers.filter_deferred if "-filter-" in name else handlers.prioritize_deferred
    fast = fn(still, body)
    caplog.set_level(logging.DEBUG, logger="extender.decisions")
    logged = fn(still, body)
    assert logged[:2] == fast[:2]
    for answer in (fast, logged):  # both note the same node, or both none
        placed = dict(still.placed_on)
        if answer[2] is not None:
            answer[2]()
        assert still.placed_on == placed  # placed_window_s 0: counting is off


@pytest.mark.parametrize(
    "item",
    [
        {"metadata": {"name": "plain", "uid": "u"}},
        {"metadata": {"name": 'quote"d\\back'}},
        {"metadata": {"name": "ünïcode-节点"}},
        {"kind": "Node", "metadata": {"labels": {}, "name": "not-first"}},
        {"metadata": {"uid": "u", "name": "later"}},
        {"metadata": {"name": "last"}},
    ],
)
def test_item_name_fast_and_slow_layouts(item: dict[str, Any]) -> None:
    import msgspec

    raw = msgspec.json.decode(orjson.dumps(item), type=msgspec.Raw)
    assert handlers.item_name(raw) == item["metadata"]["name"]


def test_item_name_is_empty_without_one() -> None:
    import msgspec

    for doc in (b"{}", b'{"metadata":null}', b'{"metadata":{"name":3}}', b"[1]"):
        assert handlers.item_name(msgspec.json.decode(doc, type=msgspec.Raw)) == ""


def test_unknown_names_are_not_memoised(index: NodeIndex) -> None:
    args = annotate(load_fixture("raw/extender-filter-ncc-true-1.json"), "required")
    args["NodeNames"] = ["node-1", "made-up-1", "made-up-2"]
    for fn in (handlers.filter_, handlers.prioritize):
        assert fn(index, orjson.dumps(args))[0] == 200
    memo = index.decisions(SNAPSHOT, args["Pod"]["metadata"]["annotations"]["thaw.dev/workload"])
    assert "node-1" in memo.keeps and "node-1" in memo.fragments
    kept = set(memo.keeps) | set(memo.fails) | set(memo.fragments) | set().union(*memo.by_score)
    assert not {"made-up-1", "made-up-2"} & (kept | set(index.placed_on))
