"""The GPU benchmarks' reporting (issues 10.4, 10.5, 12, 16.2), on phase results shaped as
bench/gpu/harness.py returns them: every table gives the hit and the miss (fetch included), the
storage bound beside each restore, CRIU and CUDA shares, the comparison with the checkpointed
server's answer, and whether a health check answered before the GPU state was back."""

from __future__ import annotations

from typing import Any

from bench.gpu import lifecycle
from bench.gpu.matrix.__main__ import PATTERNS, verdict

CKPT_TOKENS = [5, 6, 7]


def _restore(
    first_s: float, tokens: list[int], criu: float, cuda: float, health: float | None
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "first_answer_s": first_s,
        "first": {"tokens": tokens},
        "again": {"tokens": tokens},
        "outcome": {"result": "restored", "timings": {"criu_restore_s": criu, "cuda_restore_s": cuda}},
    }
    if health is not None:
        r["first_health_s"] = health
    return r


def _life() -> dict[str, Any]:
    return {
        "workload": "hf-qwen2",
        "image_bytes": 8_000_000_000,
        "checkpoint": {
            "first": {"tokens": [1, 2, 3]},  # answered while the checkpoint began: not the reference
            "after_checkpoint": {"tokens": CKPT_TOKENS},
            "outcome": {"checkpoint": {"status": "published", "ready_s": 99.0, "publish_s": 30.0}},
        },
        "fetch": {"fetch_s": 16.0},
        "miss": _restore(6.0, CKPT_TOKENS, 4.0, 1.5, None),
        "bandwidth": {"disk": {"gb_s": 1.6}, "page cache": {"gb_s": 8.0}, "tmpfs": {"gb_s": 10.0}},
        "hits": {
            "disk": _restore(8.0, CKPT_TOKENS, 5.5, 1.6, 2.0),
            "page cache": _restore(5.0, CKPT_TOKENS, 3.0, 1.5, 5.2),
            "tmpfs": _restore(4.0, [9, 9, 9], 2.5, 1.4, None),
        },
        "cold": {"first_answer_s": 100.0, "first": {"tokens": CKPT_TOKENS}, "outcome": {"result": "cold"}},
    }


def test_rows_give_hits_miss_bounds_shares_and_the_checkpointed_reference() -> None:
    rows = {r["run"]: r for r in lifecycle.rows(_life())}
    assert list(rows) == ["cold", "hit, tmpfs", "hit, page cache", "hit, disk", "miss: fetch + restore"]
    miss = rows["miss: fetch + restore"]
    assert miss["first_answer_s"] == 22.0 and miss["speedup"] == 4.5  # the fetch counts
    pc = rows["hit, page cache"]
    assert pc["bound_s"] == 1.0 and pc["x_bound"] == 5.0  # 8 GB at 8 GB/s
    assert pc["criu_share"] == 0.6 and pc["cuda_share"] == 0.3 and pc["speedup"] == 20.0
    assert rows["hit, disk"]["bound_s"] == 5.0
    # compared with the server that was checkpointed (its answer after the checkpoint), not with cold
    assert pc["same"] is True and rows["hit, tmpfs"]["same"] is False
    assert rows["hit, disk"]["health_before_gpu"] == "yes"  # 2.0 s < 5.5 + 1.6
    assert pc["health_before_gpu"] == "no" and miss["health_before_gpu"] == "-"


def test_a_variant_of_a_tiers_hit_is_measured_against_that_tiers_bound() -> None:
    life = _life()
    life["hits"]["disk, fast CRIU"] = _restore(6.0, CKPT_TOKENS, 3.0, 1.6, None)
    life["hits"]["page cache, fast CRIU"] = _restore(2.0, CKPT_TOKENS, 0.5, 1.5, None)
    life["hits"]["gate stopped"] = _restore(5.5, CKPT_TOKENS, 3.0, 1.5, None)
    life["hit_tier"] = {"disk, fast CRIU": "disk", "page cache, fast CRIU": "page cache"}
    rows = {r["run"]: r for r in lifecycle.rows(life)}
    assert rows["hit, disk, fast CRIU"]["bound_s"] == 5.0 and rows["hit, disk, fast CRIU"]["x_bound"] == 1.2
    assert rows["hit, page cache, fast CRIU"]["x_bound"] == 2.0 and rows["hit, page cache, fast CRIU"]["same"]
    assert rows["hit, page cache, gate stopped"]["bound_s"] == 1.0  # an extra restore: page cache


def test_cold_falls_back_to_the_checkpoint_pods_time_to_ready() -> None:
    life = _life()
    del life["cold"]
    rows = lifecycle.rows(life)
    assert rows[0]["run"] == "hit, tmpfs" and rows[0]["speedup"] == round(99.0 / 4.0, 1)


