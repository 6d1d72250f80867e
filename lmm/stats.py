"""Runner statistics over every worker: batch sizes and running sequences, from Prometheus metrics.

A runner's workers are separate processes, so a counter one worker keeps in memory answers for
that worker only. BentoML instead starts every process of one server (all services of a
``bentoml serve``; all workers of one ``start-http-server`` pod) with one
``PROMETHEUS_MULTIPROC_DIR``, and prometheus_client keeps each process's samples in a file of its
own there. The runners observe their batch sizes into histograms with one bucket per size (up to
their hard cap), so ``runner_stats`` sums those files into exact per-size counts over all
workers, also those that have exited since (a restarted LLM worker's batches did run), while the
running-sequences gauge counts live processes only. The same metrics are on ``/metrics``.

Across the replicas of a Kubernetes Deployment (separate pods, separate folders) a runner's
``stats`` answers for the pod that takes the call; Prometheus scraping each pod sees them all.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from typing import Iterable

from lmm.protocol import RunnerStats

VISION, LLM = "lmm-vision", "lmm-llm"
VISION_BATCH_SIZE = "lmm_vision_batch_size"
LLM_BATCH_SIZE = "lmm_llm_batch_size"
LLM_RUNNING = "lmm_llm_running"
# service -> (its batch-size histogram, its running gauge or None)
METRICS = {VISION: (VISION_BATCH_SIZE, None), LLM: (LLM_BATCH_SIZE, LLM_RUNNING)}


def _registry(registry):
    if registry is not None:
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


def size_buckets(max_size: int) -> list[float]:
    """One bucket per batch size 1..max_size: per-size counts stay exact after aggregation."""
    return [float(size) for size in range(1, max_size + 1)]


def vision_batch_size(max_batch_size: int, registry=None):
    """Histogram of the vision runner's batches: images or texts per call, by API."""
    from prometheus_client import Histogram

    return Histogram(
        VISION_BATCH_SIZE,
        "Images or texts encoded together in one vision-runner batch",
        labelnames=["api"],
        buckets=size_buckets(max_batch_size),
        registry=_registry(registry),
    )


def llm_batch_size(max_num_seqs: int, registry=None):
    """Histogram of the LLM engine's decode steps: sequences decoded together."""
    from prometheus_client import Histogram

    return Histogram(
        LLM_BATCH_SIZE,
        "Sequences decoded together in one engine step",
        buckets=size_buckets(max_num_seqs),
        registry=_registry(registry),
    )


def llm_running(registry=None):
    """Gauge of sequences in an LLM worker now; summed over live workers."""
    from prometheus_client import Gauge

    return Gauge(
        LLM_RUNNING,
        "Sequences in the LLM runner now (running or waiting for a batch slot)",
        multiprocess_mode="livesum",
        registry=_registry(registry),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _files(directory: str) -> list[str]:
    """The folder's sample files, less live-mode gauges of processes that are gone: a worker that
    died without prometheus_client's mark_process_dead (os._exit, a kill) leaves its file."""
    files = []
    for path in sorted(glob.glob(os.path.join(directory, "*.db"))):
        name = os.path.basename(path)
        if name.startswith("gauge_live"):
            pid = name.removesuffix(".db").rpartition("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                continue
        files.append(path)
    return files


def _collect(directory: str | None, registry) -> Iterable:
    if directory is None:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        from prometheus_client.multiprocess import MultiProcessCollector

        return MultiProcessCollector.merge(_files(directory), accumulate=True)
    return _registry(registry).collect()  # one process, no shared folder (in-process tests)


def runner_stats(service: str, directory: str | None = None, registry=None) -> RunnerStats:
    """Batches ``service`` (lmm-vision or lmm-llm) ran over every worker sharing ``directory``
    (default ``$PROMETHEUS_MULTIPROC_DIR``; without one, this process's registry).

    ``batch_size_histogram`` maps a size to how many batches had it; a size above the top bucket
    (the runners' caps rule it out) would count in ``batches`` only.
    """
    batch_metric, running_metric = METRICS[service]
    cumulative: dict[tuple, list[tuple[float, float]]] = {}
    batches = running = 0.0
    for metric in _collect(directory, registry):
        if metric.name == batch_metric:
            for sample in metric.samples:
                if sample.name == batch_metric + "_bucket":
                    series = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                    le = float(sample.labels["le"])
                    cumulative.setdefault(series, []).append((le, sample.value))
                elif sample.name == batch_metric + "_count":
                    batches += sample.value
        elif running_metric is not None and metric.name == running_metric:
            running += sum(sample.value for sample in metric.samples)
    sizes: Counter[int] = Counter()
    for buckets in cumulative.values():
        below = 0.0
        for le, count in sorted(buckets):
            if le != float("inf") and count > below:
                sizes[int(le)] += int(round(count - below))
            below = count
    return RunnerStats(
        service=service,
        batches=int(round(batches)),
        max_batch_size_seen=max(sizes, default=0),
        batch_size_histogram=dict(sorted(sizes.items())),
        running=int(round(running)),
    )
