"""The Prometheus exporter: live scrapes of a 2-process run, a real Prometheus server
scraping it through the SLURM file_sd example, a busy port, and push mode."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.distributed import free_port
from tests.trainer.test_train import REPO, TINY, TORCHRUN
from trainer.metrics import Metrics

MONITORING = REPO / "deploy" / "monitoring"
RUN_NAME = "live"
BATCH = 4  # per rank: about a second per step on 2 CPU cores
# The live run must outlast a few 1 s Prometheus scrapes, also on fast machines: it runs on
# the CPU (CUDA hidden) for STEPS steps.
STEPS = 24
HOST = socket.gethostname()


def _free_base_port(count: int) -> int:
    """A port p with p .. p+count-1 all free on 127.0.0.1 (one exporter per local rank)."""
    for _ in range(50):
        base, sockets = free_port(), []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def _train_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        *TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
        "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
        f"run.output_dir={out}", *TINY, f"data.batch_size={BATCH}", "metrics.address=127.0.0.1",
        *overrides,
    ]


def _scrape(port: int) -> dict | None:
    """{family name: family} of one /metrics page, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict, sample_name: str, **labels: str) -> float:
    family = families[re.sub(r"_(total|bucket|count|sum)$", "", sample_name)]
    matches = [s.value for s in family.samples if s.name == sample_name
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (sample_name, labels, family.samples)
    return matches[0]


# -- a real Prometheus -------------------------------------------------------------------
def _install_prometheus() -> str | None:
    """Path of the prometheus binary, installing Debian's package if needed; else None."""
    if shutil.which("prometheus"):
        return shutil.which("prometheus")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    # Debian packages start their services unless policy-rc.d forbids it (exit 101):
    # the test must not leave a system Prometheus running.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
            subprocess.run([*cmd, "-o", "DPkg::Lock::Timeout=300"], env=env, check=True,
                           capture_output=True, timeout=900)
    finally:
        if own_policy:
            policy.unlink()
    return shutil.which("prometheus")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen

    def query(self, expr: str, at: float) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


def _start_prometheus(binary: str, tmp: Path, base_port: int) -> Prometheus:
    """Prometheus on loopback, scraping every second the targets that the SLURM helper
    writes, with the example config's scrape job (deploy/monitoring/prometheus.yml)."""
    targets = tmp / "targets"
    written = subprocess.run(
        [str(MONITORING / "slurm_targets.sh"), str(targets), str(base_port), "2"],
        env={**os.environ, "SLURM_JOB_ID": "4242", "ARCSHARD_NODES": "127.0.0.1"},
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert json.loads(Path(written).read_text())[0]["targets"] == [
        f"127.0.0.1:{base_port}", f"127.0.0.1:{base_port + 1}"]
    example = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = [j for j in example["scrape_configs"] if j["job_name"] == "arcshard"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["file_sd_configs"] = [{"files": [str(targets / "arcshard-*.json")], "refresh_interval": "1s"}]
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}))
    port = free_port()
    with open(tmp / "prometheus.log", "wb") as log_file:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2):
                return prom
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"Prometheus not ready after 60 s: {(tmp / 'prometheus.log').read_text()}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM to its PID (torchrun passes it on to its workers)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- one live run shared by the scrape and Prometheus tests -----------------------------
@dataclass
class LiveRun:
    out: Path
    base_port: int
    returncode: int
    stderr: str
    first: dict[int, dict] = field(default_factory=dict)  # rank -> first scrape
    last: dict[int, dict] = field(default_factory=dict)  # rank -> last scrape
    last_seen: float = 0.0  # wall time when both ranks last answered
    prometheus: Prometheus | None = None
    no_prometheus: str = ""  # why there is none
    install_failed: bool = False  # apt-get was there but the install failed: a failure


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    base = _free_base_port(2)
    prometheus, reason, install_failed = None, "", False
    try:
        binary = _install_prometheus()
    except subprocess.SubprocessError as exc:  # the scrape tests still run
        binary, install_failed = None, True
        reason = f"installing Debian's prometheus failed: {exc}\n{getattr(exc, 'stderr', '')}"
    if binary is None and not reason:
        reason = "prometheus is not installed and apt-get is unavailable (or not root)"
    procs = []
    try:
        if binary is not None:
            prometheus = _start_prometheus(binary, tmp, base)
            procs.append(prometheus.process)
        out = tmp / "run"
        train = subprocess.Popen(
            _train_cmd(out, f"metrics.port={base}", f"run.name={RUN_NAME}",
                       f"run.max_steps={STEPS}", "run.inject_nonfinite=[2]"),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        procs.append(train)
        first: dict[int, dict] = {}
        last: dict[int, dict] = {}
        last_seen = 0.0
        stderr_chunks: list[str] = []
        reader = threading.Thread(target=lambda: stderr_chunks.append(train.stderr.read()))
        reader.start()
        deadline = time.monotonic() + 400
        while train.poll() is None and time.monotonic() < deadline:
            pages = {rank: _scrape(base + rank) for rank in (0, 1)}
            for rank, page in pages.items():
                if page is not None:
                    first.setdefault(rank, page)
                    last[rank] = page
            if all(page is not None for page in pages.values()):
                last_seen = time.time()
            time.sleep(0.5)
        _stop(train)
        reader.join()
        yield LiveRun(out, base, train.returncode, "".join(stderr_chunks), first, last,
                      last_seen, prometheus, reason, install_failed)
    finally:
        for process in procs:  # by PID, also when the run or a test failed
            _stop(process)


def _steps(page: dict, rank: int) -> float:
    return _value(page, "arcshard_steps_total", rank=str(rank))


def test_every_rank_serves_metrics_during_a_run(live_run):
    run = live_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(run.first) == set(run.last) == {0, 1}, "a rank's /metrics never answered"
    for rank in (0, 1):
        log_text = (run.out / "logs" / f"rank{rank}.log").read_text()
        assert f"metrics: serving http://{HOST}:{run.base_port + rank}/metrics" in log_text
        first, last = run.first[rank], run.last[rank]
        # Counters grow between scrapes and agree with each other.
        assert _steps(first, rank) < _steps(last, rank), "no step between the two scrapes"
        for page in (first, last):
            steps = _steps(page, rank)
            samples = _value(page, "arcshard_samples_total", rank=str(rank))
            # step_done updates one metric after another: a scrape may fall in between.
            assert BATCH * steps <= samples <= BATCH * (steps + 1)
        # Every series carries job, rank and node.
        for family in last.values():
            for sample in family.samples:
                assert (sample.labels["job"], sample.labels["rank"], sample.labels["node"]) == (
                    RUN_NAME, str(rank), HOST), sample
        (info,) = last["arcshard_info"].samples
        assert info.name == "arcshard_info" and info.value == 1
        assert {k: info.labels[k] for k in ("world_size", "backbone", "num_classes")} == {
            "world_size": "2", "backbone": "mobilefacenet", "num_classes": "16"}
        assert info.labels["version"]
        # Histograms: buckets cumulative, +Inf == count, one observation per step.
        for name in ("arcshard_step_seconds", "arcshard_data_wait_seconds"):
            family = last[name]
            assert family.type == "histogram"
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples
                       if s.name == name + "_bucket"]
            assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
            assert buckets[-1][0] == math.inf and len(buckets) > 5
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative: {buckets}"
            count = _value(last, name + "_count")
            assert counts[-1] == count
            assert _steps(last, rank) <= count <= _steps(last, rank) + 1
            assert _value(last, name + "_sum") >= 0
        assert _value(last, "arcshard_step_seconds_sum") > 0
        # Log-point gauges and the classifier shard: 16 classes over 2 ranks at rate 0.5.
        assert 0 < _value(last, "arcshard_loss") < 100
        assert 0 < _value(last, "arcshard_learning_rate") <= 0.1
        assert _value(last, "arcshard_grad_norm") >= 0
        assert _value(last, "arcshard_loss_scale") == 1
        assert -64 <= _value(last, "arcshard_max_logit") <= 64  # s · cos (+ margin), s = 64
        assert -1 <= _value(last, "arcshard_target_cosine") <= 1
        assert 4 <= _value(last, "arcshard_sampled_classes") <= 8
        assert _value(last, "arcshard_classifier_rows") == 8
        assert _value(last, "arcshard_classifier_bytes") == 8 * 64 * 4 * 2  # weight + momentum
        assert _value(last, "arcshard_host_resident_memory_bytes") > 50 * 2**20
        assert _value(last, "arcshard_nonfinite_steps_total") == (_steps(last, rank) >= 2)
        assert _value(last, "arcshard_step") == _steps(last, rank)
        # Declared, without samples until checkpoints / verification / a GPU exist.
        for name in ("arcshard_checkpoint_save_seconds", "arcshard_last_checkpoint_step",
                     "arcshard_verification_accuracy", "arcshard_device_memory_allocated_bytes"):
            assert last[name].samples == [], name
    # metrics.jsonl gets both ranks' throughput and data wait.
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STEPS and rows[-1]["nonfinite_total"] == 1
    for row in rows:
        assert len(row["samples_per_sec_per_rank"]) == len(row["data_wait_frac_per_rank"]) == 2
        assert all(v > 0 for v in row["samples_per_sec_per_rank"])
        assert all(0 <= v <= 1 for v in row["data_wait_frac_per_rank"])


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_only_exported_metrics(live_run):
    page = live_run.last[0]
    exported = {s.name for family in page.values() for s in family.samples}
    for family in page.values():  # declared families without samples yet, e.g. GPU memory
        exported |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    titles = {title for title, _ in _dashboard_queries()}
    assert {"Throughput per rank", "Data wait per rank", "Loss", "Learning rate",
            "Memory per rank", "Slowest rank"} <= titles
    for title, expr in _dashboard_queries():
        names = set(re.findall(r"\barcshard_\w+", expr))
        assert names and names <= exported, (title, names - exported)


