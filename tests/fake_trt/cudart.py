"""A strict stand-in for ``cuda.bindings.runtime`` (cuda-python), host memory playing device memory.

What it enforces, as a real CUDA runtime does (or worse, so that a bug shows):
- every call returns ``(cudaError_t, *values)`` with the real enum values (tests/data/trt_symbols.json);
  only names the real module has exist here (construction checks it);
- ``cudaMemcpyAsync`` and work enqueued by TensorRT (``_enqueue``) run only at
  ``cudaStreamSynchronize`` of their stream (or an implicit sync: cudaFree*, cudaStreamDestroy);
- the destination of a device->host copy holds garbage (0xFF bytes: NaN for float) until that
  sync, so a host buffer read too early gives NaN, which the tests see;
- a host buffer written while a copy from it is pending, or one written while a copy into it
  is pending, is a race: the sync raises ``AssertionError``;
- device memory starts as garbage (cudaMalloc does not clear); copies and kernels are
  bounds-checked against the allocation they touch (cudaErrorInvalidValue / AssertionError);
- a host pointer passed to a copy must be pinned (cudaMallocHost), a device pointer must be
  from cudaMalloc, and the copy kind must match them.
"""
from __future__ import annotations

import ctypes
import types

from . import symbols

GARBAGE = 0xFF


class cudaStream_t:
    """Like cuda-python's handle type: ``int(s)`` / ``s.getPtr()`` give the raw handle."""

    def __init__(self, handle: int):
        self._h = int(handle)

    def __int__(self):
        return self._h

    def getPtr(self):
        return self._h

    def __repr__(self):
        return f"<cudaStream_t 0x{self._h:x}>"


class cudaDeviceProp:
    def __init__(self, name: bytes, major: int, minor: int):
        self.name, self.major, self.minor = name, major, minor


