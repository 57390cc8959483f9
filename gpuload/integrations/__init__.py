"""Serving-engine integrations: each one is imported only by its engine.

``gpuload.integrations.vllm`` is vLLM's ``load_format="gpuload"``, registered
through the ``vllm.general_plugins`` entry point; ``import gpuload`` never
imports it (nor vLLM).
"""
