"""JAX as it ships: its default GPU preallocation (75% of the GPU's memory taken at start, what
``XLA_PYTHON_CLIENT_PREALLOCATE`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION`` control), a jitted
function of fixed-seed weights answered over HTTP."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.gpu.matrix.serve import digest, port_arg, serve


def main(argv: list[str]) -> int:
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (2048, 2048), dtype=jnp.float32) / 45.0
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2048), dtype=jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ w) @ w.T)

    def answer() -> dict[str, Any]:
        y = np.asarray(f(x))
        return {"digest": digest(y[:, :16].ravel().tolist())}

    answer()
    info = {
        "backend": jax.default_backend(),
        "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "default (true)"),
    }
    serve(port_arg(argv), answer, lambda: info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
