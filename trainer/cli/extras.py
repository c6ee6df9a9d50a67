"""Optional dependencies and the extra that installs each: a missing one is one line that
names the extra, never a ModuleNotFoundError traceback."""

from __future__ import annotations

__all__ = ["EXTRAS", "install_hint", "require"]

# top-level module -> the pyproject.toml extra that installs it
EXTRAS = {
    "onnx": "deploy", "onnxruntime": "deploy", "onnxscript": "deploy", "tqdm": "deploy",
    "matplotlib": "report", "nvidia": "dali", "tensorboard": "tensorboard",
}


def install_hint(exc: ModuleNotFoundError) -> str | None:
    """`onnx is not installed: install the deploy extra (pip install 'arcshard[deploy]')`
    for a missing optional dependency; None for any other missing module (a bug)."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return f"{exc.name} is not installed: install the {extra} extra (pip install 'arcshard[{extra}]')"


def require(*modules: str) -> None:
    """Import `modules` up front (ModuleNotFoundError for the first missing one), so a
    command fails before its work, not inside a library that rewraps the error."""
    import importlib

    for name in modules:
        importlib.import_module(name)
