"""Every ``GPULOAD_*`` environment flag, parsed and validated in one place.

No other module reads ``os.environ``. Each flag has a keyword twin on the
Python API (``load_sharded(..., prefetch=False)``); a keyword wins over the
environment. A bad value fails loudly, naming the flag and the value.

=========================  =========================  ==================================
flag                       values (default)           effect
=========================  =========================  ==================================
GPULOAD_PREFETCH           0 | 1 (1)                  read-ahead hints and speculative
                                                      reads of the next ranges; CPU cold
                                                      loads: results faulted in ahead
GPULOAD_PREFAULT           0 | 1 | auto (auto)        prefault CPU-resident tensors;
                                                      auto: only if they fit 80% of RAM
GPULOAD_BACKEND            auto | kvikio | posix      which reader fills the staging
GPULOAD_PIN                0 | 1 (1)                  pin host staging / resident tensors
GPULOAD_THREADS            int >= 1 (8)               reader threads (I/O-bound)
GPULOAD_STAGING_BYTES      size (256MiB)              pinned host staging budget
GPULOAD_CHUNK_BYTES        size (16MiB)               largest single read (the cap)
GPULOAD_MIN_CHUNK_BYTES    size (4MiB)                smallest piece a large range is
                                                      split into (the floor)
GPULOAD_DEVICE_SCRATCH_BYTES size (512MiB)            device scratch budget (GPU path)
GPULOAD_PROGRESS           0 | 1 | auto (auto)        tqdm bar for loads over a few secs
GPULOAD_SCATTER            0 | 1 (1)                  CPU: covering reads scatter rows
                                                      into results (preadv), no staging
GPULOAD_MAPPED_GATHER      0 | 1 (1)                  CPU: a covering read whose pages are
                                                      cached copies only the owned bytes
                                                      from them (process_vm_readv)
GPULOAD_COLD_THREADS       int >= 1 (16)              CPU: reader threads of a load whose
                                                      reads mostly miss the page cache
                                                      (mincore sample); at least THREADS
GPULOAD_COLD_CHUNK_BYTES   size (4MiB)                CPU: direct reads of such a load are
                                                      cut to this (more reads in flight)
GPULOAD_COLD_DIRECT        0 | 1 (1)                  CPU: such a cold load reads whole
                                                      tensors with O_DIRECT into its results
GPULOAD_HUGEPAGES          0 | 1 (1)                  CPU: results of 2 MiB and more in
                                                      transparent huge pages (madvise)
GPULOAD_GATHER             auto | device | zerocopy   how covering reads reach a GPU
                           | pack (auto)              (gpuload.plan.transfer); auto: cost model
GPULOAD_GATHER_MODEL       path | auto | 0 (auto)     GPU: the cost model's constants, a
                                                      JSON bench/gather.py writes; auto:
                                                      ~/.cache/gpuload/gather-model.json
                                                      when present; 0: built-in defaults
=========================  =========================  ==================================

Sizes accept a plain byte count or a suffix: ``K``/``KiB``, ``M``/``MiB``,
``G``/``GiB`` (powers of 1024). Nothing else: ``64MB`` is refused, since many
read MB as 10**6 bytes. Counts are whole numbers (``threads=2.7`` is refused,
not cut to 2). Booleans take ``0``/``1`` (and ``false``/``true``,
``no``/``yes``, ``off``/``on``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

MiB = 1 << 20
_GATHERS = ("auto", "device", "zerocopy", "pack")  # gpuload.plan.transfer.GATHERS and auto

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(ib)?)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30}


def parse_size(name: str, value: str | int) -> int:
    """Parse a byte size such as ``"64MiB"``, ``"64M"`` or ``4194304``; fail naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} has to be a size in bytes, got {value!r}")
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(
                f"{name} has to be a byte count or a K/M/G size (KiB/MiB/GiB, powers of 1024) "
                f"like 67108864, 64M or 64MiB, got {value!r}"
            )
        n = int(m.group(1)) << _SIZE_SHIFT[m.group(2) and m.group(2).lower()]
    else:
        try:
            n = operator.index(value)  # ints of any integral type, not 64.5
        except TypeError:
            raise ValueError(f"{name} has to be a whole number of bytes, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} has to be a positive size in bytes, got {value!r}")
    return n


def parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} has to be 0 or 1, got {value!r}")


def parse_tristate(name: str, value: str | bool) -> bool | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(name, value)
    except ValueError:
        raise ValueError(f"{name} has to be 0, 1 or auto, got {value!r}") from None


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    v = str(value).strip().lower()
    if v not in choices:
        raise ValueError(f"{name} has to be one of {'|'.join(choices)}, got {value!r}")
    return v


