"""The OpenAI HTTP API as comm-serve speaks it: request bodies (checked with pydantic, unknown
keys refused), the error object every failure becomes, and the JSON of replies and of the
server-sent-event chunks of a streamed reply.

Parameters OpenAI defines but a composition cannot honour (penalties, logprobs, tools, ...) are
accepted at their defaults, so clients that always send them work, and refused with a 400 that
names them otherwise: never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A failure the client sees as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 404 and self.code != "model_not_found":
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


# ------------------------------------------------------------------------------------------ requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # sent by newer clients; nothing here to obfuscate


class _Request(BaseModel):
    """What both endpoints accept. A request's unset values come from the server's
    ``generation.*`` settings (greedy unless the server says otherwise); ``temperature: 0`` is
    greedy, and ``top_k`` is an extension (as vLLM has it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's, accepted at their defaults only (UNSUPPORTED)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    def stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise bad_request("'prompt' is an empty list: give a string or a list of strings", "prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise bad_request(
                "comm-serve takes prompts as text, not token ids (a composition reads text through "
                "more than one tokenizer): send the prompt as a string",
                "prompt",
                "unsupported_value",
            )
        return prompts


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def as_turn(self, index: int) -> dict:
        """``{"role", "content"}`` as a chat template reads it (a developer turn is a system turn)."""
        where = f"messages[{index}]"
        if self.role == "tool" or self.tool_calls:
            raise bad_request(f"{where}: comm-serve has no tool calls", where, "unsupported_value")
        content = self.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"{where}: content part of type '{part.type}': comm-serve reads text parts only",
                        where,
                        "unsupported_value",
                    )
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    def turns(self) -> list[dict]:
        if not self.messages:
            raise bad_request("'messages' is empty: give at least one message", "messages")
        return [message.as_turn(i) for i, message in enumerate(self.messages)]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# name -> the values that mean "not used": anything else is refused with a 400
UNSUPPORTED = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "reasoning_effort": (None,),
}


def parse_request(kind: type[_Request], raw: bytes) -> _Request:
    """The request in ``raw`` (a JSON body), or the APIError that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(
            f"We could not parse the JSON body of your request ({err}): send a JSON object",
            code="invalid_json",
        ) from err
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        request = kind.model_validate(body)
    except ValidationError as err:
        raise _validation_error(err) from err
    for name, defaults in UNSUPPORTED.items():
        value = getattr(request, name, None)
        if value not in defaults:
            raise bad_request(
                f"comm-serve does not support '{name}' (got {value!r}): leave it unset",
                name,
                "unsupported_parameter",
            )
    return request


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    location = [str(part) for part in first["loc"]]
    param = location[0] if location else None
    if first["type"] == "extra_forbidden":
        where = ".".join(location)
        return bad_request(f"Unrecognized request argument supplied: {where}", where, "unknown_parameter")
    if first["type"] == "missing":
        return bad_request(
            f"Missing required parameter: '{'.'.join(location)}'.", param, "missing_required_parameter"
        )
    if param == "messages" and len(location) > 1 and location[1].isdigit():
        param = f"messages[{location[1]}]"
    return bad_request(f"Invalid value for '{param}': {first['msg']} (got {first.get('input')!r})", param)


# ------------------------------------------------------------------------------------------ replies


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The JSON of one request's reply, whole or as stream chunks, for either endpoint."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def whole(self, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
        """``choices``: (text, finish_reason) per choice index."""
        if self.chat:
            listed = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(choices)
            ]
        else:
            listed = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(choices)
            ]
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": listed, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, first=False) -> dict:
        """A stream chunk for one choice: its new text, or (``finish_reason``) its end. A chat
        choice's first chunk carries the role."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when the client asked ``stream_options: {include_usage: true}``."""
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object_), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def event(data: dict | str) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
