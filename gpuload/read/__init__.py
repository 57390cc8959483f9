"""Stage 4, reading: the bytes of a plan's reads into host or device memory.

One reader per source: :mod:`~gpuload.read.posix` (pread thread pool, and
the O_DIRECT cold engine), :mod:`~gpuload.read.kvikio` (GDS or its compat
mode), :mod:`~gpuload.read.remote` (ranged GETs from S3, HTTP and the Hub).
:mod:`~gpuload.read.faults` wraps any of them with injected faults;
:mod:`~gpuload.read.vectored` holds the ctypes syscalls (preadv) they share.
"""