def parse_positive_int(name: str, value: str | int) -> int:
    n = 0
    if isinstance(value, str):
        n = int(value) if value.strip().isdigit() else 0
    elif not isinstance(value, bool):
        try:
            n = operator.index(value)  # 2.7 is refused, not cut to 2
        except TypeError:
            n = 0
    if n <= 0:
        raise ValueError(f"{name} has to be a positive integer, got {value!r}")
    return n


def _default_threads() -> int:
    # Reader threads wait on I/O, not on a core: 8 keep enough reads in flight
    # to stream a cold file (measured on a 2-core VM: 1.30 GiB/s with 2
    # threads, 1.81 with 8, fio 2.09) and to saturate PCIe from a warm page
    # cache (PRIOR_ART: KvikIO's 1 thread does not).
    return 8


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved settings for one load. Build with :func:`get` / :meth:`replace`."""

    prefetch: bool = True
    prefault: bool | Literal["auto"] = "auto"
    backend: Literal["auto", "kvikio", "posix"] = "auto"
    pin: bool = True
    threads: int = dataclasses.field(default_factory=_default_threads)
    staging_bytes: int = 256 * MiB
    # 16 MiB, not 64: a long tensor becomes enough reads to keep every
    # thread busy on a cold file (64 MiB reads gave 1.40 GiB/s with 8
    # threads, 16 MiB 1.81), while staying above the 4 MiB floor.
    chunk_bytes: int = 16 * MiB
    min_chunk_bytes: int = 4 * MiB
    device_scratch_bytes: int = 512 * MiB
    progress: bool | Literal["auto"] = "auto"
    # GPU loads: how a covering read's segments reach the device. "auto" lets
    # gpuload.plan.transfer.GatherModel choose per tensor; forcing one is for
    # tests, benchmarks and machines where the model's constants are off.
    gather: Literal["auto", "device", "zerocopy", "pack"] = "auto"
    # GPU loads: where the gather cost model's constants come from (a JSON
    # that bench/gather.py measures and writes on a real GPU). "auto": the
    # per-user cache file when present, built-in defaults otherwise; "0": the
    # built-in defaults always.
    gather_model: str = "auto"
    # CPU loads: read a covering block with one preadv that puts each owned
    # row straight into its result and the gaps into a small discard buffer,
    # instead of staging + gather. On a quiet 2-core VM with one reader per
    # core it was 1.05-1.19x faster at worlds 2, 4 and 8 (medians of per-pair
    # ratios, three alternated runs: bench/warm_ab.py --variant scatter=0,
    # bench/results/2026-12-06-cpu-warm).
    scatter: bool = True
    # CPU loads: a covering read whose pages are all in the page cache is
    # not read; only its owned bytes are copied out of the cache with
    # process_vm_readv (a syscall, so a file truncated under it is EFAULT,
    # never SIGBUS). Cold ranges keep the planned covering read.
    mapped_gather: bool = True
    # CPU loads: results of >= 2 MiB in memory advised MADV_HUGEPAGE.
    hugepages: bool = True
    # CPU loads whose reads mostly miss the page cache (a mincore sample of
    # the plan): more reads in flight. A cold disk wants a deeper queue than
    # a warm cache wants threads (issue 24: 8 threads x 16 MiB reads gave
    # 0.72-1.14 GiB/s cold, 16 x 4 MiB 1.60-1.94).
    cold_threads: int = 16
    cold_chunk_bytes: int = 4 * MiB
    # ... and reads whole-tensor runs with O_DIRECT straight into gpuload's
    # own (huge-page) result mappings: no page-cache insert, no copy out of it.
    cold_direct: bool = True
    # Whether min_chunk_bytes was set (a keyword or GPULOAD_MIN_CHUNK_BYTES):
    # the 4 MiB default is clamped to a smaller chunk_bytes, a chosen floor
    # above the cap is refused.
    min_chunk_set: bool = dataclasses.field(default=False, repr=False, compare=False)
    # Whether threads was set (a keyword or GPULOAD_THREADS): a default
    # threads is capped to the usable cores for a warm CPU load, whose reads
    # are copies that each keep a core busy; a chosen one stands.
    threads_set: bool = dataclasses.field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validate at construction (keywords arrive here unparsed), so a bad
        # Config cannot exist.
        set_ = object.__setattr__
        set_(self, "prefetch", parse_bool("prefetch", self.prefetch))
        set_(self, "prefault", parse_tristate("prefault", self.prefault))
        set_(self, "backend", parse_choice("backend", self.backend, ("auto", "kvikio", "posix")))
        set_(self, "pin", parse_bool("pin", self.pin))
        set_(self, "threads", parse_positive_int("threads", self.threads))
        for f in ("staging_bytes", "chunk_bytes", "min_chunk_bytes", "device_scratch_bytes"):
            set_(self, f, parse_size(f, getattr(self, f)))
        set_(self, "progress", parse_tristate("progress", self.progress))
        set_(self, "gather", parse_choice("gather", self.gather, _GATHERS))
        if not isinstance(self.gather_model, str) or not self.gather_model.strip():
            raise ValueError(f"gather_model has to be a path, auto or 0, got {self.gather_model!r}")
        set_(self, "scatter", parse_bool("scatter", self.scatter))
        set_(self, "mapped_gather", parse_bool("mapped_gather", self.mapped_gather))
        set_(self, "hugepages", parse_bool("hugepages", self.hugepages))
        set_(self, "cold_threads", parse_positive_int("cold_threads", self.cold_threads))
        set_(self, "cold_chunk_bytes", parse_size("cold_chunk_bytes", self.cold_chunk_bytes))
        set_(self, "cold_direct", parse_bool("cold_direct", self.cold_direct))
        # The default floor above chunk_bytes is not an error: the planner
        # clamps it to the cap, so setting only a small cap just works. A
        # floor the caller chose is theirs: one above the cap is refused.
        if self.min_chunk_set and self.min_chunk_bytes > self.chunk_bytes:
            raise ValueError(
                f"min_chunk_bytes={self.min_chunk_bytes} exceeds chunk_bytes={self.chunk_bytes}: "
                "the floor of a split read cannot be above its cap"
            )

    def replace(self, **overrides: Any) -> Config:
        """A copy with keyword twins applied; ``None`` means "keep"."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self) if f.repr}
        if unknown:
            raise TypeError(f"unknown gpuload setting(s): {', '.join(sorted(unknown))}")
        kept = {k: v for k, v in overrides.items() if v is not None}
        if "min_chunk_bytes" in kept:
            kept["min_chunk_set"] = True
        if "threads" in kept:
            kept["threads_set"] = True
        return dataclasses.replace(self, **kept) if kept else self


