#!/usr/bin/env python3
"""Run a benchmark script with AMX denied to the process, so ONNX Runtime's MLAS falls back to AVX-512 VNNI.

ONNX Runtime has no session option to turn AMX off (its MLAS options cover KleidiAI on ARM only). MLAS picks
its AMX U8S8 GEMM only when Linux grants the process the AMX tile state: ``MlasInitAMX`` in
onnxruntime/core/mlas/lib/platform.cpp calls ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` and
keeps the AVX-512 VNNI kernels when that fails. This wrapper installs a seccomp filter that makes exactly
that request fail with EPERM (everything else is allowed), checks that it does, then runs the script:

    python benchmarks/no_amx.py benchmarks/bench_int8.py --suffix x86-amx-denied ...

Linux x86-64 only; the filter lasts for the process and its children.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import runpy
import sys

SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


LIBC = ctypes.CDLL(None, use_errno=True)


def amx_permitted() -> bool:
    """Whether this process holds the AMX tile-data permission now (ARCH_GET_XCOMP_PERM)."""
    mask = ctypes.c_uint64(0)
    if LIBC.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False
    return bool(mask.value & (1 << XFEATURE_XTILEDATA))


def deny_amx() -> None:
    """Make arch_prctl(ARCH_REQ_XCOMP_PERM, ...) fail with EPERM for this process; raise if it still succeeds."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise SystemExit("no_amx.py: Linux x86-64 only")
    if amx_permitted():
        raise SystemExit("no_amx.py: AMX was already granted to this process; run the script through this wrapper")
    prog = [  # seccomp_data: nr at 0, arch at 4, args[0] (low 32 bits) at 16
        SockFilter(LD_W_ABS, 0, 0, 4), SockFilter(JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
        SockFilter(LD_W_ABS, 0, 0, 0), SockFilter(JEQ_K, 0, 3, SYS_ARCH_PRCTL),
        SockFilter(LD_W_ABS, 0, 0, 16), SockFilter(JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        SockFilter(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM), SockFilter(RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    arr = (SockFilter * len(prog))(*prog)
    fprog = SockFprog(len(prog), arr)
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise SystemExit(f"no_amx.py: seccomp filter refused: {os.strerror(ctypes.get_errno())}")
    rc = LIBC.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    if rc == 0 or ctypes.get_errno() != errno.EPERM or amx_permitted():
        raise SystemExit("no_amx.py: AMX permission request still succeeds; the filter did not take")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    deny_amx()
    os.environ["DARKCONV_AMX_DENIED"] = "1"  # recorded by the benchmark
    print("no_amx.py: AMX tile permission denied to this process (seccomp); MLAS keeps its AVX-512 VNNI kernels",
          file=sys.stderr, flush=True)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
