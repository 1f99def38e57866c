"""What the route handlers share: the app's state and job service, and the checks of the ids in
a path, each answering with its own stable error code."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fastapi import Path, Request

from xpeft.server.errors import ApiError
from xpeft.server.jobs.records import JOB_ID
from xpeft.server.settings import PROFILE_ID_PATTERN

if TYPE_CHECKING:
    from xpeft.server.jobs.service import JobService
    from xpeft.server.state import ServerState

__all__ = [
    "PROFILE_ID",
    "JobIdPath",
    "ProfileIdPath",
    "check_job_id",
    "check_profile_id",
    "job_service",
    "server_state",
]
PROFILE_ID = re.compile(PROFILE_ID_PATTERN)

# The pattern is in the OpenAPI schema; check_profile_id enforces it with the code invalid_profile_id.
_ID_DOC = "1 to 128 characters: letters, digits, '.', '_', '-'; the first a letter or digit"
ProfileIdPath = Path(..., description=_ID_DOC, json_schema_extra={"pattern": PROFILE_ID_PATTERN})
_JOB_DOC = "the job id that POST /profiles/{id}/train answered (20 hex digits)"
JobIdPath = Path(..., description=_JOB_DOC, json_schema_extra={"pattern": JOB_ID.pattern})


def server_state(request: Request) -> ServerState:
    """The state of the app that received ``request``."""
    return request.app.state.server


def job_service(request: Request) -> JobService:
    """The training job service of the app that received ``request``."""
    return request.app.state.jobs


def check_profile_id(profile_id: str) -> str:
    """``profile_id``, or 422 ``invalid_profile_id`` when it does not match the id pattern."""
    if not PROFILE_ID.fullmatch(profile_id):
        raise ApiError(
            422,
            "invalid_profile_id",
            f"profile ids match {PROFILE_ID.pattern} (1 to 128 characters); got {profile_id[:200]!r}",
        )
    return profile_id


def check_job_id(job_id: str) -> str:
    """``job_id``, or 422 ``invalid_job_id`` when it is not 20 hex digits."""
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(422, "invalid_job_id", f"job ids are 20 hex digits; got {job_id[:100]!r}")
    return job_id