def test_table_names_hit_miss_and_what_the_extender_makes_common() -> None:
    text = lifecycle.table(_life())
    assert "miss: fetch + restore" in text and "hit, page cache" in text
    assert "fetch 16.0 s (0.50 GB/s)" in text and "page cache 8.0 GB/s" in text
    assert lifecycle.EXTENDER_NOTE in text


def test_a_failed_restore_shows_what_failed_and_fails_the_run() -> None:
    life = _life()
    life["hits"]["tmpfs"]["first"] = {"tokens": CKPT_TOKENS}
    assert lifecycle.all_restored(life)
    reason = (
        "restore failed: criu restore exited 1 (log /w/restore.log): (00.0003) Zero page detection failed, "
        "optimization turns off. | (00.06) 4096: Error (criu/files-reg.c:2353): Can't open file "
        "tmp/torchinductor_root/7d/x.main.so on restore: No such file | (00.07) Error (criu/cr-x.c)"
    )
    life["hits"]["disk"]["outcome"] = {"result": "cold", "reason": reason}
    text = lifecycle.table(life)
    assert "(cold: restore failed: criu restore exited 1 (log /w/restore.log): (00.06) 4096: Error" in text
    assert "Zero page" not in text
    disk = next(r for r in lifecycle.rows(life) if r["run"] == "hit, disk")
    assert disk["x_bound"] is None  # a cold start is not measured against the restore's bound
    assert not lifecycle.all_restored(life)
    assert not lifecycle.all_restored({"workload": "w", "stopped": "checkpoint failed: x"})


def test_bound_needs_both_numbers() -> None:
    assert lifecycle.bound_s(None, 2.0) is None and lifecycle.bound_s(10, None) is None
    assert lifecycle.bound_s(3_000_000_000, 1.5) == 2.0


def _pattern(key: str) -> Any:
    return next(p for p in PATTERNS if p.key == key)


def test_matrix_verdicts() -> None:
    ok = {"checkpoint": _life()["checkpoint"], "miss": _restore(1.0, CKPT_TOKENS, 0.5, 0.2, None)}
    assert verdict(_pattern("hf-eager"), ok) == ("restored, identical output", True)
    wrong = {**ok, "miss": _restore(1.0, [0], 0.5, 0.2, None)}
    assert verdict(_pattern("hf-eager"), wrong)[1] is False
    refused = {
        "checkpoint": {
            "after_checkpoint": {"tokens": CKPT_TOKENS},
            "outcome": {"checkpoint": {"status": "failed", "reason": "checkpoint refused before CRIU: …"}},
        }
    }
    text, good = verdict(_pattern("hf-compile-as-shipped"), refused)
    assert good and text.startswith("checkpoint failed: checkpoint refused before CRIU")
    assert verdict(_pattern("hf-eager"), refused)[1] is False  # a pattern that should restore
    # refused, but the server stopped answering: never acceptable
    silent = {"checkpoint": {"outcome": refused["checkpoint"]["outcome"]}}
    assert verdict(_pattern("hf-compile-as-shipped"), silent)[1] is False
    stopped = {
        "checkpoint": {
            "outcome": {"checkpoint": {"status": "failed", "reason": "x", "stopped_workload": True}}
        }
    }
    text, good = verdict(_pattern("cuda-ipc"), stopped)
    assert good and "stopped once" in text


def test_compare_says_where_the_new_path_helps() -> None:
    current = _life()
    lever = _life()
    lever["workload"] = "lever"
    lever["hits"]["page cache"]["first_answer_s"] = 2.0  # faster than 5.0
    lever["hits"]["disk"]["first_answer_s"] = 9.0  # slower than 8.0
    lines = lifecycle.compare(current, lever)
    assert any(
        ln.startswith("hit, page cache")
        and "5.0 s (5.0x bound)" in ln
        and "lever 2.0 s (2.0x bound): helps" in ln
        for ln in lines
    )
    assert any(ln.startswith("hit, disk") and "does not help" in ln for ln in lines)
    assert any(ln.startswith("miss: fetch + restore") for ln in lines)
    assert not any(
        "tmpfs" in ln and "helps" in ln and "not" not in ln for ln in lines
    )  # wrong tokens: never helps
    # a variant of the same life: each tier against its own variant, no miss
    current["hits"]["page cache, fast CRIU"] = _restore(3.0, CKPT_TOKENS, 1.0, 1.5, None)
    current["hit_tier"] = {"page cache, fast CRIU": "page cache"}
    lines = lifecycle.compare(current, current, "fast CRIU")
    assert lines == ["hit, page cache        current 5.0 s (5.0x bound), fast CRIU 3.0 s (3.0x bound): helps"]
