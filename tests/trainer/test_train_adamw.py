"""AdamW runs end to end: a small vit_t learns on CPU, and a far too high AdamW learning
rate trips the non-finite guard (exit code 3) without touching the last checkpoint."""

import pytest
import torch

from tests.trainer.test_train import _metrics, _torchrun
from trainer import checkpoint
from trainer.checkpoint.verify import verify_all
from trainer.exit_codes import NONFINITE

ADAMW = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.clip_grad_norm=5"]


@pytest.mark.integration
def test_vit_t_with_adamw_learns(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(
        out, *ADAMW, "backbone.name=vit_t", "optim.lr=1e-3", "run.max_steps=8",
        "data.batch_size=4", "data.num_classes=8", "data.synthetic_mode=identities",
        "data.workers=0", nproc=1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.8 * first, f"loss did not fall: {first} -> {last}"
    # Learning shows in the logged pair too: embeddings move towards their own centres.
    assert rows[-1]["target_cos"] > rows[0]["target_cos"], rows
    assert all(abs(r["max_logit"]) <= 64 for r in rows), rows


@pytest.mark.integration
def test_too_high_adamw_lr_stops_cleanly_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    base = [*ADAMW, "data.workers=0", "optim.warmup_steps=0"]
    good = _torchrun(out, *base, "optim.lr=1e-3", "run.max_steps=3", nproc=1)
    assert good.returncode == 0, good.stderr[-3000:]
    ckpt = checkpoint.find_latest(out / "checkpoints")
    before = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    # Resume with an absurd learning rate: the first update blows the weights up, the
    # next forward overflows, and run.max_nonfinite such steps stop the run.
    bad = _torchrun(out, *base, "optim.lr=1e30", "run.max_steps=12", "run.max_nonfinite=2",
                    "optim.clip_grad_norm=0", nproc=1)
    assert bad.returncode != 0 and f"exitcode  : {NONFINITE}" in bad.stderr, bad.stderr[-3000:]
    assert "non-finite steps in a row" in (out / "logs" / "rank0.log").read_text()
    assert checkpoint.find_latest(out / "checkpoints") == ckpt
    assert verify_all(ckpt) == []
    assert {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    weight = next(ckpt.glob("classifier/weight.*.bin")).read_bytes()
    assert torch.isfinite(torch.frombuffer(bytearray(weight), dtype=torch.float32)).all()
