"""The GPU benchmark's publish and fetch rates beside their bound (issue 12: "thaw fetch and publish
move data at 80% or more of the source's bandwidth"): the durable copy rate measured in the same run
on the store's filesystem, the share of it each reached, and the source's read rate, in the JSON
(new fields beside the old ones) and on the summary line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.gpu import lifecycle


def _life(bandwidth: dict[str, Any]) -> dict[str, Any]:
    return {
        "workload": "hf-qwen2",
        "image_bytes": 9_000_000_000,
        "checkpoint": {"outcome": {"checkpoint": {"status": "published", "publish_s": 18.0}}},
        "fetch": {"fetch_s": 6.0},
        "bandwidth": bandwidth,
    }


def test_publish_and_fetch_are_given_as_a_share_of_the_durable_copy_bound() -> None:
    life = _life({"disk": {"gb_s": 1.9}, "page cache": {"gb_s": 7.5}, lifecycle.COPY: {"gb_s": 1.25}})
    rates = lifecycle.transfer_rates(life)
    assert rates["publish"] == {
        "s": 18.0, "gb_s": 0.5, "bound_gb_s": 1.25, "of_bound": 0.4,
        "source": "page cache", "source_gb_s": 7.5, "of_source": 0.07,
    }  # fmt: skip
    assert rates["fetch"]["gb_s"] == 1.5 and rates["fetch"]["of_bound"] == 1.2
    text = lifecycle.table(life)
    assert "publish 18.0 s (0.50 GB/s, 40% of the 1.25 GB/s durable-copy bound)" in text
    assert "fetch 6.0 s (1.50 GB/s, 120% of the 1.25 GB/s durable-copy bound)" in text
    # the copy is not a read tier: named apart from the read bandwidths
    assert (
        "read bandwidth (this run, the image's files): disk 1.9 GB/s, page cache 7.5 GB/s; durable copy"
        in text
    )


def test_without_a_measured_bound_the_rates_stand_alone() -> None:
    """Results from before the bound was measured (no "durable copy") read as they did."""
    life = _life({"disk": {"gb_s": 1.9}, "page cache": {"gb_s": 7.5}})
    assert lifecycle.transfer_rates(life)["publish"]["of_bound"] is None
    text = lifecycle.table(life)
    assert "publish 18.0 s (0.50 GB/s); fetch 6.0 s (1.50 GB/s)" in text
    del life["fetch"]
    assert "fetch None s (-)" in lifecycle.table(life)


def test_the_durable_copy_writes_syncs_and_removes_its_file(tmp_path: Path) -> None:
    src = tmp_path / "image"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(3 << 20))
    (src / "core-1.img").write_bytes(os.urandom(1000))
    out = tmp_path / "beside-the-store"
    out.mkdir()
    r = lifecycle.copy_rate(lifecycle.image_files(src), out, limit=2 << 20)
    assert r["bytes"] == 2 << 20 and r["gb_s"] > 0  # stops at the sample's size
    r = lifecycle.copy_rate(lifecycle.image_files(src), out)
    assert r["bytes"] == (3 << 20) + 1000  # every file when they are smaller than the sample
    assert list(out.iterdir()) == []
