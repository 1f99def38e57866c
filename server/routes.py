"""The HTTP routes: profiles, predictions and the operational endpoints.

Each handler reaches the app's :class:`~xpeft.server.state.ServerState` through
:func:`~xpeft.server.deps.server_state`; auth runs as a dependency, before any body is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import pydantic_core
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xpeft.adapters.encoder import TextInput
from xpeft.engine.batcher import Job, Overloaded
from xpeft.engine.fair import TooCostly
from xpeft.server.auth import require_admin, require_profile_access, require_reader
from xpeft.server.conditional import PRECONDITION_RESPONSES, not_modified, write_condition
from xpeft.server.deps import ProfileIdPath, check_profile_id, job_service, server_state
from xpeft.server.errors import ApiError, allowed_methods, etag
from xpeft.server.middleware import START_KEY, by_deadline
from xpeft.server.model import backend_name, kernel_report
from xpeft.server.schemas import (
    BodyError,
    ErrorBody,
    Health,
    PredictResponse,
    ProfileList,
    ProfileMeta,
    PutAnswer,
    parse_predict_request,
)
from xpeft.server.settings import PROFILE_ID_PATTERN, Settings
from xpeft.server.uploads import validate_profile

if TYPE_CHECKING:
    from xpeft.server.state import ServerState

log = logging.getLogger("xpeft.server")

router = APIRouter()
_OCTET_BODY = {
    "requestBody": {
        "required": True,
        "description": "the .xpm profile file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _not_found(profile_id: str) -> ApiError:
    return ApiError(404, "profile_not_found", f"no profile with id {profile_id!r}")


@router.put(
    "/profiles/{profile_id}",
    response_model=PutAnswer,
    dependencies=[Depends(require_admin)],
    openapi_extra=_OCTET_BODY,
    tags=["profiles"],
    responses={
        201: {"model": PutAnswer, "description": "created"},
        409: {"model": ErrorBody},
        **PRECONDITION_RESPONSES,
    },
)
async def put_profile(request: Request, response: Response, profile_id: str = ProfileIdPath) -> dict:
    """Upload (create or replace) a profile: 201 when new, 200 when replaced or unchanged; nothing is
    stored if refused. ``If-Match`` replaces only that version, ``If-None-Match: *`` only creates."""
    check_profile_id(profile_id)
    condition = write_condition(request, create_allowed=True)
    state = server_state(request)
    data = await request.body()
    meta = await asyncio.to_thread(validate_profile, data, state.bank, state.settings.max_labels)
    result = await state.metrics.timed_store("put", state.store.put(profile_id, data, meta, condition))
    if not result.unchanged:  # this replica reads its own write at once; an unchanged put changed nothing
        state.profiles.invalidate(profile_id, result.record.version)
    response.status_code = 201 if result.created else 200
    response.headers["ETag"] = etag(result.record.version)
    return {**result.record.as_dict(), "unchanged": result.unchanged}


@router.get(
    "/profiles/{profile_id}",
    response_model=ProfileMeta,
    dependencies=[Depends(require_profile_access)],
    tags=["profiles"],
    responses={304: {"description": "If-None-Match named the current version"}, 404: {"model": ErrorBody}},
)
async def get_profile(request: Request, response: Response, profile_id: str = ProfileIdPath) -> object:
    """A profile's metadata and current version (``ETag``: that version)."""
    check_profile_id(profile_id)
    state = server_state(request)
    record = await state.metrics.timed_store("get_record", state.store.get_record(profile_id))
    if record is None:
        raise _not_found(profile_id)
    response.headers["ETag"] = etag(record.version)
    return not_modified(request, record.version) or record.as_dict()


@router.get(
    "/profiles/{profile_id}/file",
    dependencies=[Depends(require_profile_access)],
    tags=["profiles"],
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the stored .xpm bytes, exactly as uploaded (a backup, or a move to another deployment)",
        },
        304: {"description": "If-None-Match named the current version"},
        404: {"model": ErrorBody},
    },
)
async def get_profile_file(request: Request, profile_id: str = ProfileIdPath) -> Response:
    """The stored profile file, byte for byte; ``ETag`` is its version, as on the metadata."""
    check_profile_id(profile_id)
    state = server_state(request)
    stored = await state.metrics.timed_store("get", state.store.get(profile_id))
    if stored is None:
        raise _not_found(profile_id)
    unmodified = not_modified(request, stored.version)
    if unmodified is not None:
        return unmodified
    return Response(
        stored.data,
        media_type="application/octet-stream",
        headers={
            "ETag": etag(stored.version),
            "Content-Disposition": f'attachment; filename="{profile_id}.xpm"',
        },
    )


