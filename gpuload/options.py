"""Every keyword the public API takes, in one table, and where each one goes.

``load_sharded`` takes them all; ``Loader(...)`` takes the loader's own and
the settings (they shape its staging and threads, kept across loads);
``Loader.load`` and ``Loader.plan`` take the per-load ones (what to load,
how to cut it). Each entry point passes on everything it does not consume,
and :func:`split` checks every name against this table before any file is
opened, so a keyword can neither be dropped on the way nor fail late with an
internal message: an unknown one names itself, suggests the close match
("did you mean threads?") and says where a misplaced one belongs.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from gpuload.config import Config

#: What to load: caller sharding rules, the tensors to load, the tensors to
#: keep in host memory. Per load (``Loader.load``/``plan``, ``load_sharded``).
SELECTION = ("rules", "include", "cpu_resident")

#: How to cut tensors: the keyword arguments of :class:`gpuload.Sharder`
#: (its ``config`` and ``shapes`` come from the checkpoint). Per load.
SHARDING = (
    "num_heads",
    "num_kv_heads",
    "num_experts",
    "qkv_sections",
    "expert_parallel",
    "allow_uneven",
    "weight_block_size",
    "vision_tp",
)

#: Where the checkpoint is: endpoint and credentials of a remote one
#: (``s3://``, ``http(s)://``, ``hf://``; see :mod:`gpuload.read.remote`),
#: overriding the environment's. Per load.
SOURCE = ("storage_options",)

#: The keyword twins of the ``GPULOAD_*`` flags: the fields of
#: :class:`gpuload.Config`. Per loader (``Loader(...)``, ``load_sharded``).
SETTINGS = tuple(f.name for f in dataclasses.fields(Config) if f.repr)  # not the *_set marks

#: The loader's own keywords besides the settings.
LOADER = ("device", "framework", "reader_factory", "runtime")

#: Per-load keywords: what ``Loader.load`` and ``Loader.plan`` accept.
PER_LOAD = SELECTION + SHARDING + SOURCE

_WHERE = {
    **{k: "a selection option of Loader.load / Loader.plan / load_sharded" for k in SELECTION},
    **{k: "a sharding option of Loader.load / Loader.plan / load_sharded" for k in SHARDING},
    **{k: "a setting of Loader(...) / load_sharded (GPULOAD_* twin)" for k in SETTINGS},
    "storage_options": "a source option of Loader.load / Loader.plan / load_sharded",
    "device": "a keyword of Loader(...) / load_sharded",
    "framework": "a keyword of Loader(...) / load_sharded",
    "reader_factory": "a keyword of Loader(...)",
    "runtime": "a keyword of Loader(...)",
    "return_report": "a keyword of Loader.load / load_sharded",
    "group": "a keyword of Loader.load / load_sharded (a torch.distributed group)",
}


def check(kwargs: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Raise TypeError naming each keyword of ``kwargs`` that ``where`` does
    not take: the close match when it looks misspelled, else where it goes."""
    bad = [k for k in kwargs if k not in allowed]
    if not bad:
        return
    msgs = []
    for k in bad:
        if k in _WHERE:
            msgs.append(f"{k!r} is {_WHERE[k]}, not of {where}")
            continue
        close = difflib.get_close_matches(k, list(_WHERE), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r} ({_WHERE[close[0]]})?" if close else ""
        msgs.append(f"{where} got an unexpected keyword argument {k!r}{hint}")
    raise TypeError("; ".join(msgs))


def split(kwargs: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``load_sharded``'s keywords -> (settings for ``Loader``, per-load
    options for ``Loader.load``), after :func:`check`."""
    check(kwargs, SETTINGS + PER_LOAD, where)
    settings = {k: v for k, v in kwargs.items() if k in SETTINGS}
    per_load = {k: v for k, v in kwargs.items() if k in PER_LOAD}
    return settings, per_load


__all__ = ["LOADER", "PER_LOAD", "SELECTION", "SETTINGS", "SHARDING", "SOURCE", "check", "split"]
