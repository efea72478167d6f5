"""The programs the real-pod test checkpoints in one pod and restores in another.

Each is one Python file (plus the files it needs beside it), copied into a workload image (Debian's
base plus ``packages``) at ``/app`` and run as ``python3 /app/FILE ARGS``. Its HTTP server answers
``ready_path`` when warm (the readinessProbe, so the checkpoint point) and ``state_path`` with JSON
that a restored replica must repeat exactly; ``bump_path`` (optional) changes the state, to show the
restored replica has the state of the checkpoint, not of the pod's later life. Add an entry to
``WORKLOADS`` to run another program.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
STATEFUL = TESTS / "workloads"


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
    files: tuple[Path, ...] = ()  # copied beside the program (/app)

    @property
    def command(self) -> list[str]:
        return ["python3", f"/app/{self.program.name}", *self.args]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        # Issue 10's server: a shared object it puts under $TMPDIR and maps (the prebuilt
        # libstate.so: the image has no compiler), a journal it keeps open and appends to under
        # $HOME/.cache, a UNIX socket in a directory of its own under $TMPDIR. All of it lives in
        # the container's writable layer, which a new pod does not have (pod files carry it).
        Workload(
            name="stateful",
            program=STATEFUL / "stateful_server.py",
            args=("8080",),
            port=8080,
            ready_path="/healthz",
            state_path="/state",
            bump_path="/bump",
            files=(STATEFUL / "libstate.so", STATEFUL / "statelib.c"),
        ),
    )
}
