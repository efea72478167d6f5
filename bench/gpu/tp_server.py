"""A tensor-parallel stand-in for a vLLM-class server (issue 6): the decoder of bench/gpu/server.py
sharded Megatron-style over N ranks, one process per GPU, talking through torch.distributed (NCCL on
GPUs, gloo on CPUs for tests), warmed with torch.compile, serving greedy generation over HTTP from
rank 0.

    python3 bench/gpu/tp_server.py --tp 2 --weights W.safetensors --port 8000 [--config bench|small]

The launcher (this script without ``--rank``) is the tree's root, as torchrun or vLLM's engine is:
it starts one rank process per GPU and holds no CUDA state itself; if any rank exits it ends the
others and exits too (a TP server is whole or not at all). It forwards SIGTERM.

Sharding: q/k/v and gate/up are split by columns (heads, ffn), o and down by rows with an
all-reduce after each; the LM head is split over the vocabulary and the logits all-gathered for the
greedy argmax. Embedding and norms are replicated. Each rank reads only its slices of the one
safetensors file.

Requests reach the other ranks through a gloo (CPU) group, never NCCL: an idle rank waiting in a
NCCL broadcast would be a GPU kernel that never ends, and the CUDA checkpoint's lock waits for
running work to finish. The gloo group's timeout is long because an idle server waits in it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo on the path
from bench.gpu.server import CONFIGS, Config, Model, rms_norm  # the single-GPU model, shared

IDLE_TIMEOUT = datetime.timedelta(days=365)


def shard_rows(name: str, cfg: Config, tp: int, rank: int) -> list[tuple[int, int]] | None:
    """Row ranges of a [out, in] weight this rank keeps for column-parallel layers, or None."""
    d, f = cfg.d_model, cfg.ffn
    if name.endswith(".wqkv"):
        part = d // tp
        return [(s * d + rank * part, s * d + (rank + 1) * part) for s in range(3)]
    if name.endswith(".w_gate_up"):
        part = f // tp
        return [(s * f + rank * part, s * f + (rank + 1) * part) for s in range(2)]
    if name == "lm_head":
        part = cfg.vocab // tp
        return [(rank * part, (rank + 1) * part)]
    return None


def shard_cols(name: str, cfg: Config, tp: int, rank: int) -> tuple[int, int] | None:
    """Column range this rank keeps for row-parallel layers, or None."""
    if name.endswith(".wo"):
        part = cfg.d_model // tp
        return rank * part, (rank + 1) * part
    if name.endswith(".w_down"):
        part = cfg.ffn // tp
        return rank * part, (rank + 1) * part
    return None


def check_divisible(cfg: Config, tp: int) -> None:
    for what, n in (("heads", cfg.n_heads), ("ffn", cfg.ffn), ("vocab", cfg.vocab)):
        if n % tp:
            raise SystemExit(f"--tp {tp} does not divide the model's {what} ({n})")


def load_shard(path: str, cfg: Config, tp: int, rank: int, device: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
            sl = f.get_slice(name)
            rows, cols = shard_rows(name, cfg, tp, rank), shard_cols(name, cfg, tp, rank)
            if rows is not None:
                t = torch.cat([sl[a:b] for a, b in rows])
            elif cols is not None:
                t = sl[:, cols[0] : cols[1]]
            else:
                t = f.get_tensor(name)
            out[name] = t.to(device).contiguous()
    return out


class ShardedModel(Model):
    """One rank's part of bench/gpu/server.py's Model; static shapes, buffers at fixed addresses."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], tp: int, group: Any) -> None:
        super().__init__(cfg, weights, cfg.n_heads // tp)  # buffers, p and _rope: the one-GPU model's
        self.tp, self.group = tp, group

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(t, "sum", self.group)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cfg, w, h, hd = self.cfg, self.p, self.h, self.cfg.head_dim
        x = w("embed")[token]
        mask = (self.positions <= pos).view(1, 1, -1)
        for i in range(cfg.n_layers):
            a = rms_norm(x, w(f"l{i}.norm1"))
            q, k, v = (a @ w(f"l{i}.wqkv").t()).view(3, h, 1, hd).unbind(0)
            q, k = self._rope(q, pos), self._rope(k, pos)
            self.k_cache[i].index_copy_(1, pos, k)
            self.v_cache[i].index_copy_(1, pos, v)
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            x = x + self._reduce(o.reshape(1, -1) @ w(f"l{i}.wo").t())
            m = rms_norm(x, w(f"l{i}.norm2"))
            gate, up = (m @ w(f"l{i}.w_gate_up").t()).chunk(2, dim=-1)
            x = x + self._reduce((F.silu(gate) * up) @ w(f"l{i}.w_down").t())
        local = rms_norm(x, w("norm_f")) @ w("lm_head").t()  # [1, vocab / tp]
        logits = funcol.all_gather_tensor(local.contiguous(), 1, self.group)  # [1, vocab]
        return logits.argmax(-1)


class Engine:
    def __init__(self, model: ShardedModel, compile_mode: str | None, device: str) -> None:
        self.model = model.eval()
        # Compilation with the collectives traced in; a graph break falls back to eager for that part.
        self.step = torch.compile(model, mode=compile_mode) if compile_mode else model
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new: int) -> list[int]:
        cfg = self.model.cfg
        if not prompt or len(prompt) + max_new > cfg.max_seq:
            raise ValueError(f"prompt of 1..{cfg.max_seq - max_new} tokens needed")
        out: list[int] = []
        nxt = None
        for p in range(len(prompt) + max_new - 1):
            self.token.fill_(prompt[p] if p < len(prompt) or nxt is None else int(nxt))
            self.pos.fill_(p)
            nxt = self.step(self.token, self.pos).clone()
            if p >= len(prompt) - 1:
                out.append(int(nxt.item()))
        return out


