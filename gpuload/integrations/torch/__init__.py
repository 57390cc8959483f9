"""What :mod:`gpuload.torch` exposes: loading into DTensor and plain
modules (:mod:`~gpuload.integrations.torch.dtensor`), the local box of a
DTensor placement (:mod:`~gpuload.integrations.torch.boxes`), and fused
parameters (:mod:`~gpuload.integrations.torch.fused`). Import through
``gpuload.torch``; nothing here imports torch at import time.
"""
