"""The Prometheus exporter of every rank (`trainer.telemetry` drives it with the
rank logs and metrics.jsonl).

Prometheus (`Metrics`, one dedicated registry per process): every rank serves
`/metrics` on `metrics.port + LOCAL_RANK` (0 disables; a busy port is a warning, the run
goes on) and/or pushes to a Pushgateway every `metrics.push_every_s` seconds and once at
the end (`metrics.pushgateway`, for jobs too short to be scraped). Every series carries
the labels `job` (run.name), `rank` and `node` (host name). Per-step values are host
timings and counts; loss, learning rate, gradient norm, loss scale, sampled classes and
memory are set at log points, where the step already syncs, so the exporter adds no host
read to the step.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import push_to_gateway, start_http_server

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.dist import DistContext

log = logging.getLogger(__name__)


# Histogram buckets (seconds): a step takes milliseconds on big GPUs and seconds on a
# laptop CPU; waiting for data is usually far below a millisecond when it keeps up.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DATA_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
CHECKPOINT_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
LABELS = ("job", "rank", "node")


def package_version() -> str:
    """The installed arcshard version, or '0+unknown' when it is not installed."""
    try:
        return importlib.metadata.version("arcshard")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _resident_bytes() -> int | None:
    """This process's resident set size from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    """One rank's Prometheus metrics, in a registry of its own.

    The training loop calls `step_done` every optimizer step (host values only),
    `nonfinite_step` for a skipped step and `log_point` where it logs (after the log
    point's host sync). Checkpointing calls `checkpoint_saved`, verification calls
    `verification`; until the first of each, those series have no samples. `serve` and
    `push_every` make the values visible; `close` stops both after a last push.
    """

    def __init__(self, job: str, rank: int, node: str | None = None) -> None:
        self.job, self.rank, self.node = job, rank, node or socket.gethostname()
        self.registry = CollectorRegistry()
        self._labels = {"job": job, "rank": str(rank), "node": self.node}
        self._server = None
        self._pusher: _Pusher | None = None

        def family(kind, name: str, doc: str, *extra: str, **kw):
            return kind(name, doc, LABELS + extra, registry=self.registry, **kw)

        def series(kind, name: str, doc: str, **kw):  # this rank's child, present from now on
            return family(kind, name, doc, **kw).labels(**self._labels)

        # Present from the start.
        self._info = series(Info, "arcshard", "Version, world size, backbone, num_classes")
        self._samples = series(Counter, "arcshard_samples", "Images this rank trained on")
        self._steps = series(Counter, "arcshard_steps", "Optimizer steps done (skipped included)")
        self._nonfinite = series(
            Counter, "arcshard_nonfinite_steps", "Steps skipped for a non-finite loss or gradient"
        )
        self._step = series(Gauge, "arcshard_step", "Last completed optimizer step")
        self._step_seconds = series(
            Histogram, "arcshard_step_seconds", "Wall time per optimizer step, data wait included",
            buckets=STEP_BUCKETS,
        )
        self._data_wait = series(
            Histogram, "arcshard_data_wait_seconds", "Time per step spent waiting for batches",
            buckets=DATA_WAIT_BUCKETS,
        )
        self._rows = series(Gauge, "arcshard_classifier_rows", "Class centres this rank owns")
        self._bytes = series(
            Gauge, "arcshard_classifier_bytes", "Bytes of this rank's class centres + their state"
        )
        # Present after the first log point (device memory: on GPUs only).
        self._loss = family(Gauge, "arcshard_loss", "Training loss, mean over the log window")
        self._lr = family(Gauge, "arcshard_learning_rate", "Learning rate of the last step")
        self._grad_norm = family(Gauge, "arcshard_grad_norm", "Backbone gradient norm, unclipped")
        self._loss_scale = family(Gauge, "arcshard_loss_scale", "AMP loss scale (1: no scaling)")
        self._max_logit = family(Gauge, "arcshard_max_logit", "Largest logit in the log window")
        self._target_cos = family(
            Gauge, "arcshard_target_cosine", "Mean cosine to the own class centre, log window"
        )
        self._sampled = family(
            Gauge, "arcshard_sampled_classes", "Class centres this rank scored in the last step"
        )
        self._rss = family(Gauge, "arcshard_host_resident_memory_bytes", "Resident host memory")
        self._dev_alloc = family(
            Gauge, "arcshard_device_memory_allocated_bytes", "GPU memory held by tensors"
        )
        self._dev_reserved = family(
            Gauge, "arcshard_device_memory_reserved_bytes", "GPU memory reserved by the allocator"
        )
        self._dev_peak = family(
            Gauge, "arcshard_device_memory_peak_bytes", "Peak GPU memory held by tensors"
        )
        # Present once checkpointing / verification report something.
        self._ckpt_seconds = family(
            Histogram, "arcshard_checkpoint_save_seconds", "Time to save one checkpoint",
            buckets=CHECKPOINT_BUCKETS,
        )
        self._ckpt_step = family(
            Gauge, "arcshard_last_checkpoint_step", "Step of the last checkpoint saved"
        )
        self._accuracy = family(
            Gauge, "arcshard_verification_accuracy", "Verification accuracy (0..1)", "target"
        )

    # -- recording ------------------------------------------------------------------
    def set_info(self, **facts: object) -> None:
        """The `arcshard_info` labels (version, world_size, backbone, num_classes)."""
        self._info.info({k: str(v) for k, v in facts.items()})

    def classifier(self, rows: int, nbytes: int) -> None:
        """This rank's classifier shard: class centres owned and bytes they take."""
        self._rows.set(rows)
        self._bytes.set(nbytes)

    def step_done(self, step: int, samples: int, seconds: float, data_wait: float) -> None:
        """One optimizer step of `samples` images on this rank (host timings, no sync)."""
        self._step_seconds.observe(seconds)
        self._data_wait.observe(data_wait)
        self._samples.inc(samples)
        self._steps.inc()
        self._step.set(step)

    def nonfinite_step(self) -> None:
        self._nonfinite.inc()

    def log_point(
        self, values: dict[str, float], lr: float, loss_scale: float, sampled_classes: int,
        device: torch.device,
    ) -> None:
        """Values read at a log point (`StepMeter.read`) plus memory; call after the sync."""
        now = [
            (self._loss, values["loss"]), (self._grad_norm, values["grad_norm"]),
            (self._lr, lr), (self._loss_scale, loss_scale), (self._sampled, sampled_classes),
            (self._max_logit, values["max_logit"]), (self._target_cos, values["target_cos"]),
        ]
        rss = _resident_bytes()
        if rss is not None:
            now.append((self._rss, rss))
        if device.type == "cuda":
            now += [
                (self._dev_alloc, torch.cuda.memory_allocated(device)),
                (self._dev_reserved, torch.cuda.memory_reserved(device)),
                (self._dev_peak, torch.cuda.max_memory_allocated(device)),
            ]
        for gauge, value in now:
            gauge.labels(**self._labels).set(value)

    def checkpoint_saved(self, seconds: float, step: int) -> None:
        """A checkpoint of `step` was written (and committed) in `seconds`."""
        self._ckpt_seconds.labels(**self._labels).observe(seconds)
        self._ckpt_step.labels(**self._labels).set(step)

    def verification(self, target: str, accuracy: float) -> None:
        """Verification accuracy (0..1) on `target` (e.g. 'lfw')."""
        self._accuracy.labels(**self._labels, target=target).set(accuracy)

    # -- exposing ---------------------------------------------------------------------
    def serve(self, port: int, address: str = "0.0.0.0") -> bool:
        """Serve /metrics on address:port; a port that cannot be bound is a warning."""
        try:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        except (OSError, OverflowError) as exc:
            log.warning(
                "metrics: cannot serve /metrics on %s:%d (%s): port %d is in use or not "
                "allowed; this rank exports nothing, training continues. Choose a free "
                "metrics.port (rank r of a node uses metrics.port + LOCAL_RANK).",
                address, port, getattr(exc, "strerror", None) or exc, port,
            )
            return False
        log.info("metrics: serving http://%s:%d/metrics (listening on %s:%d)",
                 self.node, port, address, port)
        return True

    def push_every(self, url: str, interval_s: float) -> None:
        """Push to the Pushgateway at `url` every `interval_s` seconds and at `close`."""
        self._pusher = _Pusher(url, self, interval_s)
        self._pusher.start()
        log.info("metrics: pushing to %s every %gs (group job=%s rank=%d node=%s)",
                 url, interval_s, self.job, self.rank, self.node)

    def close(self) -> None:
        """Final push (if pushing), then stop the HTTP server."""
        if self._pusher is not None:
            self._pusher.close()
            self._pusher = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Pusher(threading.Thread):
    """Pushes a registry to a Pushgateway periodically; failures are logged, never raised."""

    def __init__(self, url: str, metrics: Metrics, interval_s: float) -> None:
        super().__init__(name="metrics-push", daemon=True)
        self.url, self.metrics, self.interval_s = url, metrics, interval_s
        self._stop_event = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.push()

    def push(self) -> None:
        m = self.metrics
        try:  # PUT: the group holds exactly this rank's current series
            push_to_gateway(self.url, job=m.job, registry=m.registry, timeout=10,
                            grouping_key={"rank": m.rank, "node": m.node})
        except Exception as exc:  # noqa: BLE001 (a monitoring outage must not stop training)
            if not self._failing:
                log.warning("metrics: push to %s failed (%s); retrying every %gs",
                            self.url, exc, self.interval_s)
            self._failing = True
        else:
            if self._failing:
                log.info("metrics: push to %s works again", self.url)
            self._failing = False

    def close(self) -> None:
        self._stop_event.set()
        self.join()
        self.push()


def start_metrics(cfg: Config, ctx: DistContext) -> Metrics:
    """This rank's `Metrics` with its info set, serving and/or pushing as `cfg.metrics` says."""
    metrics = Metrics(cfg.run.name, ctx.rank)
    metrics.set_info(
        version=package_version(), world_size=ctx.world_size, backbone=cfg.backbone.name,
        num_classes=cfg.data.num_classes,
    )
    if cfg.metrics.port:
        metrics.serve(cfg.metrics.port + ctx.local_rank, cfg.metrics.address)
    if cfg.metrics.pushgateway:
        metrics.push_every(cfg.metrics.pushgateway, cfg.metrics.push_every_s)
    return metrics
