"""The `integration` marker: tests that start real processes beyond a quick gloo group
(torchrun, a SLURM cluster, the MXNet venv, training subprocesses, torch.compile).

`bash scripts/test.sh -m "not integration"` is the fast inner loop; the README's test
command runs everything. Single tests carry `@pytest.mark.integration`; whole modules
and the fixtures that start such processes are listed here, so every test using them is
marked without repeating the decorator.
"""

from __future__ import annotations

import pytest

INTEGRATION_MODULES = {
    "tests.launch.test_slurm",
    "tests.trainer.checkpoint.test_preemption",
    "tests.trainer.checkpoint.test_safe_loading",
    "tests.trainer.test_train_eval",
    "tests.evaluation.test_yalefaces",
    "tests.benchmarks.test_gpu_smoke",
    "tests.benchmarks.test_gpu_bench",
    "tests.benchmarks.test_ddp_settings",
}
# Fixtures that train a model in a subprocess, start SLURM, or build the MXNet venv.
INTEGRATION_FIXTURES = {"mxnet_python", "slurm", "r50_export", "mbf_run", "live_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item.module, "__name__", "")
        if module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
