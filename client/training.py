"""The client side of training as a service: the request :class:`Client.train` sends, and the
:class:`TrainJob` it returns (``refresh``, ``cancel``, ``wait`` with progress).

``wait`` returns once the job ended; a job that failed or was cancelled raises
:class:`ClientError` with the job's error code (``job_cancelled`` for a cancelled one), so a
script never mistakes an unfinished profile for a served one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from xpeft.client.core import Call, ClientError, profile_path

__all__ = ["TERMINAL", "Example", "JobClient", "TrainJob", "job_path", "train_call"]
Example = dict[str, Any]  # {"text", "text_pair"?, "label"}
_FORMATS = {".tsv": "text/tab-separated-values", ".csv": "text/csv", ".jsonl": "application/jsonl"}
TERMINAL = ("succeeded", "failed", "cancelled")


def train_call(
    profile_id: str,
    examples: Sequence[Example] | None = None,
    file: str | Path | None = None,
    columns: dict[str, str] | None = None,
    **options: Any,
) -> Call:
    """``POST /profiles/{id}/train`` with JSON examples, or a labelled file and its column names."""
    path = profile_path(profile_id, "/train")
    if (examples is None) == (file is None):
        raise ClientError("bad_argument", "train needs examples or a file (one of them)")
    # one key per job: a POST resent after a dropped connection returns the job it created
    key = {"Idempotency-Key": uuid.uuid4().hex}
    if examples is not None:
        return Call("POST", path, {"json": {"examples": list(examples), **options}, "headers": key})
    file = Path(file)  # type: ignore[arg-type]
    media = _FORMATS.get(file.suffix.lower())
    if media is None:
        raise ClientError("bad_data", f"{file}: use a .tsv, .csv or .jsonl file")
    if not file.is_file():
        raise ClientError("not_found", f"no data file at {file}")
    params = {k: _query(v) for k, v in {**(columns or {}), **options}.items() if v is not None}
    return Call(
        "POST",
        path,
        {"content": file.read_bytes(), "params": params, "headers": {"Content-Type": media, **key}},
    )


def _query(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def job_path(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


class JobClient(Protocol):
    """What a :class:`TrainJob` asks of its client (``Client`` is one): a job's record, and its
    cancellation. A protocol, so that this module needs nothing from the client's."""

    def job(self, job_id: str) -> dict: ...

    def cancel_job(self, job_id: str) -> dict: ...


class TrainJob:
    """A training job on a server; ``record`` is its last known state (``GET /jobs/{id}``)."""

    def __init__(self, client: JobClient, record: dict) -> None:
        self.client = client
        self.record = record

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def state(self) -> str:
        return self.record["state"]

    def refresh(self) -> dict:
        self.record = self.client.job(self.id)
        return self.record

    def cancel(self) -> dict:
        self.record = self.client.cancel_job(self.id)
        return self.record

    def wait(
        self,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the job ends; ``on_progress`` sees each record. The final record of a success
        (``result.version`` is the stored version, or the kept one when ``result.stored`` is false)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.refresh()
            if on_progress is not None:
                on_progress(record)
            if record["state"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError("timeout", f"job {self.id} is still {record['state']} after {timeout:g} s")
            time.sleep(poll_s)
        if record["state"] == "cancelled":
            raise ClientError(
                "job_cancelled", f"job {self.id} was cancelled; nothing was stored", body=record
            )
        if record["state"] == "failed":
            error = record.get("error") or {}
            raise ClientError(
                error.get("code", "job_failed"), error.get("message", "the job failed"), body=record
            )
        return record
