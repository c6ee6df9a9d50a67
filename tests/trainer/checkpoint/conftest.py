"""Fixtures of the checkpoint tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    """A gloo group of 1 in the test process, for the tests that build a PartialFC here."""
    store = torch.distributed.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
