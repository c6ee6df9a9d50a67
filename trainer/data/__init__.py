"""Training data: `build_source` gives the trainer its `BatchSource` (see `trainer.data.source`)."""

from trainer.data.errors import DataError
from trainer.data.source import BatchSource, build_source

__all__ = ["BatchSource", "DataError", "build_source"]
