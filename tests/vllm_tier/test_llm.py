"""``LLM(load_format="gpuload")`` gives vLLM's default loader's greedy ids.

The five families of :mod:`models`, at TP=1 and TP=2, each loaded by vLLM's
default loader and by gpuload in the same run of ``generate.py`` (one
process a TP size: vLLM's start-up dominates the tier's cost). Each rank
logs what it read; the TP=2 ranks must have read well under the files.
"""

from __future__ import annotations

import pytest
from models import FAMILIES
from tier import IN_PLACE, REPORT

# One generate.py run a TP size starts ten engines (several minutes on two
# shared cores); the first test to need it pays for it.
pytestmark = pytest.mark.timeout(1500)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_ids_equal_default_loader(runs, models, family, tp):
    ids, _ = runs(tp)
    want = ids["auto"][str(models[family])]
    got = ids["gpuload"][str(models[family])]
    assert len(want) == 8
    assert got == want, (family, tp)


@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_reads_its_shard(runs, tp):
    """One report line a rank and a family; at TP=2 each rank's shard is
    about half the files and it reads well under them (column shards of
    these tiny tensors are read by covering ranges: read >= shard)."""
    _, log = runs(tp)
    reports = [tuple(map(int, m.groups())) for m in REPORT.finditer(log)]
    extra = 1 if tp == 2 else 0  # the swapped llama
    assert len(reports) == tp * (len(FAMILIES) + extra), log[-4000:]
    for rank, world, read, file_bytes, shard in reports:
        assert world == tp and 0 <= rank < tp
        if tp == 1:
            assert read == shard == file_bytes
        else:
            assert shard <= read < 0.75 * file_bytes, (rank, read, shard, file_bytes)
            assert shard < 0.6 * file_bytes, (rank, shard, file_bytes)
    # On the CPU every shard of these families lands straight in its
    # parameter (or a contiguous section of it): nothing is copied.
    places = [tuple(map(int, m.groups())) for m in IN_PLACE.finditer(log)]
    assert len(places) == len(reports)
    assert all(in_place == shard and copied == 0 for shard, in_place, copied in places), places
    if tp == 2:
        # Engines run one after another: each pair of lines is one load.
        for i in range(0, len(reports), 2):
            file_bytes = reports[i][3]
            shards = [r[4] for r in reports[i : i + 2]]
            assert {r[0] for r in reports[i : i + 2]} == {0, 1}
            # Everything is delivered once, the replicated tensors twice.
            assert file_bytes <= sum(shards) < 1.1 * file_bytes, (file_bytes, shards)


def test_a_wrong_shard_is_caught(runs, models):
    """Each TP=2 rank holding the other's k_proj (kv head) changes the ids:
    the comparison above would catch a plug-in that cut k_proj wrong."""
    ids, _ = runs(2)
    wrong = ids["gpuload"][str(models["llama-swapped"])]
    assert wrong != ids["auto"][str(models["llama"])]
