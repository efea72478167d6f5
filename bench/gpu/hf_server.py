"""An unmodified third-party model implementation served as users serve it (issue 10.5): Hugging Face
transformers' Qwen2 architecture (``Qwen2ForCausalLM``), loaded from a model directory on disk with
``from_pretrained``, compiled with ``torch.compile`` at its default settings (``model.compile()``),
answering greedy ``generate`` over HTTP. Nothing in it knows about checkpoints. There is no hub on
the GPU machine, so the weights are made once from a fixed seed (transformers' own initialisation)
and saved with ``save_pretrained`` (safetensors), as a downloaded model would be on disk.

    python3 bench/gpu/hf_server.py --make-model DIR [--size 3b|tiny] [--seed 0] [--device cuda|cpu]
    python3 bench/gpu/hf_server.py --model DIR --port 8000 [--compile default|none] [--device cuda|cpu]

HTTP: ``GET /health`` (200 once warm: it listens only after loading and warm-up), ``POST /generate``
with ``{"prompt": [token ids], "max_new_tokens": N}`` -> ``{"tokens": [...], "ms": ...}``: exactly N
new tokens, greedy. No tokenizer (none can be fetched): token ids in and out. One request at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import torch

# Qwen2.5-3B's shape with its own output matrix (3.40 B parameters, 6.8 GB in bf16): random weights
# with a tied one answer a greedy prompt by repeating its last token, which would make "identical
# tokens" an empty check. "tiny" for CPU tests.
SIZES: dict[str, dict[str, Any]] = {
    "3b": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
}  # fmt: skip
# The warm-up a server does before it reports ready: the benchmark's request shape (16 prompt
# tokens, 32 new), so compilation is over before the first client comes.
WARMUP_PROMPT = list(range(100, 116))
WARMUP_NEW = 32


def serving_dtype(device: str) -> torch.dtype:
    """bf16 on the GPU. On the CPU (tests) float32: on CPUs with AMX, oneDNN's bf16 matmuls use AMX
    tiles, whose per-process permission (arch_prctl ARCH_REQ_XCOMP_PERM) CRIU 4.2.1 does not give
    a restored process back, so it dies with SIGILL at its first AMX instruction."""
    return torch.bfloat16 if device != "cpu" else torch.float32


def make_model(path: str, size: str, seed: int, device: str) -> int:
    """Random weights from ``seed`` with transformers' own initialisation, saved as safetensors;
    returns the parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**SIZES[size])
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    # Exactly max_new_tokens every time: no end-of-sequence token stops a greedy run early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


class Engine:
    def __init__(self, path: str, device: str, compile_mode: str) -> None:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": serving_dtype(device)}
        if device != "cpu":
            kwargs["device_map"] = device
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        if device == "cpu":
            self.model = self.model.to(device)
        if compile_mode == "default":
            self.model.compile()  # torch.compile(self.model's forward) with every default
        self.device = device
        self.lock = threading.Lock()

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new: int) -> list[int]:
        if not prompt or max_new < 1:
            raise ValueError("a prompt of 1 or more token ids and max_new_tokens >= 1 are needed")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        with self.lock:
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
            )
        return [int(t) for t in out[0, len(prompt) :].tolist()]


ENGINE: Engine | None = None


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
        self._send(200, {"ok": True, "pid": os.getpid()})

    def do_POST(self) -> None:
        assert ENGINE is not None
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
    ap.add_argument("--model", help="model directory (config.json, model.safetensors)")
    ap.add_argument("--make-model", metavar="DIR")
    ap.add_argument("--size", default="3b", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--compile", default="default", choices=("default", "none"))
    args = ap.parse_args(argv)
    if args.make_model:
        t = time.monotonic()
        n = make_model(args.make_model, args.size, args.seed, args.device)
        print(
            f"wrote {n / 1e9:.2f} B parameters to {args.make_model} in {time.monotonic() - t:.1f}s",
            flush=True,
        )
        return 0
    if not args.model:
        ap.error("--model DIR (or --make-model DIR)")
    global ENGINE
    t0 = time.monotonic()
    ENGINE = Engine(args.model, args.device, args.compile)
    t_load = time.monotonic()
    for _ in range(2):  # warm-up: compile for the served shape, settle the allocator
        ENGINE.generate(WARMUP_PROMPT, WARMUP_NEW)
    t_warm = time.monotonic()
    server = HTTPServer(("127.0.0.1", args.port), Handler)
    gib = torch.cuda.memory_reserved() / 2**30 if args.device != "cpu" else 0.0
    print(
        f"ready on {args.port}: load {t_load - t0:.1f}s, warm-up {t_warm - t_load:.1f}s, "
        f"{gib:.1f} GiB reserved on the GPU",
        flush=True,
    )
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
