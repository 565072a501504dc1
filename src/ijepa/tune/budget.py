"""A study-wide trial budget shared by any number of workers: run trials until the study
holds `target` done trials, exactly, even when workers die.

Optuna's pieces do the work: heartbeats and `fail_stale_trials` mark a dead worker's trial
FAIL, `RetryHeartbeatStaleTrialCallback` queues its point again (WAITING), and `optimize`
pops a WAITING trial before it creates a new one. Two things are added here:

- what "done" means: COMPLETE, PRUNED, and FAIL trials that were not re-queued (a trial that
  raised, or a stale one past its retries); a stale trial that was re-queued is replaced by
  its retry, so it does not count;
- a claim lock, so that the decision "one more trial is needed" and the creation of that
  trial are one step: without it two workers that both see one missing trial both start one
  and the study ends with target + 1. PostgreSQL: a session advisory lock (released by the
  server when a killed worker's connection drops); SQLite: an fcntl lock next to the file
  (one machine); other databases: none, with a warning (the last trials may overshoot).
  The lock is held from the decision until the objective starts, not during the trial.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["BudgetState", "budget_state", "ClaimLock", "run_until"]

log = logging.getLogger("ijepa.tune")


class BudgetState(tuple):
    """(done, running, waiting) trial counts of a study (see the module docstring)."""

    @property
    def done(self) -> int:
        return self[0]

    @property
    def running(self) -> int:
        return self[1]

    @property
    def waiting(self) -> int:
        return self[2]


def budget_state(trials) -> BudgetState:
    from optuna.trial import TrialState

    # a re-queued stale trial is the last entry of its retry's retry_history
    requeued = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in requeued))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return BudgetState((done, running, waiting))


class ClaimLock:
    """An exclusive lock per study across all its workers (see the module docstring)."""

    def __init__(self, storage, study_name: str):
        self.engine = storage.engine  # an optuna RDBStorage's SQLAlchemy engine
        self.key = int.from_bytes(hashlib.sha256(f"ijepa.tune:{study_name}".encode()).digest()[:8], "big",
                                  signed=True)
        self._conn = None
        self._fh = None
        self.kind = ("postgresql" if self.engine.dialect.name == "postgresql"
                     else "sqlite" if self.engine.dialect.name == "sqlite" and self._sqlite_path() else None)
        if self.kind is None:
            log.warning("tune: no claim lock for %s databases: with several workers the study may end with a "
                        "few trials more than asked", self.engine.dialect.name)

    def _sqlite_path(self) -> Path | None:
        db = self.engine.url.database
        return Path(db) if db and db != ":memory:" else None

    def acquire(self) -> None:
        import sqlalchemy

        if self.kind == "postgresql" and self._conn is None:
            self._conn = self.engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._conn.commit()
        elif self.kind == "sqlite" and self._fh is None:
            self._fh = open(f"{self._sqlite_path()}.claim-lock", "a+")
            fcntl.flock(self._fh, fcntl.LOCK_EX)

    def release(self) -> None:
        import sqlalchemy

        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()
            finally:
                conn.close()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def run_until(study, storage, objective: Callable[[Any], float], target: int, timeout_s: float | None = None,
              poll_s: float = 1.0) -> int:
    """Run trials of `study` (on the RDBStorage `storage`) in this process until it holds `target` done trials (or
    `timeout_s` passes); returns how many trials this process ran.

    While the other trials needed are RUNNING elsewhere, wait: one of them may go stale
    (its worker died) and come back as a WAITING retry that this worker then runs."""
    import optuna

    lock = ClaimLock(storage, study.study_name)
    ran = 0

    def claimed(trial):
        lock.release()  # the trial exists now (popped or created): let the other workers decide
        return objective(trial)

    t0 = time.monotonic()
    try:
        while timeout_s is None or time.monotonic() - t0 < timeout_s:
            lock.acquire()
            try:
                with warnings_off():
                    optuna.storages.fail_stale_trials(study)  # re-queues a dead worker's trial
                state = budget_state(study.get_trials(deepcopy=False))
                if state.done >= target:
                    return ran
                if state.waiting == 0 and state.done + state.running >= target:
                    lock.release()
                    time.sleep(poll_s)
                    continue
                study.optimize(claimed, n_trials=1, catch=(Exception,), gc_after_trial=True)
                ran += 1
            finally:
                lock.release()
        log.info("tune: worker stopped after %.0f s (timeout_s) with %d trials run", timeout_s, ran)
        return ran
    finally:
        lock.release()


@contextlib.contextmanager
def warnings_off():
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
