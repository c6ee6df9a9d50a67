"""Creates (once) and caches the virtual environment with real MXNet that the
compatibility tests run their reference scripts in.

MXNet 1.9.1 needs numpy < 1.24, which the main environment cannot have, so it lives in
its own venv at ``<repo>/.venv-mxnet``, made from the same base interpreter as the
venv running the tests. ``python -m tests.data_tools.mxnet_env`` builds it and prints
its python.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

VENV_DIR = Path(__file__).resolve().parents[2] / ".venv-mxnet"
PACKAGES = ("mxnet==1.9.1", "numpy==1.23.5")
# Fragments of pip's output that mean the package registry could not be reached.
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "NameResolutionError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
)
_IMPORT_CHECK = "import mxnet; assert mxnet.__version__ == '1.9.1', mxnet.__version__"
_LOCK_NAME = ".create.lock"
log = logging.getLogger(__name__)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry to install MXNet."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _has_mxnet(venv: Path) -> bool:
    return _python(venv).exists() and subprocess.run(
        [_python(venv), "-c", _IMPORT_CHECK], capture_output=True
    ).returncode == 0


def _run(cmd: list[str | Path], env: dict[str, str] | None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    what = f"`{' '.join(map(str, cmd))}` failed (exit {proc.returncode})"
    if any(marker in output for marker in _NETWORK_ERRORS):
        raise RegistryUnreachable(f"{what}: the package registry is unreachable\n{output[-2000:]}")
    raise RuntimeError(f"{what}:\n{output[-4000:]}")


def create_venv(venv: Path, env: dict[str, str] | None = None) -> None:
    """Make a venv at ``venv`` with :data:`PACKAGES` installed, replacing what is there.

    Raises :class:`RegistryUnreachable` when pip cannot reach the registry and
    ``RuntimeError`` for any other failure.
    """
    if venv.exists():
        for child in venv.iterdir():
            if child.name == _LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    _run([sys._base_executable, "-m", "venv", venv], env)
    _run([_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
          *PACKAGES], env)


def mxnet_python() -> Path:
    """Path of a python that imports mxnet 1.9.1, creating :data:`VENV_DIR` on first use.

    Concurrent callers (several test runs in one checkout) wait on a lock file, so the
    venv is built once.
    """
    VENV_DIR.mkdir(exist_ok=True)
    with open(VENV_DIR / _LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _has_mxnet(VENV_DIR):
            start = time.monotonic()
            create_venv(VENV_DIR)
            _run([_python(VENV_DIR), "-c", _IMPORT_CHECK], None)
            log.info("created %s in %.0f s", VENV_DIR, time.monotonic() - start)
    return _python(VENV_DIR)


if __name__ == "__main__":
    print(mxnet_python())
