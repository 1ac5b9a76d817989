import contextlib
import random
import subprocess
import sys

import pytest
import torch

from mxfp8_moe import clear_memos


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


@pytest.fixture
def fresh_memos():
    """The host's memos (validation verdicts, kernel choices, launch arguments, tensor maps) start
    empty, and what the test put there is forgotten after it."""
    clear_memos()
    yield
    clear_memos()


@pytest.fixture
def foreign_lock():
    """`with foreign_lock(path):` another process holds the file lock on `path` until the block
    ends (then it is killed, as a crashed holder would be)."""
    @contextlib.contextmanager
    def hold(path):
        holder = subprocess.Popen(
            [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); "
             "lock.acquire(); print('locked', flush=True); time.sleep(60)", str(path)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            yield
        finally:
            holder.kill()
            holder.wait()

    return hold
