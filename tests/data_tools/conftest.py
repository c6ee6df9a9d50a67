"""Fixtures shared by the data_tools tests."""

from pathlib import Path

import pytest

from tests.data_tools import mxnet_env


@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """A python with real mxnet 1.9.1 (its venv is built on first use, ~1 min)."""
    try:
        return mxnet_env.mxnet_python()
    except mxnet_env.RegistryUnreachable as err:
        pytest.skip(f"cannot install mxnet for the compatibility tests, {str(err).splitlines()[0]}")
