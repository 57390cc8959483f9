"""Write a tiny random Llama with transformers, to try the examples on.

    python examples/tiny_model.py DIR [--family llama|qwen2|mistral]

The checkpoint is what ``save_pretrained`` writes for a real model, only
small: several ``.safetensors`` files, ``model.safetensors.index.json`` and
``config.json`` (hidden 64, 4 heads of 16 with 2 kv heads, 2 layers, a
vocabulary of 130). Weights are random (seed 0), so generations are
meaningless but exactly reproducible.
"""

from __future__ import annotations

import argparse

FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = p.parse_args()

    import torch
    import transformers

    config = getattr(transformers, FAMILIES[args.family])(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=130,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.dir, max_shard_size="40KB")  # several files and an index
    print(args.dir)


if __name__ == "__main__":
    main()
