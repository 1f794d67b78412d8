"""The API's requests and answers, in OpenAI's shapes: request models and their bounds, errors
as ``{"error": {...}}``, and the JSON of completions, chunks and model cards. No HTTP here,
so every check can be tested without a server."""

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import FtengineError
from ..serving import RequestError, SamplingParams, check_text


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {...}}`` with ``status``."""

    TYPES = {
        400: "invalid_request_error",
        403: "permission_error",
        404: "not_found_error",
        409: "conflict_error",
        413: "invalid_request_error",
    }

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, exc):
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, RequestError):
            return cls(exc.status, str(exc), exc.param, exc.code)
        if isinstance(exc, FtengineError):
            return cls(400, str(exc))
        return cls(500, f"internal error: {type(exc).__name__}: {exc}")

    def body(self):
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------


class GenerationRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    # {"type": "text" | "json_object" | "json_schema", ...}: checked by ftengine.structured.
    response_format: dict | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatRequest(GenerationRequest):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = None


class AdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` body."""

    lora_name: str
    lora_path: str | None = None


def parse_body(raw, schema):
    """``schema`` validated from the request body ``raw`` (bytes); ``ApiError`` 400 naming the
    field otherwise."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, value in data.items():
        check_text(key, "body")
        _check_texts(value, key)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"])
        raise ApiError(400, f"{param}: {error['msg']}", param=str(error["loc"][0]) if error["loc"] else None) from None


def _check_texts(value, param):
    """``RequestError`` for a lone surrogate in any string within the field ``param``: the
    tokenizer, and the JSON of an answer quoting it, would fail on it."""
    if isinstance(value, str):
        check_text(value, param)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_texts(key, param)
            _check_texts(item, param)
    elif isinstance(value, list):
        for item in value:
            _check_texts(item, param)


def prompts_of(body, max_batch_size):
    """A completion request's prompts (one prompt may be token ids), at most ``max_batch_size``."""
    prompt = body.prompt
    prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    if len(prompts) > max_batch_size:
        raise ApiError(
            400, f"prompt: {len(prompts)} prompts in one request; at most {max_batch_size} (--max-batch-size)", "prompt"
        )
    return prompts


def sampling_params(body, prompt_lengths, *, default_max_tokens, context_length, max_tokens_cap):
    """The request's ``SamplingParams``; without ``max_tokens``, ``default_max_tokens`` (or the
    cap), never past what the context leaves after the longest prompt."""
    max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
    if max_tokens is None:
        room = context_length - max(prompt_lengths)
        max_tokens = min(default_max_tokens or max_tokens_cap, max_tokens_cap, max(room, 1))
    if isinstance(max_tokens, int) and max_tokens > max_tokens_cap:
        raise ApiError(
            400, f"max_tokens: {max_tokens} is over this server's cap of {max_tokens_cap} (--max-tokens-cap)", "max_tokens"
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, stop)


def chat_messages(messages):
    """OpenAI messages as the chat template takes them: content parts joined into text."""
    result = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages.{i}.role: {role!r} is not a chat role (system, user, assistant, tool)", "messages")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages.{i}.content: expected a string or a list of text parts", "messages")
        result.append({"role": "system" if role == "developer" else role, "content": content})
    return result


# --------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------


def model_cards(base_name, adapters, created):
    """``GET /v1/models``: the base, then each adapter (``{name: directory}``) as its child."""
    cards = [{"id": base_name, "object": "model", "created": created, "owned_by": "ftengine", "root": base_name, "parent": None}]
    cards += [
        {"id": name, "object": "model", "created": created, "owned_by": "ftengine", "root": str(path), "parent": base_name}
        for name, path in adapters.items()
    ]
    return {"object": "list", "data": cards}


def usage(rows):
    prompt, completion = sum(len(r.prompt_ids) for r in rows), sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(head, rows, chat):
    """The whole answer to a request that did not stream; ``head`` holds its id, created, model."""
    if chat:
        choices = [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for r in rows
        ]
    else:
        choices = [{"index": r.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason} for r in rows]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage(rows)}


def chunk_kind(chat):
    return "chat.completion.chunk" if chat else "text_completion"


def chunk(head, chat, index, text, finish_reason, first=False):
    """One streamed delta; a chat stream opens each choice with the assistant's role."""
    if chat:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**head, "object": chunk_kind(chat), "choices": [choice]}


def sse(data):
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"