class FakeCudart(types.ModuleType):
    def __init__(self, version: str = "13.5.0", *, count: int = 1, count_err: str = "cudaSuccess",
                 gpu: str = "NVIDIA H100 80GB HBM3", cc=(9, 0)):
        super().__init__("cuda.bindings.runtime")
        real = symbols.cuda(version)
        self.real_names = set(real["runtime"])
        self.cudaError_t = symbols.make_enum("cudaError_t", real["enums"]["cudaError_t"])
        self.cudaMemcpyKind = symbols.make_enum("cudaMemcpyKind", real["enums"]["cudaMemcpyKind"])
        self.cudaStream_t = cudaStream_t
        self.version = version
        self.count, self.count_err = count, self.cudaError_t[count_err]
        self.gpu, self.cc = gpu, cc
        self.device: dict[int, ctypes.Array] = {}   # ptr -> buffer
        self.pinned: dict[int, ctypes.Array] = {}
        self.streams: dict[int, list] = {}           # handle -> pending ops
        self.calls: list[tuple] = []
        self.fail_malloc = False
        self._next_stream = 0x5000
        fake_names = {n for n in dir(self) if n.startswith("cuda")}
        unknown = fake_names - self.real_names
        assert not unknown, f"fake cudart offers names cuda-bindings {version} lacks: {sorted(unknown)}"

    # -- helpers -------------------------------------------------------------------------------
    def _e(self, name="cudaSuccess"):
        return self.cudaError_t[name]

    @staticmethod
    def _find(table, ptr: int, n: int):
        for a, b in table.items():
            if a <= ptr and ptr + n <= a + len(b):
                return a
        return None

    def _stream(self, s) -> int | None:
        h = int(s)
        return h if h in self.streams else None

    def _run(self, handle: int) -> None:
        ops, self.streams[handle] = self.streams[handle], []
        for op in ops:
            op()

    def _run_all(self) -> None:
        for h in list(self.streams):
            self._run(h)

    def _enqueue(self, stream_handle: int, op, what: str) -> None:
        """For the fake TensorRT: run ``op`` when the stream is synchronized."""
        assert stream_handle in self.streams, f"{what} enqueued on unknown stream {stream_handle:#x}"
        self.streams[stream_handle].append(op)
        self.calls.append(("enqueue", what))

    def device_view(self, ptr: int, n: int) -> memoryview:
        """The device bytes [ptr, ptr+n) (for the fake TensorRT's kernels); AssertionError if out of bounds."""
        base = self._find(self.device, ptr, n)
        assert base is not None, f"kernel access of {n} bytes at {ptr:#x} is outside every device allocation"
        return memoryview(self.device[base]).cast("B")[ptr - base: ptr - base + n]

    def pending(self) -> int:
        return sum(len(v) for v in self.streams.values())

    # -- API -----------------------------------------------------------------------------------
    def cudaGetErrorString(self, err):
        return (self._e(), f"{self.cudaError_t(int(err)).name} (fake)".encode())

    def cudaGetDeviceCount(self):
        if self.count_err != 0:
            return (self.count_err, None)  # what cuda-bindings returns without a driver (see trt_symbols.json)
        return (self._e(), self.count)

    def cudaGetDeviceProperties(self, dev):
        if self.count_err != 0:
            return (self.count_err, None)
        if not 0 <= int(dev) < self.count:
            return (self._e("cudaErrorInvalidDevice"), None)
        return (self._e(), cudaDeviceProp(self.gpu.encode() + b"\0" * 8, *self.cc))

    def cudaStreamCreate(self):
        self._next_stream += 0x10
        self.streams[self._next_stream] = []
        self.calls.append(("cudaStreamCreate", self._next_stream))
        return (self._e(), cudaStream_t(self._next_stream))

    def cudaStreamDestroy(self, s):
        h = self._stream(s)
        if h is None:
            return (self._e("cudaErrorInvalidResourceHandle"),)
        self._run(h)  # pending work still completes
        del self.streams[h]
        return (self._e(),)

    def cudaStreamSynchronize(self, s):
        h = self._stream(s)
        self.calls.append(("cudaStreamSynchronize", h))
        if h is None:
            return (self._e("cudaErrorInvalidResourceHandle"),)
        self._run(h)
        return (self._e(),)

    def _alloc(self, table, n, what):
        self.calls.append((what, int(n)))
        if self.fail_malloc:
            return (self._e("cudaErrorMemoryAllocation"), None)
        buf = (ctypes.c_ubyte * max(1, int(n)))()
        ctypes.memset(buf, GARBAGE, len(buf))  # uninitialised
        table[ctypes.addressof(buf)] = buf
        return (self._e(), ctypes.addressof(buf))

    def cudaMalloc(self, n):
        return self._alloc(self.device, n, "cudaMalloc")

    def cudaMallocHost(self, n):
        return self._alloc(self.pinned, n, "cudaMallocHost")

    def cudaFree(self, p):
        self._run_all()  # cudaFree synchronizes implicitly
        if self.device.pop(int(p), None) is None:
            return (self._e("cudaErrorInvalidValue"),)
        return (self._e(),)

    def cudaFreeHost(self, p):
        self._run_all()
        if self.pinned.pop(int(p), None) is None:
            return (self._e("cudaErrorInvalidValue"),)
        return (self._e(),)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        dst, src, n = int(dst), int(src), int(count)
        h = self._stream(stream)
        if h is None:
            return (self._e("cudaErrorInvalidResourceHandle"),)
        K = self.cudaMemcpyKind
        if kind == K.cudaMemcpyHostToDevice:
            dst_t, src_t = self.device, self.pinned
        elif kind == K.cudaMemcpyDeviceToHost:
            dst_t, src_t = self.pinned, self.device
        else:
            return (self._e("cudaErrorInvalidMemcpyDirection"),)
        if self._find(dst_t, dst, n) is None or self._find(src_t, src, n) is None:
            return (self._e("cudaErrorInvalidValue"),)
        self.calls.append(("cudaMemcpyAsync", K(int(kind)).name, n))
        if kind == K.cudaMemcpyHostToDevice:
            snap = ctypes.string_at(src, n)

            def op():
                assert ctypes.string_at(src, n) == snap, \
                    "race: a pinned host buffer was written while a host->device copy from it was pending"
                ctypes.memmove(dst, src, n)
        else:
            ctypes.memset(dst, GARBAGE, n)  # undefined until the copy completes
            poison = bytes([GARBAGE]) * n

            def op():
                assert ctypes.string_at(dst, n) == poison, \
                    "race: a pinned host buffer was written while a device->host copy into it was pending"
                ctypes.memmove(dst, src, n)
        self.streams[h].append(op)
        return (self._e(),)


def install(monkeypatch, cudart: FakeCudart | None) -> None:
    """Make ``from cuda.bindings import runtime`` give ``cudart`` (None: cuda-python absent)."""
    import sys

    if cudart is None:
        for m in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
            monkeypatch.setitem(sys.modules, m, None)
        return
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
