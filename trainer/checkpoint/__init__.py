"""Sharded, atomic, verifiable checkpoints that re-shard to any world size.

Layout (`run.output_dir/checkpoints/`)::

    latest                      text: the directory name of the newest complete checkpoint
    best                        text: the one with the best verification accuracy (if any)
    step-000001234/
        replicated.pt           backbone, backbone optimizer, AMP scaler, training position,
                                PartialFC sampling position, the backbone's EMA when
                                backbone.ema_decay > 0 (written once, by rank 0)
        config.yaml             the run's resolved config
        rng/rank00003.pt        each rank's RNG states
        classifier/weight.0000000000-0000500000.bin    raw row-major rows [start, end) of
        classifier/momentum.0000000000-0000500000.bin  the class centres / their momentum
        index.json              every file's size and sha256 (classifier files: one sha256
                                per block of BLOCK_ROWS rows), world size, shapes, dtypes,
                                the id of the run that wrote it
        COMPLETE                written last; a directory without it is never loaded

Why not `torch.distributed.checkpoint` (DCP): DCP re-shards DTensor/ShardedTensor state
whose sharding it knows; our shard is a plain tensor holding an arbitrary contiguous row
range, and we want three things DCP leaves to the caller anyway: a per-file checksum that
names the broken file, a completion marker plus an atomic `latest` pointer, and files a
person can inspect (`arcshard-ckpt info`). Raw row files make re-sharding trivial and
cheap: a rank at the new world size reads exactly the rows of the saved files that
overlap its new class range (never the whole classifier), verifying only the checksum
blocks it reads.

Modules: `layout` (paths, pointers, pruning), `rowfiles` (raw row files), `files`
(index-checked reads, tensors-only unpickling), `rng`, `saving` (save), `loading` (load
+ re-shard), `verify`, `checkpointer` (the loop's component, resume_point) and
`backbone` (the inference loader evaluation and deploy share).
"""

from trainer.checkpoint.backbone import WEIGHTS, TrainedBackbone, load_backbone
from trainer.checkpoint.checkpointer import Checkpointer, resume_point
from trainer.checkpoint.layout import (
    BEST, CHECKPOINTS_DIR, COMPLETE, CONFIG, FORMAT, FORMAT_VERSION, INDEX, LATEST, REPLICATED,
    CheckpointError, checkpoints_root, complete_checkpoints, find_latest, is_complete, mark_best,
    prune, remove_incomplete, resolve, step_dir_name,
)
from trainer.checkpoint.loading import load, read_config, read_index, read_replicated
from trainer.checkpoint.parts import TrainingParts
from trainer.checkpoint.rowfiles import BLOCK_ROWS
from trainer.checkpoint.saving import save
from trainer.checkpoint.verify import verify_all
from trainer.config import SHAPE_KEYS, config_changes
from trainer.state import TrainState

__all__ = [
    "BEST", "BLOCK_ROWS", "CHECKPOINTS_DIR", "COMPLETE", "CONFIG", "FORMAT", "FORMAT_VERSION",
    "INDEX", "LATEST", "REPLICATED", "SHAPE_KEYS", "WEIGHTS", "CheckpointError", "Checkpointer",
    "TrainState", "TrainedBackbone", "TrainingParts", "checkpoints_root", "complete_checkpoints", "config_changes",
    "find_latest", "is_complete", "load", "load_backbone", "mark_best", "prune", "read_config",
    "read_index", "read_replicated", "remove_incomplete", "resolve", "resume_point", "save",
    "step_dir_name", "verify_all",
]
