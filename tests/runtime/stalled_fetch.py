"""``python -m tests.runtime.stalled_fetch STORE CACHE TRUST PLAN FACTS FIFO``: the library's fetch
over a directory store whose ``pages-1.img`` is read from FIFO instead, which the test feeds: the
test decides when the copy stalls (a real store never hands a FIFO to the copy: it refuses them)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from thaw.contract.facts import read_facts_file
from thaw.contract.manifest import Manifest
from thaw.contract.plan import write_plan
from thaw.snapshot.fetch import fetch
from thaw.snapshot.store import DirectoryStore


class StallingStore(DirectoryStore):
    def __init__(self, root: Path, fifo: Path) -> None:
        super().__init__(root)
        self.fifo = fifo

    def open_file(self, namespace: str, manifest: Manifest, path: str) -> BinaryIO:
        if path == "pages-1.img":
            return open(self.fifo, "rb")
        return super().open_file(namespace, manifest, path)


def main(argv: list[str]) -> int:
    store, cache, trust, plan, facts, fifo = map(Path, argv)
    result = fetch(StallingStore(store, fifo), cache, "demo", "w1", trust, read_facts_file(facts))
    write_plan(plan, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