@router.delete(
    "/profiles/{profile_id}",
    dependencies=[Depends(require_admin)],
    tags=["profiles"],
    responses={404: {"model": ErrorBody}, **PRECONDITION_RESPONSES},
)
async def delete_profile(request: Request, profile_id: str = ProfileIdPath) -> dict:
    """Delete a profile (``If-Match``: only that version); every replica stops serving it within a second."""
    check_profile_id(profile_id)
    condition = write_condition(request, create_allowed=False)
    state = server_state(request)
    deleted = await state.metrics.timed_store("delete", state.store.delete(profile_id, condition))
    if deleted is None:
        raise _not_found(profile_id)
    state.profiles.invalidate(profile_id, deleted)
    return {"id": profile_id, "deleted": True, "version": deleted}


@router.get(
    "/profiles", response_model=ProfileList, dependencies=[Depends(require_reader)], tags=["profiles"]
)
async def list_profiles(
    request: Request,
    cursor: str | None = Query(
        None,
        description="next_cursor of the last page (a profile id)",
        json_schema_extra={"pattern": PROFILE_ID_PATTERN},
    ),
    limit: int | None = Query(
        None, ge=1, description="page size (default 100, at most XPEFT_MAX_LIST_LIMIT)"
    ),
) -> dict:
    """Profiles in id order, one page at a time."""
    state = server_state(request)
    limit = limit or min(100, state.settings.max_list_limit)
    if limit > state.settings.max_list_limit:
        raise ApiError(422, "invalid_request", f"limit must be at most {state.settings.max_list_limit}")
    if cursor is not None:
        check_profile_id(cursor)
    records, next_cursor = await state.metrics.timed_store("list", state.store.list(cursor, limit))
    return {"profiles": [r.as_dict() for r in records], "next_cursor": next_cursor}


async def _inputs(request: Request, settings: Settings) -> tuple[list[TextInput], float | None]:
    """Read the body only now, after the token check (a dependency), and parse it with its sizes
    checked first (see :func:`parse_predict_request`): the inputs and the operating point."""
    raw = await request.body()
    try:
        return parse_predict_request(
            raw, request.headers.get("content-type"), settings.max_inputs, settings.max_text_chars
        )
    except BodyError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


_JSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    }
}


@router.post(
    "/profiles/{profile_id}/predict",
    response_model=PredictResponse,
    openapi_extra=_JSON_BODY,
    tags=["predict"],
    responses={404: {"model": ErrorBody}, 413: {"model": ErrorBody}, 504: {"model": ErrorBody}},
)
async def predict(request: Request, profile_id: str = ProfileIdPath) -> Response:
    """Labels and scores for each input, all from one version of the profile; timing headers say
    where the time went (queue, inference), as text-embeddings-inference reports them.

    The hot path of the server, so it does by hand what a dependency and the response model would
    do: the access check before the body is read, and the answer encoded once, in the response
    model's shape (``PredictResponse``, which OpenAPI shows), without validating it again.
    """
    state = server_state(request)
    state.auth.check_profile(request, profile_id)
    check_profile_id(profile_id)
    inputs, min_confidence = await _inputs(request, state.settings)
    if not state.model_ready:
        raise ApiError(
            503, "not_ready", state.model_error or "the model is still loading", headers={"Retry-After": "1"}
        )
    timeout = state.settings.request_timeout_s
    tenant = state.auth.tenant_key(request, profile_id)
    computing = time.perf_counter()
    try:  # one deadline for all of it: store lookup, queue and forward
        answer, job = await by_deadline(
            asyncio.get_running_loop().time() + timeout,
            _predict(state, profile_id, inputs, min_confidence, tenant),
        )
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from exc
    except TooCostly as exc:
        raise ApiError(413, "too_many_tokens", str(exc), cost=exc.cost, limit=exc.limit) from None
    return Response(
        pydantic_core.to_json(answer),
        media_type="application/json",
        headers=_timing_headers(request, state, job, inputs, computing),
    )


