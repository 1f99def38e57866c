"""Training as a service over HTTP: ``POST /profiles/{id}/train`` and ``/jobs``.

Auth is ``PUT``'s: the admin token (or, without one, loopback clients only), or a tenant token
for profile ids under its prefixes. Reading a job is a profile read (the API token too); listing
every job needs the API or admin token. The body is read only after the token check and is
validated completely (:mod:`xpeft.server.jobs.request`) before anything is queued.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from xpeft.server.auth import require_reader
from xpeft.server.deps import (
    JobIdPath,
    ProfileIdPath,
    check_job_id,
    check_profile_id,
    job_service,
    server_state,
)
from xpeft.server.errors import ApiError, CorruptRecord
from xpeft.server.jobs.records import JOB_ID
from xpeft.server.jobs.request import parse_train_request
from xpeft.server.schemas import ErrorBody

router = APIRouter()
# record fields that are the operator's business: the trainer's host, pid and token, the tenant
# key, the hash of the idempotency key
_HIDDEN = ("worker", "tenant", "idempotency")
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,128}")


class JobView(BaseModel):
    """A training job: state, progress and (once it ended) its result or error."""

    model_config = ConfigDict(extra="allow")
    id: str
    profile_id: str
    state: str = Field(..., description="queued, running, succeeded, failed or cancelled")
    progress: dict | None = Field(None, description="step, total, loss, train_accuracy, eta_s, phase")
    result: dict | None = Field(
        None, description="version, eval_accuracy, stored (false: the current version was kept)"
    )
    error: dict | None = Field(None, description="code and message of a failed job")


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


def check_train(request: Request, profile_id: str) -> None:
    """Writes: the admin token, or a tenant token whose prefixes cover ``profile_id``."""
    auth = server_state(request).auth
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if auth.admin is not None and scheme.lower() == "bearer" and token:
        given = token.encode()
        if not hmac.compare_digest(given, auth.admin):
            prefixes = auth._tenant(given)  # noqa: SLF001 - the one place tenants may write
            if prefixes is not None:
                if profile_id.startswith(prefixes):
                    return
                raise ApiError(
                    403,
                    "forbidden",
                    "this token may not train that profile: its id has none of the token's prefixes",
                )
    auth.check_admin(request)


def _view(request: Request, record: dict) -> dict:
    """The record as shown; a success this replica had not seen invalidates its cache now."""
    result = record.get("result") or {}
    if record["state"] == "succeeded" and result.get("stored") and isinstance(result.get("version"), int):
        server_state(request).profiles.invalidate(record["profile_id"], result["version"])
    return {k: v for k, v in record.items() if k not in _HIDDEN}


async def _job(request: Request, job_id: str) -> dict:
    record = await asyncio.to_thread(job_service(request).get, check_job_id(job_id))
    if record is None:
        raise ApiError(
            404, "job_not_found", f"no job with id {job_id!r} (finished jobs are kept for a while)"
        )
    return record


@router.post(
    "/profiles/{profile_id}/train",
    status_code=202,
    response_model=JobView,
    tags=["training"],
    responses={415: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "JSON {examples: [{text, text_pair?, label}], method?, epochs?, eval_fraction?, "
            "keep_if_better?, ...}, or a .tsv/.csv/.jsonl file with options as query parameters",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/tab-separated-values": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
                "application/jsonl": {"schema": {"type": "string"}},
            },
        }
    },
)
async def train(request: Request, response: Response, profile_id: str = ProfileIdPath) -> dict:
    """Queue a training job for this profile: 202 with the job and its Location; nothing is
    queued unless every example and option is valid."""
    check_profile_id(profile_id)
    check_train(request, profile_id)
    state = server_state(request)
    raw = await request.body()
    parsed = await asyncio.to_thread(
        parse_train_request,
        raw,
        request.headers.get("content-type"),
        request.query_params,
        state.settings,
        state.bank.num_adapters,
        state.bank.bottleneck,
    )
    try:
        tenant = state.auth.tenant_key(request, profile_id)
        key = request.headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise ApiError(
                422, "invalid_request", "Idempotency-Key must be 1 to 128 printable ASCII characters"
            )
        record, created = await asyncio.to_thread(
            job_service(request).submit_once, profile_id, parsed, tenant, key
        )
    except ApiError as exc:
        if exc.code == "too_many_jobs":
            state.metrics.train_jobs.labels("refused").inc()
        raise
    if created:
        state.metrics.train_jobs.labels("queued").inc()
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{record['id']}"
    return _view(request, record)


def _not_theirs() -> ApiError:
    return ApiError(403, "forbidden", "this token may not use that job (or there is no such job)")


async def _tenant_job(request: Request, job_id: str, prefixes: tuple[str, ...] | None) -> dict:
    """The record, for a caller whose token was checked already. A tenant gets the same 403 for
    another tenant's job, a damaged record and an id that does not exist: no existence oracle."""
    try:
        record = await _job(request, job_id)
    except (ApiError, CorruptRecord):
        if prefixes is not None:
            raise _not_theirs() from None
        raise
    if prefixes is not None and not record["profile_id"].startswith(prefixes):
        raise _not_theirs()
    return record


