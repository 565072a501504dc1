"""Training survives its tracker: `BufferedTracker` sends to an MLflow run from a background
thread, so a tracking server that is unreachable, or stops during pretraining, never slows
or stops the training loop.

- Every call (metrics with the time they were logged, params, tags, artifacts) goes into an
  in-memory queue, in order; the sender thread sends the oldest item and removes it only
  once the server took it.
- A connection failure or a server error (5xx) keeps the item and retries every
  `retry_s` seconds; the first failure of an outage logs ONE warning, the recovery an info
  line with how many items were sent late. A request the server refuses (4xx: a bad value)
  is dropped with a warning, so one bad item cannot hold the queue.
- `close()` (the end of training) waits up to `flush_timeout_s` (env
  ``IJEPA_TRACKING_FLUSH_S``, default 120) for the queue to drain; what is left goes to a
  local fallback file (JSON lines, written atomically) with a warning naming it, and is sent
  by `replay_fallback` — automatically when a later run on the same folder starts (resume).

Each send attempt uses MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); lower them to notice a returning server sooner.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Mapping

from ijepa import atomic
from ijepa.tracking import MlflowTracker, Tracker

__all__ = ["BufferedTracker", "buffered", "replay_fallback", "FALLBACK_NAME"]

log = logging.getLogger(__name__)

FALLBACK_NAME = "tracking_fallback.jsonl"
ENV_FLUSH = "IJEPA_TRACKING_FLUSH_S"


def _refused(err: BaseException) -> bool:
    """True for a request the server answered with a client error (4xx): retrying cannot help."""
    status = getattr(err, "get_http_status_code", None)
    try:
        return status is not None and 400 <= int(status()) < 500
    except Exception:  # noqa: BLE001 - an odd exception type: treat as transient
        return False


def _send(tracker: MlflowTracker, item: dict[str, Any]) -> None:
    kind = item["kind"]
    if kind == "metrics":
        tracker.log_metrics(item["metrics"], item["step"], timestamp_ms=item["timestamp_ms"])
    elif kind == "params":
        tracker.log_params(item["params"])
    elif kind == "tag":
        tracker.set_tag(item["key"], item["value"])
    elif kind == "artifact":
        tracker.log_artifact(item["path"], item["artifact_path"])
    else:
        raise ValueError(f"unknown tracking item kind {kind!r}")


def replay_fallback(path: str | os.PathLike, tracking_uri: str | None = None) -> int:
    """Send the items of a fallback file to the run it names; delete the file once all are
    sent. Returns the number sent; raises on the first failure (the file stays)."""
    p = Path(path)
    lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    trackers: dict[str, MlflowTracker] = {}
    for i, item in enumerate(lines):
        run_id = item["run_id"]
        if run_id not in trackers:
            trackers[run_id] = MlflowTracker(run_id, tracking_uri or item.get("tracking_uri"))
        try:
            _send(trackers[run_id], item)
        except Exception:
            atomic.write_text(p, "".join(json.dumps(x) + "\n" for x in lines[i:]))  # keep only what is unsent
            raise
    p.unlink()
    return len(lines)


class BufferedTracker:
    """A `Tracker` over an `MlflowTracker` that never blocks nor raises (module docstring)."""

    def __init__(self, inner: MlflowTracker, fallback: str | os.PathLike | None = None,
                 flush_timeout_s: float | None = None, retry_s: float = 2.0):
        self.inner = inner
        self.fallback = Path(fallback) if fallback is not None else None
        self.flush_timeout_s = float(os.environ.get(ENV_FLUSH, 120)) if flush_timeout_s is None else flush_timeout_s
        self.retry_s = retry_s
        self.queue: deque[dict[str, Any]] = deque()
        self.sent = self.dropped = self.outages = self.max_backlog = 0
        self._deadline = float("inf")
        self._down = False
        self._closing = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ijepa-tracking", daemon=True)
        self._thread.start()

    # -- Tracker -------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put({"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items() if v is not None},
                   "step": int(step), "timestamp_ms": int(time.time() * 1000)})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put({"kind": "params", "params": json.loads(json.dumps(dict(params), default=str))})

    def set_tag(self, key: str, value: Any) -> None:
        self._put({"kind": "tag", "key": key, "value": str(value)})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    # -- sender --------------------------------------------------------------------------
    def _put(self, item: dict[str, Any]) -> None:
        item.update(run_id=self.inner.run_id, tracking_uri=self.inner.tracking_uri)
        with self._cv:
            self.queue.append(item)
            self.max_backlog = max(self.max_backlog, len(self.queue))
            self._cv.notify_all()

    def _run(self) -> None:
        if self.fallback is not None and self.fallback.exists():  # left by an earlier run on this folder
            try:
                n = replay_fallback(self.fallback, self.inner.tracking_uri)
                log.info("tracking: sent %d items left in %s by an earlier run", n, self.fallback)
            except Exception as err:  # noqa: BLE001 - still unreachable: the file stays for later
                log.warning("tracking: could not send %s yet (%s); it is kept", self.fallback, err)
        while True:
            with self._cv:
                while not self.queue and not self._closing:
                    self._cv.wait()
                if not self.queue:
                    return
                item = self.queue[0]
            try:
                _send(self.inner, item)
            except Exception as err:  # noqa: BLE001 - the training must not notice
                if _refused(err):
                    log.warning("tracking: the server refused a %s item, dropped: %s", item["kind"], err)
                    self.dropped += 1
                    self._pop(item)
                    continue
                if not self._down:
                    self._down, self.outages = True, self.outages + 1
                    log.warning("tracking server %s unreachable (%s: %s); training goes on, metrics are "
                                "buffered and sent when it is back", self.inner.tracking_uri, type(err).__name__,
                                str(err)[:300])
                with self._cv:
                    if self._closing and self._deadline_passed():
                        return
                    self._cv.wait(self.retry_s)
                continue
            if self._down:
                self._down = False
                log.info("tracking server %s reachable again; sending the buffered items", self.inner.tracking_uri)
            self.sent += 1
            self._pop(item)

    def _pop(self, item: dict[str, Any]) -> None:
        with self._cv:
            if self.queue and self.queue[0] is item:
                self.queue.popleft()
            self._cv.notify_all()

    def _deadline_passed(self) -> bool:
        return time.monotonic() >= self._deadline

    # -- end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Wait (bounded) until everything is sent; write what is not to the fallback file."""
        with self._cv:
            self._closing = True
            self._deadline = time.monotonic() + self.flush_timeout_s
            self._cv.notify_all()
        self._thread.join(self.flush_timeout_s + self.retry_s + 1)
        with self._cv:
            left = list(self.queue)
            self.queue.clear()
        if not left:
            return
        if self.fallback is None:
            log.warning("tracking: %d items could not be sent to %s and are lost", len(left), self.inner.tracking_uri)
            return
        old = self.fallback.read_text() if self.fallback.exists() else ""
        atomic.write_text(self.fallback, old + "".join(json.dumps(x) + "\n" for x in left))
        log.warning("tracking server %s still unreachable after %.0f s: %d items written to %s; they are sent when "
                    "a run on this folder starts again, or with ijepa.tracking_buffer.replay_fallback(%r)",
                    self.inner.tracking_uri, self.flush_timeout_s, len(left), self.fallback, str(self.fallback))


@contextlib.contextmanager
def buffered(tracker: Tracker | None, out_dir: str | os.PathLike) -> Iterator[Tracker | None]:
    """An MlflowTracker wrapped in a BufferedTracker (fallback file in `out_dir`), closed at
    the end; any other tracker as it is."""
    if not isinstance(tracker, MlflowTracker):
        yield tracker
        return
    buf = BufferedTracker(tracker, Path(out_dir) / FALLBACK_NAME)
    try:
        yield buf
    finally:
        buf.close()
