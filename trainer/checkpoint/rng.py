"""Each rank's RNG states (torch, CUDA, numpy, Python) as tensors and plain data.

Stored so that `torch.load(weights_only=True)` reads them back with no allow-list:
numpy's MT19937 key array becomes an int64 tensor, Python's `random` state is already
a tuple of ints. Dropout and augmentation then continue their streams on resume.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint.files import load_plain, unsafe_globals
from trainer.checkpoint.layout import CheckpointError

log = logging.getLogger("trainer.checkpoint")

# What a file written before RNG states were plain data needs: numpy arrays, nothing else.
_LEGACY_NUMPY = {
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
}


def capture() -> dict[str, Any]:
    """This process's RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def read(data: bytes, path: Path) -> dict[str, Any] | None:
    """The RNG states in the bytes of rng file `path`, unpickled as plain data only; None
    for a file from before RNG states were plain data (it needs numpy's array globals,
    which are never unpickled: its streams restart from the seed)."""
    found = unsafe_globals(data)
    if found and found <= _LEGACY_NUMPY:
        log.warning("%s holds numpy arrays (saved by an older arcshard): RNG streams (dropout, "
                    "augmentation) restart from the seed", path)
        return None
    state = load_plain(data, path)
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= state.keys():
        raise CheckpointError(f"{path}: not RNG states; the file is damaged")
    return state


def restore(data: bytes, path: Path) -> None:
    """Set this process's RNG states from the bytes of rng file `path` (see `read`)."""
    state = read(data, path)
    if state is None:
        return
    try:
        numpy = state["numpy"]
        torch.set_rng_state(state["torch"])
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not RNG states ({type(e).__name__}: {e}); the file is damaged") from None