@router.get(
    "/jobs/{job_id}", response_model=JobView, tags=["training"], responses={404: {"model": ErrorBody}}
)
async def get_job(request: Request, job_id: str = JobIdPath) -> dict:
    """A job's state, progress, and result or error."""
    prefixes = server_state(request).auth.tenant_of(request)  # 401 / 403 before anything is read
    return _view(request, await _tenant_job(request, check_job_id(job_id), prefixes))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    tags=["training"],
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def cancel_job(
    request: Request,
    job_id: str = JobIdPath,
    purge: bool = Query(
        False, description="admin only: delete the job's record whatever its state (a damaged one too)"
    ),
) -> dict:
    """Cancel: a queued job ends cancelled at once; a running one stops at its next step
    (``cancel_requested`` until then). Nothing is stored for a cancelled job. ``?purge=true``
    (admin token) deletes the record instead, so that an operator can remove a damaged one."""
    check_job_id(job_id)
    auth = server_state(request).auth
    if purge:
        auth.check_admin(request)
        if not await asyncio.to_thread(job_service(request).purge, job_id):
            raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
        return {"id": job_id, "profile_id": "", "state": "purged", "purged": True}
    prefixes: tuple[str, ...] | None = None
    if auth.admin is None or not request.headers.get("authorization"):
        check_train(request, "")  # protected mode, or 401 without a token: before anything is read
    else:
        prefixes = auth.tenant_of(request)  # a bogus token: 403 before anything is read
        if prefixes is None:
            check_train(request, "")  # the API token may not write
    record = await _tenant_job(request, job_id, prefixes)
    check_train(request, record["profile_id"])
    if record["state"] in ("succeeded", "failed"):
        raise ApiError(
            409, "job_finished", f"the job already ended: {record['state']}", state=record["state"]
        )
    updated = await asyncio.to_thread(job_service(request).cancel, job_id)
    if updated is not None:  # this request cancelled it (or asked its worker to stop)
        server_state(request).metrics.train_jobs.labels("cancelled").inc()
    return _view(request, updated or record)


@router.get("/jobs", response_model=JobList, dependencies=[Depends(require_reader)], tags=["training"])
async def list_jobs(
    request: Request,
    cursor: str | None = Query(
        None,
        description="next_cursor of the last page (a job id)",
        json_schema_extra={"pattern": JOB_ID.pattern},
    ),
    limit: int | None = Query(
        None, ge=1, description="page size (default 100, at most XPEFT_MAX_LIST_LIMIT)"
    ),
) -> dict:
    """Jobs, newest first, one page at a time."""
    settings = server_state(request).settings
    limit = limit or min(100, settings.max_list_limit)
    if limit > settings.max_list_limit:
        raise ApiError(422, "invalid_request", f"limit must be at most {settings.max_list_limit}")
    if cursor is not None:
        check_job_id(cursor)
    records, next_cursor = await asyncio.to_thread(job_service(request).list, cursor, limit)
    views: list[dict] = []
    budget = settings.max_jobs_page_bytes
    for record in records:
        view = _view(request, record)
        budget -= len(json.dumps(view, ensure_ascii=False).encode())
        if budget < 0 and views:  # a page bounded in bytes too: the rest come on the next page
            return {"jobs": views, "next_cursor": views[-1]["id"]}
        views.append(view)
    return {"jobs": views, "next_cursor": next_cursor}
