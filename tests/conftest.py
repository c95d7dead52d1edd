import numpy as np
import pytest

PROMPTS = [
    ("What is the capital of France?", True),
    ("The key/value cache of a transformer stores", False),
    ("Write a haiku about memory.", True),
]


@pytest.fixture(scope="session")
def model():
    from kvlib.model import load_model

    return load_model(progress=False)


@pytest.fixture(scope="session")
def prompt_ids(model):
    """Token ids of a few real prompts, chat and plain, of different lengths."""
    return [model.encode(text, chat=chat) for text, chat in PROMPTS]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
