"""Stage 3, the plan: which byte ranges each tensor's shard needs, as reads.

Pure: a :class:`~gpuload.sharding.selection.Selection` per tensor in,
frozen :class:`~gpuload.plan.ops.ReadOp` s out (tensor-aligned,
coalesced, sized for the disk), and how a covering read's bytes reach a GPU
(:mod:`gpuload.plan.transfer`). No I/O and no CUDA import.
"""
