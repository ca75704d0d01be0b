import pytest

from helpers import prepare_tiny, tiny_config


@pytest.fixture
def tiny_data(tmp_path):
    """Tiny Shakespeare-like text prepared as dataset 'tiny' under tmp_path/data."""
    return prepare_tiny(tmp_path)


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """A TrainConfig for a tiny model that trains in a second or two on CPU."""
    return tiny_config(tiny_data, tmp_path / "out")
