"""The examples under torchrun (gloo, 127.0.0.1), against transformers' generate.

Each case launches ranks that load their shards with gpuload and run a model
built from them; the token ids rank 0 prints must equal the ids transformers
picks greedily from the same checkpoint. This proves the shards are the ones
a real tensor-parallel (or FSDP2) model needs, by running the model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
from tiny_models import NEW_TOKENS, PROMPT, reference, torchrun, write_model  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")

_MODELS: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """family -> (checkpoint dir, transformers' ids), written once a session."""

    def get(family: str):
        if family not in _MODELS:
            where = write_model(family, tmp_path_factory.mktemp(family))
            _MODELS[family] = (where, reference(where))
        return _MODELS[family]

    return get


ARGS = ("--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS))


# Every family at world 2; at world 4 Llama (2 kv heads: each replicated on
# two ranks; rank 3 holds none of the 130-row vocabulary) and Mistral
# (4 kv heads, tied embeddings).
@pytest.mark.parametrize(
    ("family", "world"),
    [(f, 2) for f in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3")]
    + [("llama", 4), ("mistral", 4)],
)
def test_tp_generate_matches_transformers(model, family, world):
    where, expected = model(family)
    assert len(expected) == NEW_TOKENS
    assert torchrun("tp_generate.py", world, str(where), *ARGS) == expected


# FSDP2: the transformers model on meta, fully_shard per layer and root,
# filled by gpuload.torch.load_into (tied embeddings: test_torch_load_into.py).
@pytest.mark.parametrize("family", ["llama"])
def test_fsdp2_generate_matches_transformers(model, family):
    where, expected = model(family)
    assert torchrun("fsdp2_generate.py", 2, str(where), *ARGS) == expected