async def _predict(
    state: ServerState,
    profile_id: str,
    inputs: list[TextInput],
    min_confidence: float | None = None,
    tenant: str = "",
) -> tuple[dict, Job]:
    entry = await state.profiles.get(profile_id)
    if entry is None:
        raise _not_found(profile_id)
    try:
        job = state.batcher.submit_job(entry, inputs, tenant)
    except Overloaded as exc:
        raise ApiError(
            503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}
        ) from exc
    predictions = await job.future
    if min_confidence is not None:  # this request's own operating point
        predictions = [p.at_operating_point(entry.profile, min_confidence) for p in predictions]
    state.metrics.count_abstentions(profile_id, sum(p.abstained for p in predictions))
    answer = {
        "profile": profile_id,
        "version": entry.version,
        # PredictionOut's fields in its order; confidence is null without a rule
        "predictions": [{**p.as_dict(), "confidence": p.confidence} for p in predictions],
    }
    return answer, job


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


def _timing_headers(
    request: Request, state: ServerState, job: Job, inputs: list[TextInput], computing: float
) -> dict[str, str]:
    """TEI's timing headers (whole milliseconds), plus ``Server-Timing`` with fractions of one.

    tokenization: its inputs on the tokenizer thread; queue: tokenized until its batch started;
    inference: that batch's run (fusion of its cold profiles, padding and one forward); compute:
    this handler from the parsed body to the answer (profile lookup, tokenization, queue,
    inference); total: from the request's arrival.
    """
    done = time.perf_counter()
    tokenization_s = (job.tokenized - job.enqueued) if job.tokenized is not None else 0.0
    queue_s = (job.started or done) - job.queued
    inference_s = job.run_s or 0.0
    total_s = done - request.scope.get(START_KEY, computing)
    chars = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in inputs)
    return {
        "x-compute-type": state.worker.device_type,
        "x-compute-characters": str(chars),
        "x-compute-time": _ms(done - computing),
        "x-tokenization-time": _ms(tokenization_s),
        "x-queue-time": _ms(queue_s),
        "x-inference-time": _ms(inference_s),
        "x-total-time": _ms(total_s),
        "Server-Timing": (
            f"tokenization;dur={tokenization_s * 1000:.3f}, "
            f"queue;dur={queue_s * 1000:.3f}, inference;dur={inference_s * 1000:.3f}, "
            f"compute;dur={(done - computing) * 1000:.3f}, total;dur={total_s * 1000:.3f}"
        ),
    }


@router.api_route("/profiles/{rest:path}", methods=["GET", "PUT", "DELETE", "POST"], include_in_schema=False)
async def bad_profile_path(rest: str, request: Request) -> None:
    """Ids with a slash (or other paths under /profiles/): a clear refusal instead of a bare 404.

    A path that the schema documents (``/profiles/{id}/predict``, ``/file``, ...) with another
    method is 405 with the ``Allow`` of that path; anything else names the id's rule.
    """
    allowed = allowed_methods(request)
    if allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
            headers={"Allow": allowed},
        )
    check_profile_id(rest)
    raise ApiError(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed on a profile",
        headers={"Allow": "DELETE, GET, PUT"},
    )


@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz(request: Request) -> dict:
    """The process is alive (and its model did not fail to load)."""
    state = server_state(request)
    if state.model_error:
        raise ApiError(503, "model_failed", state.model_error)
    return {"status": "ok", "detail": {"model_loaded": state.model_ready}}


@router.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict:
    """Ready to predict: the model is loaded and the store answers."""
    state = server_state(request)
    if state.admission.draining:
        raise ApiError(503, "shutting_down", "this replica is shutting down", headers={"Retry-After": "1"})
    if not state.model_ready:
        raise ApiError(
            503, "not_ready", state.model_error or "the model is still loading", headers={"Retry-After": "1"}
        )
    store_state = await state.metrics.timed_store("ping", state.store.ping())
    model = state.worker.model
    assert model is not None
    return {
        "status": "ready",
        "detail": {
            "store": state.store.kind,
            **({"store_state": store_state} if store_state else {}),
            "bank_id": state.bank.bank_id,
            "model_id": model.encoder.model_id,
            "model": model.encoder.name,
            "device": str(model.encoder.device),
            "kernels": kernel_report(model),
            "backend": backend_name(model),
        },
    }


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state = server_state(request)
    state.metrics.job_ends.update(await _job_ends(request))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _job_ends(request: Request) -> dict[str, int] | None:
    """The job store's counts of ended jobs; ``None`` (the series left out of this scrape) while
    the store does not answer: a scrape never fails for it, and readiness reports the store."""
    try:
        return await asyncio.to_thread(job_service(request).ended_counts)
    except Exception as exc:  # any store client's error: the scrape goes on without the series
        log.debug("metrics: job counts unavailable: %s", exc)
        return None
