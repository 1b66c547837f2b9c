import pytest

import lora_lite.plugins as plugins
from lora_lite.testing import make_batch, tiny_llama


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def only_plugins(monkeypatch):
    """only_plugins("a,b"): load just those plugin distributions (LORA_LITE_PLUGINS), then restore."""
    def limit(value):
        monkeypatch.setenv(plugins.ALLOW_ENV, value)
        plugins.reset()
    yield limit
    monkeypatch.undo()
    plugins.reset()
