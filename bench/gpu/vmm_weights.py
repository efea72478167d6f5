"""Weights that can leave the GPU and come back at the same device addresses (issue 12, "weights out
of the image"): vLLM's sleep level 2 plus weight reload, for the GPU stand-in (bench/gpu/server.py
``--weights-vmm``).

The weights live in one virtual range reserved with the CUDA VMM API (``cuMemAddressReserve``) and
backed by physical memory mapped into it (``cuMemCreate``, ``cuMemMap``), laid out exactly as the
safetensors file's data section, so every tensor is a view at a fixed address. ``release()`` unmaps
and frees the physical memory and keeps the range: the CUDA checkpoint then has no weights to copy
and the snapshot carries none. As in vLLM, coming back takes two steps: ``map()`` maps new physical
memory at the same range (``/wake_up?tags=weights``: its content is undefined), and ``fill()``
streams the file into it through pinned host buffers, several reads and copies in flight
(``/collective_rpc`` ``reload_weights``); ``reload()`` does both. CUDA graphs that captured the old
addresses stay valid (vLLM's CuMemAllocator does the same).

On CPU (tests) the range is an ordinary tensor and the same streaming fills it.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
import time
from typing import Any

import torch

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "U8": torch.uint8,
}
CHUNK = 64 << 20
STREAMS = 4  # reads and host-to-device copies in flight


def read_header(path: str) -> tuple[int, dict[str, Any]]:
    """The data section's offset in the file and the tensors' entries (safetensors format)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def data_bytes(header: dict[str, Any]) -> int:
    return max((int(e["data_offsets"][1]) for e in header.values()), default=0)


def stream_file(path: str, start: int, nbytes: int, dst: torch.Tensor, streams: int = STREAMS) -> float:
    """Copy ``nbytes`` of ``path`` from ``start`` into ``dst`` (uint8, on the GPU or the CPU) through
    pinned buffers, ``streams`` chunks in flight (a thread, a buffer and a CUDA stream each); the
    seconds it took."""
    cuda = dst.is_cuda
    t = time.monotonic()
    chunks = list(range(0, nbytes, CHUNK))
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            buf = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda)
            view = memoryview(buf.numpy())
            stream = torch.cuda.Stream(device=dst.device) if cuda else None
            fd = os.open(path, os.O_RDONLY)
            try:
                for off in chunks[k::streams]:
                    n = min(CHUNK, nbytes - off)
                    if stream is not None:
                        stream.synchronize()  # the buffer's last copy is done before it is refilled
                    got = 0
                    while got < n:
                        r = os.preadv(fd, [view[got:n]], start + off + got)
                        if r <= 0:
                            raise OSError(f"{path}: short read at {start + off + got}")
                        got += r
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            dst[off : off + n].copy_(buf[:n], non_blocking=True)
                    else:
                        dst[off : off + n].copy_(buf[:n])
                if stream is not None:
                    stream.synchronize()
            finally:
                os.close(fd)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(min(streams, max(1, len(chunks))))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    if cuda:
        # The pinned buffers go back to the driver, not to torch's host cache: a checkpoint taken
        # later should not carry (or depend on) pinned memory the server no longer uses.
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return time.monotonic() - t


