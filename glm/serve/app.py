"""The HTTP side: FastAPI routes in the OpenAI shape over an `Engine`.

Every failure a client can cause is a 4xx in OpenAI's error shape ({"error": {"message", "type", "param",
"code"}}): malformed JSON, unknown fields and wrong types (400), an unknown model (404), a prompt that
cannot fit (400), a full queue (429). A streamed reply is server-sent events of `chat.completion.chunk`
objects ending with `data: [DONE]`; a client that disconnects frees its row.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm import GLMError
from glm.generate import GenerationConfig
from glm.prompt_format import family_format
from glm.serve.engine import Engine, Job, QueueFull
from glm.serve.protocol import (
    ChatRequest,
    ReplyStream,
    RequestError,
    encode_messages,
    error_body,
    generation_settings,
)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


_BRANCH_TAGS = ("int", "float", "str", "bool", "none", "list", "dict")


def _field_path(loc) -> str:
    """'messages.0.content' from pydantic's loc, without the union-branch tags ('int', 'list[...]')."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and parts and (p.split("[")[0] in _BRANCH_TAGS or "[" in p or "-" in p):
            break
        parts.append(str(p))
    return ".".join(parts)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    where = _field_path(e.get("loc", ()))
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})", None
    if not where and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (with Content-Type: application/json)", None
    if kind == "extra_forbidden":
        return f"unknown field {where!r}", where or None
    if kind == "missing":
        return f"missing required field {where!r}", where or None
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{where or 'body'}: {e.get('msg')} (got {shown})", where or None


def create_app(engine: Engine, model_id: str, default_gen: GenerationConfig, prompt_format: str = "") -> FastAPI:
    """The app; requests are encoded in `prompt_format` (default: the tokenizer's chat template)."""
    app = FastAPI(title="glm-launcher", docs_url=None, redoc_url=None, openapi_url=None)
    tok = engine.tok
    prompt_format = prompt_format or family_format(tok)
    glm3 = prompt_format == "glm3_chat"   # role tokens: a metadata line, maybe a tool call
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):   # a bug: answer, log, keep serving
        print(f"error: internal error {type(exc).__name__}: {exc}", flush=True)
        return _error(500, f"internal error {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": engine.waiting.qsize(), "batches": engine.batches,
                "running": engine.busy_rows, "batch_rows": engine.rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id, started)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_id:
            return _error(404, f"model {name!r} does not exist; this server serves {model_id!r}",
                          "not_found_error", "model", "model_not_found")
        return _model_card(model_id, started)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if req.model != model_id:
            return _error(404, f"model {req.model!r} does not exist; this server serves {model_id!r}",
                          "not_found_error", "model", "model_not_found")
        try:
            prompt, tools = encode_messages(tok, req, prompt_format)
            gen = generation_settings(req, default_gen)
            try:
                budget = engine.generator.budget(prompt, gen)
            except GLMError as e:
                raise RequestError(f"messages: the prompt is {len(prompt)} tokens; {_reason(e)}", "messages",
                                   code="context_length_exceeded") from None
            stops = req.stop_strings()
        except RequestError as e:
            return _error(e.status, e.message, e.kind, e.param, e.code)
        job = Job(prompt=prompt, gen=gen, budget=budget, stops=stops, loop=asyncio.get_running_loop(),
                  events=asyncio.Queue())
        try:
            engine.submit(job)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error", code="queue_full")
        reply = ReplyStream(tools, glm3)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, reply, meta, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, reply, meta, request)

    return app


def _reason(e: GLMError) -> str:
    text = str(e)
    return text.split(": ", 1)[1] if text.startswith("prompt ") and ": " in text else text


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "glm-launcher"}


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt) + len(job.tokens)}


def _tool_calls(call: dict) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]


async def _complete(job: Job, reply: ReplyStream, meta: dict, request: Request):
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return _error(499, "client disconnected")
            continue
        if kind == "text":
            reply.feed(value)
        elif kind == "error":
            return _error(503 if "shutting down" in value else 500, value, "server_error")
        else:
            break
    _, call = reply.finish()
    message: dict[str, Any] = {"role": "assistant", "content": None if call else reply.sent}
    finish = value
    if call:
        message["tool_calls"] = _tool_calls(call)
        finish = "tool_calls"
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(job)}


def _chunk(meta: dict, delta: dict, finish: Optional[str] = None) -> str:
    body = {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(job: Job, reply: ReplyStream, meta: dict, usage: bool) -> AsyncIterator[str]:
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                delta = reply.feed(value)
                if delta:
                    yield _chunk(meta, {"content": delta})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(value, 'server_error'), ensure_ascii=False)}\n\n"
                break
            else:
                last, call = reply.finish()
                if last:
                    yield _chunk(meta, {"content": last})
                if call:
                    calls = [{"index": 0, **c} for c in _tool_calls(call)]
                    yield _chunk(meta, {"tool_calls": calls})
                yield _chunk(meta, {}, "tool_calls" if call else value)
                if usage:
                    yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(job)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:   # also when the client went away (the response task is cancelled): free the row
        job.cancelled.set()
