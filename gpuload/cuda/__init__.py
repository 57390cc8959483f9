"""Stage 5 on a GPU: device resolution, the cupy backend, the device
pipeline (pinned staging, streams, H2D, gather kernels) and the per-process
cache of warmed runtimes. cupy and numba-cuda are imported only when a GPU
load starts: ``import gpuload`` works without them.
"""
