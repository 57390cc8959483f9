"""Stage 1, the checkpoint format: safetensors headers, dtypes and the index.

Parses and validates what is on disk (or behind a URL) into a
:class:`~gpuload.format.checkpoint.Checkpoint`: every tensor's name, dtype,
shape and byte range. Nothing here knows about ranks, plans or devices.
"""
