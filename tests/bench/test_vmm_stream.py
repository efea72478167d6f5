"""The stand-in's weight reload (bench/gpu/vmm_weights.py, issue 12): a safetensors file streamed in
chunks, several in flight, into one region laid out as the file's data section; every tensor a view
at its offset equals what safetensors itself loads. Needs torch and safetensors: it runs on the GPU
machine, which has them, and is skipped elsewhere with a reason CI allows (tests/needs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

WHY = "runs on the GPU machine: bench/gpu's weight streaming needs torch and safetensors"
torch = pytest.importorskip("torch", reason=WHY)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=WHY)

from bench.gpu import vmm_weights  # noqa: E402  (after the skips)


def test_streamed_region_holds_every_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed": torch.randn(300, 64, generator=g).to(torch.bfloat16),
        "norm": torch.ones(64, dtype=torch.bfloat16),
        "w": torch.randn(64, 129, generator=g).to(torch.bfloat16),
        "step": torch.arange(7, dtype=torch.int64),
    }
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    monkeypatch.setattr(vmm_weights, "CHUNK", 1000)  # many chunks, uneven last one
    start, header = vmm_weights.read_header(str(path))
    nbytes = vmm_weights.data_bytes(header)
    assert start + nbytes == path.stat().st_size
    region = torch.zeros(nbytes, dtype=torch.uint8)
    vmm_weights.stream_file(str(path), start, nbytes, region, streams=3)
    loaded = vmm_weights.views(region, header)
    expected = safetensors_torch.load_file(str(path))
    assert loaded.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name
        assert loaded[name].data_ptr() == region.data_ptr() + header[name]["data_offsets"][0]


def test_a_short_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"a": torch.zeros(100)}, str(path))
    start, _ = vmm_weights.read_header(str(path))
    region = torch.zeros(1000, dtype=torch.uint8)
    with pytest.raises(OSError, match="short read"):
        vmm_weights.stream_file(str(path), start, 1000, region)
