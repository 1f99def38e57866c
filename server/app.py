"""The FastAPI app factory: wiring of store, caches, batcher, worker and routes; no globals.

``create_app(settings)`` loads the bank and opens the store at once (so a wrong path fails
before the server listens); the encoder loads in the background after startup, so ``/healthz``
answers immediately and ``/readyz`` turns 200 once predictions can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from xpeft.adapters.errors import XPeftError
from xpeft.adapters.kernels import KernelChoice
from xpeft.engine.batcher import MicroBatcher
from xpeft.engine.cache import FusedCache, VersionFloors
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.server import telemetry
from xpeft.server.auth import Authorizer, check_exposure
from xpeft.server.cache import ProfileCache
from xpeft.server.errors import ApiError, install_error_handlers
from xpeft.server.fastpath import PredictFastPath
from xpeft.server.jobs.service import JobService
from xpeft.server.metrics import Metrics
from xpeft.server.middleware import (
    Admission,
    AdmissionMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    redact_access_log,
)
from xpeft.server.model import attach_backend, backend_name, build_model, kernel_report, load_bank
from xpeft.server.routes import router
from xpeft.server.schemas import ErrorBody, PredictRequest
from xpeft.server.settings import Settings
from xpeft.server.state import ServerState
from xpeft.server.stores import open_store
from xpeft.server.sync import CacheSync
from xpeft.server.train_routes import router as train_router

log = logging.getLogger("xpeft.server")
__all__ = ["create_app"]


def _package_version() -> str:
    try:
        return version("xpeft")
    except PackageNotFoundError:
        return "0"


def create_app(settings: Settings | None = None, model: MultiProfileModel | None = None) -> FastAPI:
    """A ready-to-serve app. ``model`` (with its bank) skips loading: for notebooks and tests."""
    settings = settings or Settings()
    check_exposure(settings)
    if model is not None:
        bank = model.bank
    elif settings.bank is None:
        raise XPeftError("bad_argument", "no bank: pass --bank or set XPEFT_BANK")
    else:
        bank = load_bank(settings.bank)
    redact_access_log()
    metrics = Metrics()
    store = open_store(settings)
    floors = VersionFloors()
    engine_metrics = metrics.engine()
    fused = FusedCache(settings.fused_cache_bytes, floors, engine_metrics, settings.head_cache_bytes)
    profiles = ProfileCache(
        store,
        lambda data: xpm.decode(data, bank),
        settings.profile_cache_size,
        fused,
        metrics,
        max_bytes=settings.profile_cache_bytes,
    )
    worker = ModelWorker(fused, engine_metrics, settings.torch_threads)
    batcher = MicroBatcher(
        worker.run_async,
        settings.max_batch_size,
        settings.max_wait_ms / 1000,
        settings.max_queue,
        engine_metrics,
        prepare=worker.prepare,
        max_request_tokens=settings.max_request_tokens,
    )
    metrics.set_queue_depth_source(lambda: batcher.depth)
    state = ServerState(
        settings,
        metrics,
        store,
        bank,
        profiles,
        worker,
        batcher,
        CacheSync(store, profiles, metrics, settings.version_check_s),
        Authorizer(settings),
        Admission(settings.max_in_flight, metrics),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if model is not None:
            model.kernels = KernelChoice.parse(
                settings.kernels
            )  # what build_model does for a model it builds
            attach_backend(model, settings)
            worker.attach(
                model, settings.cuda_graphs, settings.max_batch_size, batcher, settings.max_batch_tokens
            )
            _model_ready(state, model)
        else:
            state.tasks.append(asyncio.create_task(_load_model(state), name="xpeft-load-model"))
        state.tasks.append(asyncio.create_task(batcher.run(), name="xpeft-batcher"))
        state.tasks.append(asyncio.create_task(state.sync.run(), name="xpeft-cache-sync"))
        await asyncio.to_thread(jobs.start)  # the embedded trainer, when jobs wait from before a restart
        try:
            yield
        finally:
            await asyncio.to_thread(jobs.stop)
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            batcher.fail_pending(ApiError(503, "shutting_down", "the server is shutting down"))
            await store.close()
            worker.shutdown()

    # Swagger UI and ReDoc from files in the package, not a CDN: /docs works on an offline network.
    # FastAPI's own OpenTelemetry hooks look up the global providers on every request; the
    # server's tracing (server/telemetry.py) turns them on only when tracing is wanted.
    traced = telemetry.wanted(settings)
    app = FastAPIOffline(
        static_url="/docs/assets",
        telemetry={"tracing": traced, "metrics": traced, "logs": traced},
        title="xpeft",
        version=_package_version(),
        lifespan=lifespan,
        description="Multi-profile X-PEFT inference: one frozen encoder and adapter bank, many profiles.",
        responses={
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            408: {"model": ErrorBody},
            413: {"model": ErrorBody},
            422: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.server = state
    app.state.jobs = jobs = JobService(settings)
    install_error_handlers(app)
    app.add_middleware(PredictFastPath, fastapi_app=app)  # innermost: predicts skip the router
    app.add_middleware(
        BodyLimitMiddleware,
        max_profile_bytes=settings.max_profile_bytes,
        max_request_bytes=settings.max_request_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(AdmissionMiddleware, admission=state.admission)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # it also counts 413s and refusals
    # outermost: every response, refusals and errors included, carries the request's id
    app.add_middleware(RequestIdMiddleware, on_id=telemetry.setup(app, settings))
    app.include_router(train_router)  # before the catch-all under /profiles/ in routes.py
    app.include_router(router)
    return app


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict:
    """The generated schema plus this replica's limits, so that a client (or a fuzzer) generating
    valid requests from it is never refused for a limit the schema did not state."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        # The predict route parses its body itself (sizes before items), so the model is added here.
        request_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["components"]["schemas"]["PredictRequest"] = request_schema
        inputs = request_schema["properties"]["inputs"]
        inputs.update(minItems=1, maxItems=settings.max_inputs)
        for variant in inputs["items"]["anyOf"]:
            for text in variant.get("prefixItems", [variant]):
                text["maxLength"] = settings.max_text_chars
        for listing in ("/profiles", "/jobs"):
            for param in schema["paths"][listing]["get"]["parameters"]:
                if param["name"] == "limit":
                    param["schema"]["anyOf"][0]["maximum"] = settings.max_list_limit
        app.openapi_schema = schema
    return app.openapi_schema


