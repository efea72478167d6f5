"""The demo's webhook step, run as ``thaw demo`` runs it (a real server, real HTTPS)."""

from __future__ import annotations

from pathlib import Path

from thaw.dev.demo import STEPS, DemoContext, print_summary, webhook_step


def test_webhook_step_behaves_and_leaves_the_mutated_pod(tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = DemoContext(workdir=tmp_path, out=lines.append)
    webhook_step(ctx)
    print_summary(ctx)
    assert ctx.failures == 0, "\n".join(lines)
    outcomes = [r.outcome for r in ctx.rows]
    assert outcomes.count("mutated") == 1 and outcomes.count("refused") == 2 and "HTTP 400" in outcomes
    (pod,) = ctx.pods.values()
    assert pod["spec"]["initContainers"][0]["name"] == "thaw-tools"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["thaw.dev/restore"] == "1"
    assert "every case behaved as expected" in lines[-1]
    assert STEPS[0] == ("webhook", webhook_step)
