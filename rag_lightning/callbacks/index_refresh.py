"""IndexRefresh: re-encode the knowledge base with the current context encoder, in the background.

Every `every_n_steps` global optimizer steps, rank 0 puts the context encoder's weights in
the Ray object store and asks the job's RefreshCoordinator (retrieval_workers/refresh.py)
for a new index version, without waiting for it. Each later step polls the request with a
zero timeout. At most one refresh is in flight: one that falls due meanwhile is skipped
and logged, not queued; a failed one is logged and tried again at the next due step. When
training ends, an unfinished refresh is waited for, so evaluation never sees a switch.

Logged: refresh/version, refresh/wall_s, refresh/passages_per_s when one completes, and
the running counts refresh/completed, refresh/skipped, refresh/failed.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import ray

from retrieval_workers import RefreshReport, ServiceSpec, coordinator_name

log = logging.getLogger(__name__)


class IndexRefresh(L.Callback):
    def __init__(self, service: ServiceSpec, every_n_steps: int, blocking: bool = False):
        self.service = service
        self.every_n_steps = every_n_steps
        self.blocking = blocking
        self.in_flight: tuple[ray.ObjectRef, ray.ObjectRef] | None = None  # (report, published weights)
        self.last_due_step = -1
        self.completed, self.skipped, self.failed = 0, 0, 0
        self.reports: list[RefreshReport] = []
        self.blocked_s = 0.0  # time the training loop spent in this callback's refresh work

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        started = time.perf_counter()
        finished = [self._collect(wait=False)]
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_due_step:
            self.last_due_step = step
            if self.in_flight is not None:
                self.skipped += 1
                log.info("refresh due at step %d skipped: the previous one is still running", step)
            else:
                self._start(pl_module, step)
                if self.blocking:
                    finished.append(self._collect(wait=True))
        self.blocked_s += time.perf_counter() - started
        metrics: dict[str, float] = {
            "refresh/completed": self.completed,
            "refresh/skipped": self.skipped,
            "refresh/failed": self.failed,
        }
        for report in filter(None, finished):
            metrics.update(report_metrics(report))
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, batch_size=1, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.in_flight is not None:
            log.info("waiting for the refresh in flight to finish before evaluation")
            report = self._collect(wait=True)
            if report is not None and trainer.logger is not None:
                trainer.logger.log_metrics(report_metrics(report), step=trainer.global_step)

    def refresh_now(self, pl_module: L.LightningModule, step: int) -> RefreshReport | None:
        """Make a version from the module's current context encoder (the weights of global step `step`) and
        wait for it, e.g. after loading a checkpoint whose index version was pruned; None if it failed."""
        self._collect(wait=True)
        self._start(pl_module, step)
        return self._collect(wait=True)

    def _start(self, pl_module: L.LightningModule, step: int) -> None:
        weights = ray.put(pl_module.context_encoder.snapshot(step))
        coordinator = ray.get_actor(coordinator_name(self.service), namespace=self.service.namespace)
        self.in_flight = (coordinator.refresh.remote([weights], step), weights)
        log.info("refresh started at step %d", step)

    def _collect(self, wait: bool) -> RefreshReport | None:
        """The report of the refresh in flight if it finished with a new version live (or wait for it)."""
        if self.in_flight is None:
            return None
        report_ref = self.in_flight[0]
        if not wait and not ray.wait([report_ref], timeout=0)[0]:
            return None
        self.in_flight = None
        try:
            report: RefreshReport = ray.get(report_ref)
        except ray.exceptions.RayError as e:  # the coordinator itself died; it restarts
            self.failed += 1
            log.warning("refresh failed (%s); the active index version keeps serving, retrying when next due", e)
            return None
        self.reports.append(report)
        if report.error is not None:
            self.failed += 1
            log.warning(
                "refresh to version %d (weights of step %d) failed: %s; the active version keeps "
                "serving, retrying when next due",
                report.version,
                report.global_step,
                report.error,
            )
            return None
        self.completed += 1
        log.info(
            "index version %d (weights of step %d) is live: %d passages in %.1fs, %.0f passages/s",
            report.version,
            report.global_step,
            report.passages,
            report.wall_s,
            report.passages_per_s,
        )
        return report


def report_metrics(report: RefreshReport) -> dict[str, float]:
    return {
        "refresh/version": report.version,
        "refresh/wall_s": report.wall_s,
        "refresh/passages_per_s": report.passages_per_s,
    }
