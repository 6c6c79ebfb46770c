"""Optuna storages with worker liveness: SQLite, journal files and RDB (PostgreSQL) URLs.

SQLite (the default, ``sqlite:///tuning/optuna.db``) suits one worker; a journal file
(``journal:///path``) parallel workers on one machine; an RDB URL (``postgresql://...``)
several machines. Killed workers do not stall a study: RDB storages use Optuna's heartbeat,
and :class:`HeartbeatJournalStorage` adds the same heartbeat to the journal file; stale
(killed) trials are failed and re-enqueued once with the same parameters.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from matbench_dim.runtime import pid_alive
from matbench_dim.tuning._common import HOST

__all__ = ["DEFAULT_STORAGE", "HeartbeatJournalStorage", "resolve_storage"]

DEFAULT_STORAGE = "sqlite:///tuning/optuna.db"
_HEARTBEAT_KEY = "matbench_dim:heartbeat"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with Optuna's heartbeat protocol (which ``JournalStorage`` lacks).

    While a trial runs, Optuna's heartbeat thread records ``{trial_id, time, host, pid,
    interval}`` in a system attribute every ``heartbeat_interval`` seconds. Before each trial,
    every worker fails the RUNNING trials that are stale, and ``stale_trial_callback`` (e.g. a
    retry) runs on them. Stale means: on this host, the recording process is gone (checked at
    once); on another host, no beat for ``max(grace_period, 2 * the writer's interval)``
    seconds (the hosts' clocks must agree). A RUNNING trial that never beat is stale after
    ``grace_period``, so all workers of a study must use this class.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval}")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        beat = {"trial_id": trial_id, "time": time.time(), "host": HOST, "pid": os.getpid(),
                "interval": self.heartbeat_interval}  # fmt: skip
        self.set_trial_system_attr(trial_id, _HEARTBEAT_KEY, beat)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(_HEARTBEAT_KEY)
            if not isinstance(beat, dict) or beat.get("trial_id") != t._trial_id:
                started = t.datetime_start.timestamp() if t.datetime_start else now
                if now - started > self.grace_period:
                    stale.append(t._trial_id)
            elif beat["host"] == HOST:
                if not pid_alive(int(beat["pid"])):
                    stale.append(t._trial_id)
            elif now - float(beat["time"]) > max(self.grace_period, 2 * beat.get("interval", 0)):
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback

    def get_failed_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback


def resolve_storage(
    storage: str | BaseStorage | None = None,
    *,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 1,
) -> BaseStorage:
    """Build a storage with heartbeat and stale-trial retry from a URL.

    Parameters
    ----------
    storage
        ``None`` (``sqlite:///tuning/optuna.db``), ``"journal://<path>"`` (journal file; the
        path follows ``journal://`` literally, so ``journal:///abs/x.journal`` is absolute;
        append ``?lock=open`` for file systems without symlinks, e.g. NFS), any SQLAlchemy
        URL (``sqlite:///...``, ``postgresql://user:pw@host/db``), or a ready storage.
    heartbeat_interval, grace_period
        Seconds between heartbeats of a running trial, and of silence before it is failed
        (default twice the interval).
    max_retry
        How many times a stale (killed) trial is re-enqueued with the same parameters.
    """
    if isinstance(storage, BaseStorage):
        return storage
    url = storage or DEFAULT_STORAGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if url.startswith("journal://"):
        path, _, query = url[len("journal://") :].partition("?")
        if not path or query not in ("", "lock=open"):
            raise ValueError(f"bad journal storage URL {url!r}; use journal://<path>[?lock=open]")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileOpenLock(path) if query else None
        return HeartbeatJournalStorage(
            JournalFileBackend(path, lock_obj=lock), heartbeat_interval, grace_period, retry
        )
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )
