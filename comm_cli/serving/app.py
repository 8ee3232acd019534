"""The ASGI application of comm-serve (Starlette): OpenAI's ``/v1/models``, ``/v1/completions``
and ``/v1/chat/completions`` over one loaded ``Session``, plus ``/health``.

A request is checked (``protocol``), posed as prompt text (raw for completions, through the
anchor's chat template for chat), measured against the context, and queued as a ``Job`` for the
``Scheduler``; its reply is JSON, or server-sent events as OpenAI streams them (``data: {chunk}``
per piece of text, ``data: [DONE]`` at the end). Whatever goes wrong with one request is an
OpenAI error object for that request alone; a client that leaves cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from comm_cli.errors import CommError
from comm_cli.inference.session import Sampling, Session
from comm_cli.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    bad_request,
    event,
    parse_request,
)
from comm_cli.serving.scheduler import Job, Overloaded, Scheduler

logger = logging.getLogger(__name__)


class ServedModel:
    """One loaded model under one name: its two ways of posing a prompt (raw text for
    ``/v1/completions``, the chat template for ``/v1/chat/completions``), the server's default
    generation settings and the scheduler its requests queue in."""

    def __init__(self, session: Session, name: str, defaults, scheduler: Scheduler):
        self.name, self.defaults, self.scheduler = name, defaults, scheduler
        self.chat = session if session.chat else None
        self.raw = session
        if session.chat:  # the same model and tokenizer, prompts posed as they are
            self.raw = Session(
                session.loaded, session.tokenizer, chat_template=False, add_bos=session.add_bos
            )
        self.created = int(time.time())

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "comm"}

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.name}'",
                "model",
                "model_not_found",
            )

    def sampling(self, request) -> Sampling:
        """The request's settings, each unset one from the server's ``generation.*``."""
        d = self.defaults
        temperature = request.temperature
        if temperature is None:
            temperature = d.temperature if d.do_sample else 0.0
        top_p = request.top_p if request.top_p is not None else d.top_p
        stop = request.stops()
        return Sampling(
            max_new_tokens=d.max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=None if top_p == 1 else top_p,
            top_k=request.top_k if request.top_k is not None else d.top_k,
            stop=list(d.stop) if stop is None else stop,
            seed=request.seed,
        )

    def limits(self, session: Session, texts: list[str], asked: int | None) -> tuple[list[int], list[int]]:
        """(prompt tokens, new-token limit) per prompt; a prompt that leaves no room for the
        reply, or a ``max_tokens`` past the context, is the client's error."""
        context = session.max_length
        param = "max_tokens"
        prompt_tokens, limits = [], []
        for text in texts:
            used = len(session.prompt_ids(text))
            if used >= context or (asked is not None and used + asked > context):
                wanted = f"{used} in the prompt" + (
                    "" if asked is None else f" and {asked} for the completion"
                )
                raise bad_request(
                    f"This model's maximum context length is {context} tokens; you requested {wanted}: "
                    "shorten the prompt or lower max_tokens",
                    param if used < context else "messages" if session.chat else "prompt",
                    "context_length_exceeded",
                )
            prompt_tokens.append(used)
            limits.append(asked if asked is not None else min(self.defaults.max_new_tokens, context - used))
        return prompt_tokens, limits

    async def respond(self, request: Request, body, session: Session, texts: list[str], reply: Reply):
        n = body.n or 1
        prompt_tokens, limits = self.limits(session, texts, body.token_limit())
        rows = [text for text in texts for _ in range(n)]
        row_limits = [limit for limit in limits for _ in range(n)]
        job = Job(session, rows, row_limits, self.sampling(body), stream=bool(body.stream))
        try:
            self.scheduler.submit(job)
        except Overloaded as err:
            raise APIError(
                503,
                f"comm-serve is busy ({err}): try again later, or start it with a larger max_queue",
                code="server_overloaded",
            ) from err
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(stream_events(job, reply, sum(prompt_tokens), usage), job)
        completions = await result_unless_gone(request, job)
        if completions is None:
            return Response(status_code=499)  # nobody is there to read it
        return JSONResponse(
            reply.whole(
                [(c.text, c.finish_reason) for c in completions],
                sum(prompt_tokens),
                sum(c.completion_tokens for c in completions),
            )
        )