def test_prometheus_scrapes_both_ranks(live_run):
    run = live_run
    if run.install_failed:
        pytest.fail(run.no_prometheus)
    if run.prometheus is None:
        pytest.skip(run.no_prometheus)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.last_seen, "the ranks never answered together"
    prom, at = run.prometheus, run.last_seen  # after the run, at its last live moment
    for expr in (f'arcshard_samples_total{{job="{RUN_NAME}"}}',
                 f'rate(arcshard_samples_total{{job="{RUN_NAME}"}}[30s])'):
        result = prom.query(expr, at)
        by_rank = {r["metric"]["rank"]: float(r["value"][1]) for r in result}
        assert set(by_rank) == {"0", "1"}, (expr, result)
        assert all(v > 0 for v in by_rank.values()), (expr, by_rank)
        assert {r["metric"]["node"] for r in result} == {HOST}
        assert {r["metric"]["slurm_job_id"] for r in result} == {"4242"}  # from the file_sd
    # Every dashboard query is valid PromQL here; the per-rank panels see both ranks.
    for title, expr in _dashboard_queries():
        expr = expr.replace("$__rate_interval", "30s").replace("$job", RUN_NAME)
        result = prom.query(expr, at)
        if title in ("Throughput per rank", "Data wait per rank"):
            assert {r["metric"]["rank"] for r in result} == {"0", "1"}, (title, result)
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "config", str(MONITORING / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.integration
def test_busy_port_is_a_warning_and_training_runs(tmp_path):
    base = _free_base_port(2)
    out = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base))
        busy.listen()
        proc = subprocess.run(_train_cmd(out, f"metrics.port={base}", "run.max_steps=2"),
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (out / "logs" / "rank0.log").read_text()
    assert re.search(rf"WARNING .*cannot serve /metrics on 127\.0\.0\.1:{base} .*port {base} is in use",
                     rank0), rank0[-2000:]
    assert f"port {base} is in use" in proc.stderr  # the warning reaches the console
    rank1 = (out / "logs" / "rank1.log").read_text()
    assert f"metrics: serving http://{HOST}:{base + 1}/metrics" in rank1
    assert "finished 2 steps" in rank0


# -- push mode -----------------------------------------------------------------------------
class _Gateway(ThreadingHTTPServer):
    """A stand-in Pushgateway that records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                outer.requests.append((self.command, self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_push_mode_pushes_periodically_and_at_close():
    gateway = _Gateway()
    try:
        metrics = Metrics("short-job", 1, node="n1")
        metrics.step_done(1, 8, 0.5, 0.01)
        metrics.push_every(f"http://127.0.0.1:{gateway.server_port}", 0.05)
        deadline = time.monotonic() + 10
        while not gateway.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gateway.requests, "no periodic push"
        metrics.step_done(2, 8, 0.5, 0.01)
        metrics.close()
        method, path, body = gateway.requests[-1]
    finally:
        gateway.shutdown()
        gateway.server_close()
    assert method == "PUT" and path == "/metrics/job/short-job/node/n1/rank/1"
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert _value(families, "arcshard_samples_total") == 16  # the final push has the last step
    assert _value(families, "arcshard_samples_total", job="short-job", rank="1", node="n1")


def test_push_failure_is_a_warning(caplog):
    metrics = Metrics("job", 0)
    metrics.push_every(f"http://127.0.0.1:{free_port()}", 60)  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        metrics.close()  # the final push fails; training code never sees it
    assert "push to http://127.0.0.1" in caplog.text and "failed" in caplog.text


def test_checkpoint_and_verification_recorders():
    metrics = Metrics("job", 3, node="n")
    metrics.checkpoint_saved(12.5, 2000)
    metrics.verification("lfw", 0.9965)
    metrics.verification("cfp_fp", 0.98)
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _value(families, "arcshard_checkpoint_save_seconds_count") == 1
    assert _value(families, "arcshard_checkpoint_save_seconds_sum") == 12.5
    assert _value(families, "arcshard_last_checkpoint_step") == 2000
    assert _value(families, "arcshard_verification_accuracy", target="lfw") == 0.9965
    assert _value(families, "arcshard_verification_accuracy", target="cfp_fp", rank="3") == 0.98
