"""MLflow runs left RUNNING by a process that was killed (SIGKILL, OOM, a lost machine).

MLflow marks a run finished only when its process ends it, so a stage or an Optuna worker killed
mid-run leaves its run RUNNING forever. Every run we open carries the tag `PROCESS_TAG`
("host:pid:start time" of the process that writes it); the next stage or worker that starts in
the same experiment ends such runs of this host whose process is gone (`mark_dead_runs`, status
KILLED, tag `stale_reason`). A run of another host cannot be checked from here and stays as it is;
the Optuna trial runs of other hosts are ended by the study (ijepa.tune: the trial the heartbeat
failed).
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, Iterable

__all__ = ["PROCESS_TAG", "STALE_TAG", "process_tag", "process_alive", "mark_dead_runs", "running_runs"]

log = logging.getLogger(__name__)

PROCESS_TAG = "process"
STALE_TAG = "stale_reason"


def _start_time(pid: int) -> str | None:
    """The process's start time (a pid is reused; pid + start time is not), None when it is gone."""
    try:
        import psutil  # MLflow's system metrics need it too

        return f"{psutil.Process(pid).create_time():.2f}"
    except ImportError:  # pragma: no cover - psutil ships with mlflow and dvc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    except Exception:  # psutil.NoSuchProcess, AccessDenied on a zombie, ...
        return None


def process_tag(pid: int | None = None) -> str:
    """"host:pid:start time" of this process (or of `pid`)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def process_alive(tag: str) -> bool | None:
    """Whether the process of a `process_tag` still runs; None when it ran on another host (or the
    tag is not ours)."""
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    now = _start_time(int(pid))
    if now is None:
        return False
    return started in ("?", "None") or now == "?" or now == started


def running_runs(client: Any, experiment_ids: Iterable[str], filter_string: str = "") -> list:
    """RUNNING runs of the experiments (and of `filter_string`, MLflow's search syntax)."""
    query = "attributes.status = 'RUNNING'" + (f" and {filter_string}" if filter_string else "")
    return list(client.search_runs(list(experiment_ids), filter_string=query, max_results=1000))


def mark_dead_runs(client: Any, experiment_ids: Iterable[str], exclude: Iterable[str] = (),
                   alive: Callable[[str], bool | None] = process_alive, status: str = "KILLED") -> list[str]:
    """End (with `status`) the RUNNING runs of the experiments whose process is gone; returns
    their ids. Runs without a process tag, of other hosts, or in `exclude` are left alone."""
    skip, ended = set(exclude), []
    for run in running_runs(client, experiment_ids):
        tag = run.data.tags.get(PROCESS_TAG)
        if run.info.run_id in skip or not tag or alive(tag) is not False:
            continue
        client.set_tag(run.info.run_id, STALE_TAG,
                       f"its process {tag} was gone when {process_tag()} started: marked {status}")
        client.set_terminated(run.info.run_id, status)
        ended.append(run.info.run_id)
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone: marked %s",
                    run.info.run_id, run.info.run_name, tag, status)
    return ended