def as_api_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, Overloaded):
        return APIError(503, str(err), code="server_overloaded")
    if isinstance(err, CommError):
        return bad_request(str(err), code="generation_failed")
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", code="server_error")


async def stream_events(job: Job, reply: Reply, prompt_tokens: int, include_usage: bool):
    """The server-sent events of a streamed reply: each choice's text as it grows, then its
    finish reason, the usage when asked, and ``[DONE]``."""
    rows = len(job.texts)
    sent = [""] * rows
    if reply.chat:
        for index in range(rows):
            yield event(reply.chunk(index, None, first=True))
    while True:
        kind, *payload = await job.next_event()
        if kind == "text":
            index, delta = payload
            sent[index] += delta
            yield event(reply.chunk(index, delta))
        elif kind == "done":
            completions = payload[0]
            for index, completion in enumerate(completions):
                rest = completion.text[len(sent[index]) :] if completion.text.startswith(sent[index]) else ""
                if rest:
                    yield event(reply.chunk(index, rest))
                yield event(reply.chunk(index, None, completion.finish_reason))
            if include_usage:
                yield event(reply.usage_chunk(prompt_tokens, sum(c.completion_tokens for c in completions)))
            break
        else:
            yield event(as_api_error(payload[0]).body())
            break
    yield event("[DONE]")


class EventStream:
    """An ASGI response of server-sent events that cancels its job however it ends: finished,
    the client gone (seen at once, not at the next write), or the server stopping."""

    def __init__(self, events, job: Job):
        self.events, self.job = events, job

    async def __call__(self, scope, receive, send) -> None:
        async def stream(scope_: anyio.CancelScope) -> None:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            scope_.cancel()

        async def watch(scope_: anyio.CancelScope) -> None:
            await disconnected(receive)
            scope_.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stream, group.cancel_scope)
                group.start_soon(watch, group.cancel_scope)
        except OSError:  # the client went away between two writes
            pass
        finally:
            self.job.cancel()
            await self.events.aclose()


async def disconnected(receive) -> None:
    """Returns once the client has closed the connection (the body is read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def result_unless_gone(request: Request, job: Job):
    """The job's completions, or None when the client leaves first (the job is cancelled then)."""
    result = asyncio.ensure_future(job.result())
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            job.cancel()
            result.cancel()
    if result.cancelled():
        return None
    error = result.exception()
    if error is not None:
        raise as_api_error(error)
    return result.result()


def build_app(served: ServedModel) -> Starlette:
    """The Starlette application serving ``served`` (its scheduler starts and stops with it)."""

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [served.card()]})

    async def model(request: Request) -> JSONResponse:
        served.check_model(request.path_params["name"])
        return JSONResponse(served.card())

    async def completions(request: Request):
        body = parse_request(CompletionRequest, await request.body())
        served.check_model(body.model)
        return await served.respond(request, body, served.raw, body.prompts(), Reply(False, served.name))

    async def chat_completions(request: Request):
        body = parse_request(ChatRequest, await request.body())
        served.check_model(body.model)
        if served.chat is None:
            raise bad_request(
                "this model has no chat template (its tokenizer has none, or the server runs with "
                "chat_template=false): use /v1/completions",
                "messages",
                "unsupported_value",
            )
        try:
            text = served.chat.prompt_text(messages=body.turns())
        except APIError:
            raise
        except Exception as err:  # the template refuses these turns (e.g. roles out of order)
            raise bad_request(f"the chat template cannot pose these messages: {err}", "messages") from err
        return await served.respond(request, body, served.chat, [text], Reply(True, served.name))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": served.name, **served.scheduler.stats()})

    async def api_error(request: Request, err: APIError) -> JSONResponse:
        headers = {"retry-after": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return await api_error(request, APIError(err.status_code, message, code=code))

    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return await api_error(request, as_api_error(err))  # (uvicorn logs the traceback)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.scheduler.start()
        try:
            yield
        finally:
            await served.scheduler.stop()

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", model),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", health),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
