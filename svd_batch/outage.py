"""A source of images that is down is an error of the run, not of each of its rows.

Without this rule an S3 bucket that goes away mid-run (or credentials that are wrong from the start) makes
every remaining row fail one by one, each after its own timeout, and records them all as failed: minutes
of work for nothing, and a rerun that then says "nothing left to do". Here a rank's rows whose image could not
be read for a reason of the *source* (connection refused or reset, timeouts, name resolution, HTTP 5xx;
permission: HTTP 401/403, AccessDenied, bad or missing credentials) are held back instead of recorded, per
source (``s3://bucket``, ``https://host:port``, a local folder). A row of that source that works releases
them: those were the rows' own failures, recorded as such. After ``failures`` such rows in a row the source
is retried with backoff for up to ``wait_seconds``: if it answers again, the run goes on (the held rows are
not recorded: the next run does them); if not, ``SourceOutage`` stops the run (exit code 5, executor.EXIT_SOURCE)
and no row is recorded as failed for the outage.

The guard sees each row once, just before it would be recorded (the writer thread), so it needs no lock.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .util import first_line


# Phrases of the one-line errors of images.py / remote.py (and the libraries they quote) that blame the source.
CONNECTION = re.compile(
    r"connection refused|connection reset|connection aborted|ConnectionRefused|ConnectionReset|"
    r"EndpointConnectionError|could not connect|ClientConnectorError|ServerDisconnected|RemoteDisconnected|"
    r"name or service not known|temporary failure in name resolution|nodename nor servname|no route to host|"
    r"network is unreachable|timed out|timeout|did not finish within|broken pipe|"
    r"HTTP 5\d\d|\(5\d\d\)|ServiceUnavailable|SlowDown|InternalError", re.I)
PERMISSION = re.compile(
    r"HTTP 40[13]\b|\(40[13]\)|forbidden|AccessDenied|access denied|InvalidAccessKeyId|SignatureDoesNotMatch|"
    r"ExpiredToken|InvalidToken|unauthori[sz]ed|PermissionError|permission denied|NoCredentialsError|"
    r"unable to locate credentials", re.I)
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
CELL_PREFIX = "parquet://"  # embedded.PREFIX: an image inside a manifest shard belongs to the shard's source


class SourceOutage(Exception):
    """A source of images failed ``failures`` rows in a row and did not come back while retried: the run stops
    (exit code 5); no row was recorded as failed for it."""


def failure_kind(error: str) -> str | None:
    """'permission' or 'connection' when the error blames the source, None when it is the row's own (not found,
    not an image, too big, ...)."""
    if PERMISSION.search(error):
        return "permission"
    if CONNECTION.search(error):
        return "connection"
    return None


def source_of(uri: str) -> str:
    """Where an image comes from, as the unit of an outage: ``scheme://host`` (the bucket for s3://, gs://),
    the shard's source for an image inside the manifest, else the local folder."""
    if uri.startswith(CELL_PREFIX):
        uri = uri[len(CELL_PREFIX):].rpartition("#")[0]
    m = URL.match(uri)
    if m:
        return f"{m.group(1).lower()}://{m.group(2)}"
    return os.path.dirname(os.path.abspath(uri)) or "/"


@dataclass
class _Source:
    held: list[Any] = field(default_factory=list)  # rows not recorded yet, in order
    last_error: str = ""
    suspect: bool = False  # it was down: its failures until its next success are the outage's, not the rows'