class Rank:
    """What rank 0's HTTP handler needs: the engine and the CPU group that carries requests."""

    engine: Engine
    ctrl: Any
    max_seq: int


def broadcast_request(prompt: list[int] | None, max_new: int) -> tuple[list[int], int] | None:
    """Rank 0 sends (prompt, max_new); others receive it. An empty prompt means stop."""
    buf = torch.zeros(Rank.max_seq + 2, dtype=torch.long)
    if prompt is not None and dist.get_rank() == 0:
        buf[0], buf[1] = len(prompt), max_new
        buf[2 : 2 + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    dist.broadcast(buf, src=0, group=Rank.ctrl)
    n = int(buf[0])
    if n == 0:
        return None
    return [int(x) for x in buf[2 : 2 + n]], int(buf[1])


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
        self._send(200, {"ok": True, "pid": os.getpid(), "tp": dist.get_world_size()})

    def do_POST(self) -> None:
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            prompt = [int(x) for x in req["prompt"]]
            max_new = int(req.get("max_new_tokens", 16))
            if not prompt or len(prompt) + max_new > Rank.max_seq:
                raise ValueError(f"prompt of 1..{Rank.max_seq - max_new} tokens needed")
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"error": str(exc)})
            return
        t = time.perf_counter()
        broadcast_request(prompt, max_new)
        tokens = Rank.engine.generate(prompt, max_new)
        self._send(200, {"tokens": tokens, "ms": round((time.perf_counter() - t) * 1000, 2)})

    def log_message(self, format: str, *args: object) -> None:
        pass


def run_rank(args: argparse.Namespace) -> int:
    rank, tp = args.rank, args.tp
    cfg = CONFIGS[args.config]
    check_divisible(cfg, tp)
    gpu = torch.cuda.is_available() and not args.cpu
    device = f"cuda:{rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(rank)
    t0 = time.monotonic()
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        init_method=args.rendezvous,
        rank=rank,
        world_size=tp,
        device_id=torch.device(device) if gpu else None,
    )
    Rank.ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    Rank.max_seq = cfg.max_seq
    weights = load_shard(args.weights, cfg, tp, rank, device)
    if gpu:
        torch.cuda.synchronize()
    t_load = time.monotonic()
    Rank.engine = Engine(
        ShardedModel(cfg, weights, tp, dist.group.WORLD),
        None if args.compile == "none" else args.compile,
        device,
    )
    for _ in range(3):  # warm-up on every rank in step: compile, settle the allocator
        Rank.engine.generate([1, 2, 3, 4, 5, 6, 7, 8], 8)
    if gpu:
        torch.cuda.synchronize()
    dist.barrier(group=Rank.ctrl)
    gib = torch.cuda.memory_reserved() / 2**30 if gpu else 0.0
    print(
        f"rank {rank}/{tp} on {device}: load {t_load - t0:.1f}s, warm-up {time.monotonic() - t_load:.1f}s, "
        f"{gib:.1f} GiB reserved",
        flush=True,
    )
    if rank == 0:
        HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
        return 0
    while (req := broadcast_request(None, 0)) is not None:
        Rank.engine.generate(*req)
    return 0


def launch(args: argparse.Namespace) -> int:
    """The tree's root: one process per rank, all or nothing."""
    rendezvous = args.rendezvous
    if rendezvous is None:
        store = Path(args.run_dir) / f"rendezvous-{os.getpid()}"
        store.unlink(missing_ok=True)  # a stale store from another start would mix two servers
        rendezvous = f"file://{store}"
    env = {**os.environ, "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", "lo")}
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, *args.passthrough, "--rank", str(r), "--rendezvous", rendezvous],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(args.tp)},
        )
        for r in range(args.tp)
    ]

    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for p in ranks:
            code = p.poll()
            if code is not None:
                for q in ranks:
                    if q.poll() is None:
                        q.kill()
                for q in ranks:
                    q.wait()
                print(f"rank {ranks.index(p)} exited with {code}: the server stops", flush=True)
                return 0 if stopping else code or 1  # asked to stop: a clean exit
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", default="bench", choices=sorted(CONFIGS))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--compile", default="default", help="torch.compile mode, or 'none'")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPUs even where CUDA is present")
    ap.add_argument("--run-dir", default="/tmp", help="where the launcher's file rendezvous lives")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--rendezvous", help="init_method; default: a file:// store the launcher makes")
    args = ap.parse_args(argv)
    if args.rank is not None:
        return run_rank(args)
    skip = {"--rank", "--rendezvous"}
    args.passthrough = []
    it = iter(argv)
    for a in it:
        if a in skip:
            next(it, None)
        elif not any(a.startswith(s + "=") for s in skip):
            args.passthrough.append(a)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
