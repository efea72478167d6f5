"""A vLLM-class stand-in: a decoder-only transformer built from a config with torch, weights from a
local safetensors file, warmed up the way servers are (torch.compile with CUDA graphs, a few
generations), serving greedy generation over HTTP. Runs offline; the GPU benchmark restores it.

    python3 bench/gpu/server.py --weights W.safetensors --port 8000 [--config small|bench]
    python3 bench/gpu/server.py --make-weights W.safetensors [--config ...]   # random weights

HTTP: ``GET /health`` (200 once warm: the server listens only after warm-up), ``POST /generate``
with ``{"prompt": [token ids], "max_new_tokens": N}`` -> ``{"tokens": [...], "ms": ...}``. One request
at a time (CUDA graphs are not for concurrent use), HTTP/1.0 (no connection stays open).

``--pool-gb G`` reserves G GiB of GPU memory up front, as vLLM's ``--gpu-memory-utilization`` takes
its KV cache, and offers sleep mode for Thaw's hooks with vLLM's endpoints and meaning (the request
forms are the CPU stand-in's, thaw/dev/standin.py): ``POST /sleep?level=1`` frees the reservation
(tag ``kv_cache``; the decode step's own small cache stays: CUDA graphs point at it), ``POST
/wake_up?tags=kv_cache`` (or no tags: everything) takes it again; ``GET /is_sleeping``.

``--weights-vmm`` keeps the weights in a CUDA VMM range (bench/gpu/vmm_weights.py) so that
``/sleep?level=2`` also lets go of them (tag ``weights``, vLLM's level 2: the snapshot then carries
no weights); ``/wake_up?tags=weights`` maps memory back at the same device addresses without the
weights, and ``POST /collective_rpc`` with ``{"method": "reload_weights"}`` streams them in from the
weights file through pinned buffers. While asleep, or woken without the reload, ``/generate``
answers 503.

Shapes are static (a KV cache of ``max_seq`` positions, one token per step, the position a device
tensor) so that ``torch.compile(mode="reduce-overhead")`` captures the decode step as CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository
from thaw.dev.standin import rpc_method, sleep_tags, wake_tags  # vLLM's request forms


@dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn: int
    max_seq: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def params(self) -> int:
        per_layer = 4 * self.d_model * self.d_model + 3 * self.d_model * self.ffn + 2 * self.d_model
        return self.n_layers * per_layer + 2 * self.vocab * self.d_model + self.d_model


CONFIGS = {
    # ~4.3 B parameters, 8.6 GB of bf16 weights (Llama-7B-like widths, 20 layers).
    "bench": Config(vocab=32000, d_model=4096, n_layers=20, n_heads=32, ffn=11008, max_seq=256),
    "small": Config(vocab=1024, d_model=256, n_layers=2, n_heads=4, ffn=512, max_seq=64),
}


def weight_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.ffn
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab, d), "norm_f": (d,), "lm_head": (cfg.vocab, d)}
    for i in range(cfg.n_layers):
        shapes |= {
            f"l{i}.norm1": (d,),
            f"l{i}.wqkv": (3 * d, d),
            f"l{i}.wo": (d, d),
            f"l{i}.norm2": (d,),
            f"l{i}.w_gate_up": (2 * f, d),
            f"l{i}.w_down": (d, f),
        }
    return shapes


def make_weights(path: str, cfg: Config, seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
        else:
            t = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
            t = (t / math.sqrt(shape[1])).to(torch.bfloat16)
        tensors[name] = t.cpu()
    save_file(tensors, path)


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


class Model(torch.nn.Module):
    """Weights and the KV cache are registered buffers: static addresses, so the compiled step may
    update the cache in place and still be captured as CUDA graphs."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], heads: int | None = None) -> None:
        """``heads``: the attention heads this process holds (all of them, or a tensor-parallel
        rank's share: bench/gpu/tp_server.py)."""
        super().__init__()
        self.cfg = cfg
        self.h = heads or cfg.n_heads
        self.names = {n: n.replace(".", "_") for n in weights}
        for n, t in weights.items():
            self.register_buffer(self.names[n], t, persistent=False)
        dev = weights["embed"].device
        self.register_buffer(
            "k_cache",
            torch.zeros(cfg.n_layers, self.h, cfg.max_seq, cfg.head_dim, dtype=torch.bfloat16, device=dev),
        )
        self.register_buffer("v_cache", torch.zeros_like(self.k_cache))
        self.register_buffer("positions", torch.arange(cfg.max_seq, device=dev))
        half = cfg.head_dim // 2
        inv = 1.0 / (10000 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
        ang = torch.outer(torch.arange(cfg.max_seq, device=dev, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())

    def p(self, name: str) -> torch.Tensor:
        t: torch.Tensor = getattr(self, self.names[name])
        return t

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [heads, 1, head_dim]
        cos, sin = self.cos[pos].view(1, 1, -1), self.sin[pos].view(1, 1, -1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step: token [1] int64 at position pos [1] -> next token [1] (greedy)."""
        cfg, w = self.cfg, self.p
        h, hd = cfg.n_heads, cfg.head_dim
        x = w("embed")[token]  # [1, d]
        mask = (self.positions <= pos).view(1, 1, -1)  # attend to positions <= pos
        for i in range(cfg.n_layers):
            a = rms_norm(x, w(f"l{i}.norm1"))
            q, k, v = (a @ w(f"l{i}.wqkv").t()).view(3, h, 1, hd).unbind(0)
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k_cache[i].index_copy_(1, pos, k)
            self.v_cache[i].index_copy_(1, pos, v)
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            x = x + o.reshape(1, -1) @ w(f"l{i}.wo").t()
            m = rms_norm(x, w(f"l{i}.norm2"))
            gate, up = (m @ w(f"l{i}.w_gate_up").t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w(f"l{i}.w_down").t()
        logits = rms_norm(x, w("norm_f")) @ w("lm_head").t()
        return logits.argmax(-1)


class Engine:
    def __init__(self, model: Model, compile_mode: str | None) -> None:
        self.model = model.eval()
        self.step = torch.compile(model, mode=compile_mode, fullgraph=True) if compile_mode else model
        self.token = torch.zeros(1, dtype=torch.long, device="cuda")
        self.pos = torch.zeros(1, dtype=torch.long, device="cuda")

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new: int) -> list[int]:
        cfg = self.model.cfg
        if not prompt or len(prompt) + max_new > cfg.max_seq:
            raise ValueError(f"prompt of 1..{cfg.max_seq - max_new} tokens needed")
        out: list[int] = []
        nxt = None
        for p in range(len(prompt) + max_new - 1):
            # Static input buffers, updated in place: what CUDA graph replay reads.
            self.token.fill_(prompt[p] if p < len(prompt) or nxt is None else int(nxt))
            self.pos.fill_(p)
            nxt = self.step(self.token, self.pos).clone()
            if p >= len(prompt) - 1:
                out.append(int(nxt.item()))
        return out


ENGINE: Engine | None = None
POOL_GB = 0.0
POOL: list[torch.Tensor] = []  # the KV cache's reservation (--pool-gb); empty while asleep
VMM: Any = None  # bench.gpu.vmm_weights.VmmWeights with --weights-vmm
SLEEPING: set[str] = set()  # vLLM's memory tags let go of: kv_cache (the pool), weights (--weights-vmm)


def reserve() -> None:
    if POOL_GB > 0 and not POOL:
        POOL.append(torch.zeros(int(POOL_GB * 2**30), dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, code: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/is_sleeping":
            self._send(200, {"is_sleeping": bool(SLEEPING)})
            return
        self._send(200, {"ok": True, "pid": os.getpid()})

    def do_POST(self) -> None:
        assert ENGINE is not None
        path, _, query = self.path.partition("?")
        if path == "/collective_rpc":
            method = rpc_method(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if method != "reload_weights" or VMM is None:
                self._send(400, {"error": f"no such method {method!r} (reload_weights, with --weights-vmm)"})
            elif VMM.handle is None:  # vLLM would write into unmapped memory
                self._send(409, {"error": "the weights are asleep: POST /wake_up?tags=weights first"})
            else:
                loaded = VMM.fill()
                print(f"weights reloaded {loaded}", flush=True)
                self._send(200, {"results": [loaded]})
            return
        if path in ("/sleep", "/wake_up"):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            tags = sleep_tags(query) if path == "/sleep" else wake_tags(query)
            if isinstance(tags, str):
                self._send(400, {"error": tags})
                return
            info: dict[str, Any] = {}
            if path == "/sleep":
                if "weights" in tags and VMM is None:
                    self._send(400, {"error": "level 2 needs --weights-vmm"})
                    return
                torch.cuda.synchronize()
                SLEEPING.update(tags)
                POOL.clear()
                torch.cuda.empty_cache()  # back to the driver: the checkpoint copies what is allocated
                if "weights" in tags:
                    VMM.release()
            else:
                if "weights" in tags and VMM is not None:
                    info = VMM.map()  # memory only, as vLLM: the weights come with reload_weights
                if "kv_cache" in tags:
                    reserve()
                SLEEPING.difference_update(tags)
            reserved = torch.cuda.memory_reserved() / 2**30
            self._send(200, {"asleep": bool(SLEEPING), "reserved_gib": reserved, **info})
            return
        if SLEEPING:
            self._send(503, {"error": "asleep"})
            return
        if VMM is not None and not VMM.filled:  # vLLM would answer from whatever the memory holds
            self._send(
                503, {"error": 'weights not loaded: POST /collective_rpc {"method": "reload_weights"}'}
            )
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            t = time.perf_counter()
            tokens = ENGINE.generate([int(x) for x in req["prompt"]], int(req.get("max_new_tokens", 16)))
            self._send(200, {"tokens": tokens, "ms": round((time.perf_counter() - t) * 1000, 2)})
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"error": str(exc)})

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", default="bench", choices=sorted(CONFIGS))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--compile", default="reduce-overhead", help="torch.compile mode, or 'none'")
    ap.add_argument("--make-weights", action="store_true")
    ap.add_argument("--pool-gb", type=float, default=0.0, help="GPU memory to reserve as a KV cache would")
    ap.add_argument("--weights-vmm", action="store_true", help="weights that /sleep?level=2 lets go of")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.make_weights:
        make_weights(args.weights, cfg)
        print(f"wrote {cfg.params() / 1e9:.2f} B parameters to {args.weights}", flush=True)
        return 0
    t0 = time.monotonic()
    global ENGINE, POOL_GB, VMM
    if args.weights_vmm:
        from bench.gpu.vmm_weights import VmmWeights

        VMM = VmmWeights(args.weights)
        weights = VMM.load()
    else:
        from safetensors.torch import load_file

        weights = load_file(args.weights, device="cuda")
    torch.cuda.synchronize()
    t_load = time.monotonic()
    ENGINE = Engine(Model(cfg, weights), None if args.compile == "none" else args.compile)
    POOL_GB = args.pool_gb
    reserve()
    for _ in range(3):  # warm-up: compile, capture graphs, settle the allocator
        ENGINE.generate([1, 2, 3, 4, 5, 6, 7, 8], 8)
    torch.cuda.synchronize()
    t_warm = time.monotonic()
    server = HTTPServer(("127.0.0.1", args.port), Handler)
    gib = torch.cuda.memory_reserved() / 2**30
    print(
        f"ready on {args.port}: load {t_load - t0:.1f}s, warm-up {t_warm - t_load:.1f}s, "
        f"{gib:.1f} GiB reserved on the GPU",
        flush=True,
    )
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
