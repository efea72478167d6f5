"""The programs the real-pod test checkpoints in one pod and restores in another.

Each is one Python file, copied into a workload image (Debian's base plus ``packages``) and run as
``python3 /app/FILE ARGS``. Its HTTP server answers ``ready_path`` when warm (the readinessProbe, so
the checkpoint point) and ``state_path`` with JSON that a restored replica must repeat exactly;
``bump_path`` (optional) changes the state, to show the restored replica has the state of the
checkpoint, not of the pod's later life. Add an entry to ``WORKLOADS`` to run another program.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # DNS-1123 label: names the image, the namespace and the snapshot
    program: Path
    args: tuple[str, ...]
    port: int
    ready_path: str
    state_path: str
    bump_path: str | None = None
    packages: tuple[str, ...] = ("python3",)

    @property
    def command(self) -> list[str]:
        return ["python3", f"/app/{self.program.name}", *self.args]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="counter",
            program=HERE / "workload_server.py",
            args=("--port", "8080", "--warmup", "1"),
            port=8080,
            ready_path="/healthz",
            state_path="/state",
            bump_path="/bump",
        ),
    )
}
