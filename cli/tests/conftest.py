"""Fixtures shared by the CLI tests."""
import pytest
from tinymodel import save_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer, saved once as a local model folder
    (``--model`` accepts it; offline)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))
