"""Stage 2, sharding: which part of each tensor a tensor-parallel rank owns.

Rule tables (:mod:`~gpuload.sharding.rules`, :mod:`~gpuload.sharding.rules_vision`)
map tensor names to specs such as ``Split(1)`` or ``Heads(...)``; a
:class:`Sharder` applies them and returns a
:class:`~gpuload.sharding.selection.Selection` per tensor, as vLLM shards it.
Quantization scales and packed weights follow their weight
(:mod:`~gpuload.sharding.scales`, :mod:`~gpuload.sharding.quant`), and
:mod:`~gpuload.sharding.verify` is the independent oracle the tests and
``gpuload demo`` check loaded bytes against.

The specs are documented as ``gpuload.sharding.Split`` and so on: they are
re-exported here.
"""

from gpuload.sharding.cuts import expert_block
from gpuload.sharding.rules import (
    MODEL_TYPES,
    RULE_TABLES,
    ConfigSections,
    Expert,
    FirstRank,
    FusedQKV,
    Heads,
    Intermediate,
    Replicate,
    Spec,
    Split,
    Vocab,
)
from gpuload.sharding.sharder import Sharder

__all__ = [
    "MODEL_TYPES",
    "RULE_TABLES",
    "ConfigSections",
    "Expert",
    "FirstRank",
    "FusedQKV",
    "Heads",
    "Intermediate",
    "Replicate",
    "Sharder",
    "Spec",
    "Split",
    "Vocab",
    "expert_block",
]
