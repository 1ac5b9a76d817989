import random

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Fresh data every run; the seed is printed, so pytest shows it with any failure."""
    value = random.randrange(2**31)
    print(f"seed = {value}")
    torch.manual_seed(value)
    random.seed(value)
    return value
