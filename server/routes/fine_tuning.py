"""The OpenAI fine-tuning API: /v1/fine_tuning/jobs and its events and checkpoints.

Jobs train a LoRA adapter of the served base model while the server keeps serving
(server/finetune/manager.py). Every job belongs to the owner of the API key that created
it. Store calls run off the event loop: the read-only routes are plain functions, which
FastAPI runs in its thread pool, and the others hand their store calls to threads.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request

from server import errors
from server.context import ServerContext, get_context
from server.finetune.job_objects import (
    CheckpointList,
    CheckpointMetrics,
    EventList,
    FineTuningJob,
    JobCheckpoint,
    JobError,
    JobEvent,
    JobHyperparameters,
    JobList,
    JobMethod,
    SupervisedHyperparameters,
)
from server.finetune.job_request import DEFAULT_TARGETS as LLAMA_PROJECTIONS
from server.finetune.job_request import CreateJobRequest
from server.finetune.manager import owner_label
from server.auth import principal_of
from server.store import FileNotFound
from server.store.jobs import CursorNotFound, InvalidTransition, JobNotFound, JobRecord, TooManyActiveJobs

router = APIRouter()
MAX_LIMIT = 10_000


def job_object(record: JobRecord) -> FineTuningJob:
    hyperparameters = JobHyperparameters(**record.hyperparameters)
    return FineTuningJob(
        id=record.id,
        model=record.model,
        created_at=record.created_at,
        finished_at=record.finished_at,
        fine_tuned_model=record.fine_tuned_model,
        organization_id=record.owner if ":" not in record.owner else "key-" + owner_label(record.owner),
        status=record.status,
        validation_file=record.validation_file,
        training_file=record.training_file,
        hyperparameters=hyperparameters,
        method=JobMethod(supervised=SupervisedHyperparameters(hyperparameters=hyperparameters)),
        trained_tokens=record.trained_tokens,
        error=JobError(**vars(record.error)) if record.error else None,
        user_provided_suffix=record.suffix,
        seed=record.seed,
        metadata=record.metadata,
        lora=record.lora,
    )


def _job_not_found(job_id: str) -> errors.APIError:
    return errors.APIError(
        404, f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id", code="fine_tuning_job_not_found"
    )


def _owned(ctx: ServerContext, request: Request, job_id: str) -> JobRecord:
    try:
        return ctx.store.jobs.get(principal_of(request).owner_scope, job_id)
    except JobNotFound:
        raise _job_not_found(job_id) from None


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
async def create_job(body: CreateJobRequest, request: Request) -> FineTuningJob:
    ctx = get_context(request)
    ctx.check_engine()
    caller = principal_of(request)
    if body.model != ctx.served_model_name:
        raise errors.bad_request(
            f"Model {body.model!r} cannot be fine-tuned here; this server fine-tunes {ctx.served_model_name!r}.",
            "model",
        )
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        try:
            record = await asyncio.to_thread(ctx.store.files.get, caller.owner_scope, file_id)
        except FileNotFound:
            raise errors.bad_request(f"{param} {file_id!r} does not exist.", param) from None
        if record.purpose != "fine-tune":
            raise errors.bad_request(f"{param} {file_id!r} was not uploaded with purpose 'fine-tune'.", param)
    if body.hyperparameters is not None and body.method is not None:
        # Which would win is a guess the caller should not have to make.
        raise errors.bad_request("Give hyperparameters or method.supervised.hyperparameters, not both.",
                                 "hyperparameters")
    unknown = set(body.lora.target_modules) - set(LLAMA_PROJECTIONS)
    if unknown:
        raise errors.bad_request(
            f"lora.target_modules {sorted(unknown)} are not projections of the model "
            f"(supported: {', '.join(LLAMA_PROJECTIONS)})",
            "lora.target_modules",
        )
    if body.lora.rank > ctx.settings.max_lora_rank:
        raise errors.bad_request(
            f"lora.rank {body.lora.rank} exceeds max_lora_rank={ctx.settings.max_lora_rank}", "lora.rank"
        )
    limit = ctx.settings.max_active_jobs_per_owner
    try:
        return job_object(await ctx.jobs.create(caller.owner, body, max_active=limit or None))
    except TooManyActiveJobs:
        raise errors.APIError(
            429,
            f"Owner {caller.owner!r} already has max_active_jobs_per_owner={limit} unfinished fine-tuning jobs; "
            "wait for one to finish or cancel one.",
            type="rate_limit_error",
            code="too_many_active_jobs",
        ) from None


@router.get("/v1/fine_tuning/jobs", response_model=JobList)
def list_jobs(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=MAX_LIMIT)
) -> JobList:
    ctx = get_context(request)
    try:
        page = ctx.store.jobs.list(principal_of(request).owner_scope, limit=limit, after=after)
    except JobNotFound:
        raise errors.APIError(404, f"No fine-tuning job with id {after!r}.", param="after",
                              code="fine_tuning_job_not_found") from None
    return JobList(data=[job_object(r) for r in page.records], has_more=page.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, request: Request) -> FineTuningJob:
    return job_object(_owned(get_context(request), request, job_id))


async def _control(job_id: str, request: Request, action: str) -> FineTuningJob:
    ctx = get_context(request)
    record = await asyncio.to_thread(_owned, ctx, request, job_id)
    try:
        return job_object(await ctx.jobs.control(record, action))
    except InvalidTransition:
        raise errors.bad_request(f"Cannot {action} a job that is {record.status}.", "fine_tuning_job_id") from None


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
async def cancel_job(job_id: str, request: Request) -> FineTuningJob:
    return await _control(job_id, request, "cancel")


@router.post("/v1/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob)
async def pause_job(job_id: str, request: Request) -> FineTuningJob:
    return await _control(job_id, request, "pause")


@router.post("/v1/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob)
async def resume_job(job_id: str, request: Request) -> FineTuningJob:
    return await _control(job_id, request, "resume")


def _job_page(request: Request, list_records, kind: str, job_id: str, limit: int, after: str | None):
    """A page of one of the caller's job's events or checkpoints; 404 for an unknown job or cursor."""
    try:
        return list_records(principal_of(request).owner_scope, job_id, limit=limit, after=after)
    except JobNotFound:
        raise _job_not_found(job_id) from None
    except CursorNotFound:
        raise errors.APIError(404, f"No {kind} with id {after!r} in this job.", param="after") from None


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=EventList)
def list_events(
    job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=MAX_LIMIT)
) -> EventList:
    page = _job_page(request, get_context(request).store.jobs.list_events, "event", job_id, limit, after)
    data = [
        JobEvent(id=e.id, created_at=e.created_at, level=e.level, message=e.message, data=e.data,
                 type="metrics" if e.data and "step" in e.data else "message")
        for e in page.records
    ]
    return EventList(data=data, has_more=page.has_more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str, request: Request, after: str | None = None, limit: int = Query(10, ge=1, le=MAX_LIMIT)
) -> CheckpointList:
    page = _job_page(request, get_context(request).store.jobs.list_checkpoints, "checkpoint", job_id, limit, after)
    data = [
        JobCheckpoint(id=c.id, created_at=c.created_at, fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
                      fine_tuning_job_id=c.job_id, metrics=CheckpointMetrics(**c.metrics), step_number=c.step)
        for c in page.records
    ]
    return CheckpointList(data=data, has_more=page.has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)