# flag name -> Config field
_FLAGS = {
    "GPULOAD_PREFETCH": "prefetch",
    "GPULOAD_PREFAULT": "prefault",
    "GPULOAD_BACKEND": "backend",
    "GPULOAD_PIN": "pin",
    "GPULOAD_THREADS": "threads",
    "GPULOAD_STAGING_BYTES": "staging_bytes",
    "GPULOAD_CHUNK_BYTES": "chunk_bytes",
    "GPULOAD_MIN_CHUNK_BYTES": "min_chunk_bytes",
    "GPULOAD_DEVICE_SCRATCH_BYTES": "device_scratch_bytes",
    "GPULOAD_PROGRESS": "progress",
    "GPULOAD_GATHER": "gather",
    "GPULOAD_GATHER_MODEL": "gather_model",
    "GPULOAD_SCATTER": "scatter",
    "GPULOAD_MAPPED_GATHER": "mapped_gather",
    "GPULOAD_HUGEPAGES": "hugepages",
    "GPULOAD_COLD_THREADS": "cold_threads",
    "GPULOAD_COLD_CHUNK_BYTES": "cold_chunk_bytes",
    "GPULOAD_COLD_DIRECT": "cold_direct",
}


def from_env(environ: Mapping[str, str] | None = None) -> Config:
    """Parse every ``GPULOAD_*`` flag; an unknown ``GPULOAD_*`` name is an error
    too, since a typo would otherwise be silently ignored."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith("GPULOAD_"):
            continue
        if key not in _FLAGS:
            raise ValueError(f"unknown environment flag {key}; known: {', '.join(_FLAGS)}")
        try:
            values[_FLAGS[key]] = raw
            Config(**{_FLAGS[key]: raw})
        except ValueError as e:
            raise ValueError(f"{key}={raw!r}: {e}") from None
    values["min_chunk_set"] = "min_chunk_bytes" in values
    values["threads_set"] = "threads" in values
    return Config(**values)


_current: Config | None = None


def get() -> Config:
    """The process-wide defaults, parsed from the environment once."""
    global _current
    if _current is None:
        _current = from_env()
    return _current


def reload() -> Config:
    """Re-read the environment (after a test changed it)."""
    global _current
    _current = None
    return get()


@contextlib.contextmanager
def override(**settings: Any) -> Iterator[Config]:
    """Temporarily change the process defaults: ``with config.override(threads=2):``."""
    global _current
    old = get()
    _current = old.replace(**settings)
    try:
        yield _current
    finally:
        _current = old


# Remote checkpoints (gpuload.read.remote): the standard variables of the AWS
# SDKs and of huggingface_hub, read here like every other variable, so a
# test can point a load at a local server. ``storage_options=`` overrides
# them key by key.
_REMOTE_ENV = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "allow_http": ("AWS_ALLOW_HTTP",),
    "hf_endpoint": ("HF_ENDPOINT",),
    "hf_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
}


def remote_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The remote storage settings the environment gives (unset ones absent):
    endpoint and credentials from ``AWS_*``, the Hub's from ``HF_*``."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, names in _REMOTE_ENV.items():
        for name in names:
            if env.get(name):
                out[key] = env[name]
                break
    return out
