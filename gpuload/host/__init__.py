"""Stage 5 on the CPU: the host backend and pipeline, CPU-resident tensors,
and the conversion of results to numpy, torch or cupy.

``device="cpu"`` is a product path, not a mock: the same plan and readers as
the GPU path, with numpy buffers and the numpy twin of the gather kernel.
"""