def views(region: torch.Tensor, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each tensor of the file as a view of ``region`` (the data section) at its offset."""
    out = {}
    for name, e in header.items():
        a, b = (int(x) for x in e["data_offsets"])
        out[name] = region[a:b].view(DTYPES[e["dtype"]]).view(tuple(e["shape"]))
    return out


# --- the CUDA VMM API through ctypes --------------------------------------------------------------


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]  # CUmemLocation; DEVICE = 1


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocProp(ctypes.Structure):
    # CUmemAllocationProp: type PINNED = 1, no shareable handle types, on a device.
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]  # PROT_READWRITE = 3


class _CudaArray:
    """A raw device range that torch can wrap without copying (``__cuda_array_interface__``)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class VmmWeights:
    """The weights of one safetensors file in a VMM range of device ``device`` (module doc)."""

    def __init__(self, path: str, device: int = 0) -> None:
        self.path = path
        self.start, self.header = read_header(path)
        self.nbytes = data_bytes(self.header)
        self.device = device
        torch.zeros(1, device=f"cuda:{device}")  # the primary context, current in this thread
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.prop = _AllocProp(type=1, requestedHandleTypes=0, location=_Location(type=1, id=device))
        gran = ctypes.c_size_t(0)
        self._check("cuMemGetAllocationGranularity", ctypes.byref(gran), ctypes.byref(self.prop), 0)
        g = gran.value
        self.size = (self.nbytes + g - 1) // g * g
        ptr = ctypes.c_uint64(0)
        self._check("cuMemAddressReserve", ctypes.byref(ptr), ctypes.c_size_t(self.size), ctypes.c_size_t(0),
                    ctypes.c_uint64(0), ctypes.c_uint64(0))  # fmt: skip
        self.ptr = ptr.value
        self.handle: int | None = None
        self.filled = False  # the file's content is in the mapped memory
        self.region: torch.Tensor | None = None  # made once the range is mapped (torch reads its device)
        self.tensors: dict[str, torch.Tensor] = {}

    def _check(self, name: str, *args: Any) -> None:
        rc = int(getattr(self.cuda, name)(*args))
        if rc != 0:
            raise RuntimeError(f"{name} failed: CUDA error {rc}")

    def _map(self) -> None:
        torch.cuda.synchronize()  # this thread has the primary context current
        handle = ctypes.c_uint64(0)
        self._check("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(self.size), ctypes.byref(self.prop),
                    ctypes.c_uint64(0))  # fmt: skip
        self._check("cuMemMap", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size), ctypes.c_size_t(0),
                    handle, ctypes.c_uint64(0))  # fmt: skip
        access = _AccessDesc(location=_Location(type=1, id=self.device), flags=3)
        self._check("cuMemSetAccess", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size),
                    ctypes.byref(access), ctypes.c_size_t(1))  # fmt: skip
        self.handle = handle.value

    def load(self) -> dict[str, torch.Tensor]:
        """Map and fill the range; the tensors (views at fixed addresses)."""
        self.reload()
        assert self.region is not None
        self.tensors = views(self.region, self.header)
        return self.tensors

    def release(self) -> None:
        """Give the physical memory back; the range (and every tensor's address) stays."""
        if self.handle is None:
            return
        torch.cuda.synchronize()
        self._check("cuMemUnmap", ctypes.c_uint64(self.ptr), ctypes.c_size_t(self.size))
        self._check("cuMemRelease", ctypes.c_uint64(self.handle))
        self.handle, self.filled = None, False

    def map(self) -> dict[str, float]:
        """Physical memory mapped again at the same range, its content undefined (not the weights)."""
        if self.handle is not None:
            return {"map_s": 0.0}
        t = time.monotonic()
        self._map()
        if self.region is None:
            self.region = torch.as_tensor(_CudaArray(self.ptr, self.nbytes), device=f"cuda:{self.device}")
        return {"map_s": round(time.monotonic() - t, 3)}

    def fill(self) -> dict[str, float]:
        """The file streamed into the mapped range; RuntimeError while it is not mapped."""
        if self.handle is None or self.region is None:
            raise RuntimeError("the weights' memory is not mapped: map() (wake_up?tags=weights) first")
        t = time.monotonic()
        seconds = stream_file(self.path, self.start, self.nbytes, self.region)
        torch.cuda.synchronize()
        self.filled = True
        return {
            "reload_s": round(time.monotonic() - t, 3),
            "stream_s": round(seconds, 3),
            "gb_s": round(self.nbytes / seconds / 1e9, 2),
        }

    def reload(self) -> dict[str, float]:
        """``map()`` then ``fill()``, unless the weights are already there."""
        if self.handle is not None and self.filled:
            return {"reload_s": 0.0}
        return {**self.map(), **self.fill()}
