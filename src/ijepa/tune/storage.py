"""The Optuna storage and study: an RDB storage with heartbeats (SQLite writes serialised),
the pruner, and creating or continuing a study."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

from .config import TuneConfig

__all__ = ["redact", "storage_for", "config_storage", "pruner_for", "open_study"]


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url


def storage_for(url: str, heartbeat_interval: int = 60, grace_period: int = 300, stale_retries: int | None = 2):
    """An Optuna RDBStorage with heartbeats; sqlite files get their folder and a long lock
    timeout (several processes write to one file), other URLs are used as given.

    Heartbeats: every running trial's worker beats each `heartbeat_interval` s; a trial
    without a beat for `grace_period` s (its worker was killed, its machine lost) is marked
    FAIL by the next worker that starts a trial, and Optuna's RetryHeartbeatStaleTrialCallback
    queues the same point again (up to `stale_retries` times; 0: never)."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite:")
    if sqlite:
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level None: pysqlite leaves transactions to us (see _serialize_sqlite_writes)
        engine_kwargs = {"connect_args": {"timeout": 300, "isolation_level": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = (optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=stale_retries)
                 if stale_retries != 0 else None)
        try:
            with _schema_lock(url):
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None,
                                                     heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                     heartbeat_stale_trial_callback=retry)
        except ImportError as err:  # e.g. postgresql:// without psycopg2
            raise ImportError(f"Optuna storage {redact(url)}: the database driver is missing ({err.__cause__ or err}); "
                              f"for PostgreSQL: pip install psycopg2-binary") from err
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
    return storage


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """PostgreSQL: one worker at a time creates Optuna's tables. Workers started together on an
    empty database otherwise race in CREATE TABLE and all but one die with a UniqueViolation
    (seen with 4 workers). A session advisory lock, released when the connection closes."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


_SCHEMA_LOCK_KEY = 0x1E9A5C4E  # any fixed number: the lock is per database


def _serialize_sqlite_writes(engine) -> None:
    """Every transaction on `engine` starts with BEGIN IMMEDIATE (it takes the write lock).

    Optuna pops an enqueued trial by reading its state and setting it to RUNNING only if it
    was WAITING, with SELECT ... FOR UPDATE, which SQLite ignores; with pysqlite's deferred
    transactions two workers both read WAITING and both run the trial (optuna/optuna#4002;
    here: the base-masks trial ran twice and one worker died on "Cannot tell a COMPLETE
    trial"). With the lock taken at BEGIN the second worker reads RUNNING and moves on.
    This is SQLAlchemy's documented pysqlite recipe (isolation_level None + a "begin" hook)."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def config_storage(cfg: TuneConfig):
    """`storage_for` with the heartbeat settings of `cfg`."""
    return storage_for(cfg.storage, cfg.heartbeat_interval, cfg.grace_period, cfg.stale_retries)


def pruner_for(cfg: TuneConfig):
    """The pruner of `cfg.pruner`; its resource is the training step of a checkpoint."""
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.trial.eval_every - 1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.trial.eval_every, max_resource=cfg.trial.total_steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, seed_offset: int = 0, storage=None):
    """Create or load (`load_if_exists`) the study (on `storage`, default `config_storage(cfg)`);
    the sampler's seed also depends on how many trials the study already has, so a continued
    study does not repeat its points."""
    import optuna

    storage = storage if storage is not None else config_storage(cfg)
    existing = 0
    with contextlib.suppress(KeyError):
        existing = len(optuna.load_study(study_name=cfg.name, storage=storage).trials)
    seed = cfg.seed + seed_offset + existing
    sampler = (optuna.samplers.TPESampler(seed=seed) if cfg.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    return optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize", sampler=sampler,
                               pruner=pruner_for(cfg), load_if_exists=True)
