import os

# The tests run in parallel (pytest.ini: one worker per core) and their models are tiny: one thread
# each, for the workers and the scripts they start, so OpenMP threads never spin waiting for cores
# another worker holds (that made steps 25-870 ms instead of ~10 ms). Set before torch is imported.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from helpers import prepare_tiny, tiny_config  # noqa: E402


@pytest.fixture
def tiny_data(tmp_path):
    """Tiny Shakespeare-like text prepared as dataset 'tiny' under tmp_path/data."""
    return prepare_tiny(tmp_path)


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """A TrainConfig for a tiny model that trains in a second or two on CPU."""
    return tiny_config(tiny_data, tmp_path / "out")


def pytest_collection_modifyitems(items):
    # the long subprocess tests first: the workers share them and the short tests fill in around them
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in this process, as in a terminal: a suite started in
    the background by a non-interactive shell inherits SIGINT ignored, where Python installs no handler."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