async def _load_model(state: ServerState) -> None:
    loop = asyncio.get_running_loop()
    try:
        built = await loop.run_in_executor(state.worker.executor, build_model, state.settings, state.bank)
        settings = state.settings
        await loop.run_in_executor(state.worker.executor, attach_backend, built, settings)
        await loop.run_in_executor(
            state.worker.executor,
            state.worker.attach,
            built,
            settings.cuda_graphs,
            settings.max_batch_size,
            state.batcher,
            settings.max_batch_tokens,
        )
    except Exception as exc:  # reported by /healthz and /readyz; the process cannot recover by itself
        state.model_error = f"{getattr(exc, 'code', type(exc).__name__)}: {getattr(exc, 'message', exc)}"
        log.error("model failed to load: %s", state.model_error)
        return
    _model_ready(state, built)


def _model_ready(state: ServerState, model: MultiProfileModel) -> None:
    """Say so: the readiness gauge, the kernels' and backend's info gauges and one log line."""
    report = kernel_report(model)
    state.metrics.kernels.labels(**report).set(1)
    backend = backend_name(model)
    state.metrics.backend.labels(backend=backend, setting=state.settings.backend).set(1)
    state.metrics.model_ready.set(1)
    log.info(
        "model ready: encoder %s on %s, bank %s (L=%d N=%d), batches of at most %d rows and %d tokens, "
        "kernels %s (XPEFT_KERNELS=%s, running: %s), backend %s (XPEFT_BACKEND=%s)",
        model.encoder.name,
        model.encoder.device,
        state.bank.bank_id,
        state.bank.num_layers,
        state.bank.num_adapters,
        state.settings.max_batch_size,
        state.batcher.max_batch_tokens,
        report["chosen"],
        report["setting"],
        report["running"],
        backend,
        state.settings.backend,
    )