class OutageGuard:
    """Decides which rows are recorded now (see the module docstring).

    ``probe(uri)`` reads one image again and raises on failure; ``failures`` 0 turns the rule off; ``stopped()``
    true (SIGINT/SIGTERM) ends a wait at once, leaving the held rows for the next run."""

    def __init__(self, probe: Callable[[str], Any], *, failures: int = 5, wait_seconds: float = 120.0,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, max_delay: float = 30.0,
                 stopped: Callable[[], bool] = lambda: False):
        self.probe, self.failures, self.wait_seconds = probe, int(failures), float(wait_seconds)
        self.log, self.sleep, self.clock, self.max_delay = log, sleep, clock, max_delay
        self.stopped = stopped
        self.sources: dict[str, _Source] = {}
        self.not_recorded = 0  # rows that failed while their source was down: the next run does them

    def screen(self, rows: Iterable[tuple[str, str | None, Any]]) -> list[Any]:
        """``(image uri, load error or None, row)`` for rows about to be recorded -> the rows to record now."""
        out: list[Any] = []
        for uri, error, row in rows:
            kind = failure_kind(error.replace(uri, "")) if (error and self.failures > 0) else None
            src = self.sources.get(source_of(uri)) if kind is None else self.sources.setdefault(source_of(uri), _Source())
            if kind is None:
                if src is not None:  # the source answered (a success, or a failure of the row's own)
                    out += self._release(src)
                    src.suspect = False
                out.append(row)
                continue
            src.held.append(row)
            src.last_error = error
            if len(src.held) >= self.failures:
                self._wait_for(source_of(uri), uri, kind, src)
        return out

    def release(self) -> list[Any]:
        """At the end of a rank's work: rows held below the threshold failed on their own; record them."""
        out: list[Any] = []
        for src in self.sources.values():
            out += self._release(src)
        return out

    def _pause(self, seconds: float) -> None:
        """Sleep, a second at a time, so that a stop of the run is noticed within a second."""
        end = self.clock() + seconds
        while not self.stopped() and self.clock() < end:
            self.sleep(min(1.0, end - self.clock()))

    def _release(self, src: _Source) -> list[Any]:
        rows, src.held = src.held, []
        if src.suspect:  # they failed while the source was down or coming back
            self.not_recorded += len(rows)
            return []
        return rows

    def _wait_for(self, name: str, uri: str, kind: str, src: _Source) -> None:
        """Back off and probe the source until it answers (the run goes on) or wait_seconds pass (SourceOutage)."""
        n = len(src.held)
        self.log(f"svd-batch: the image source {name} failed {n} rows in a row ({kind}: {src.last_error}); "
                 f"retrying it for up to {self.wait_seconds:g} s before stopping the run")
        started, delay, error = self.clock(), 1.0, src.last_error
        while True:
            left = self.wait_seconds - (self.clock() - started)
            if left > 0:
                self._pause(min(delay, left, self.max_delay))
                delay *= 2
            if self.stopped():  # the run is being stopped: it ends as interrupted, these rows left undone
                src.suspect = True
                self._release(src)
                return
            try:
                self.probe(uri)
                error = None
            except Exception as exc:  # noqa: BLE001 - any failure to read is an answer too: classify it
                error = str(exc)
                if failure_kind(error.replace(uri, "")) is None:
                    error = None  # it answers (the image itself is bad): the source is back
            if error is None:
                self.log(f"svd-batch: the image source {name} answers again after {self.clock() - started:.0f} s; "
                         f"the {n} rows that failed while it was down are not recorded: run the same command "
                         "again afterwards to do them")
                src.suspect = True
                self._release(src)
                return
            if self.clock() - started >= self.wait_seconds:
                break
        raise SourceOutage(
            f"the image source {name} failed {n} rows in a row and still failed after retrying it for "
            f"{self.clock() - started:.0f} s ({kind}: {first_line(error)}), so the run stops: a source that is down "
            "or refuses access is an error of the run, not of its rows. No row was recorded as failed for it. "
            + ("Check the credentials (for S3: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; for the Hub: "
               "HF_TOKEN) and the permissions on the images, " if kind == "permission" else
               "Check that the server or bucket is up and reachable from this host, ")
            + "then run the same command again: it does every row not done. (images.outage_failures="
            f"{self.failures} rows in a row start this, images.outage_wait={self.wait_seconds:g} s of retrying "
            "end it; images.outage_failures=0 records such rows as failed instead.)")

