"""The wire format of ``distil serve``: request bodies as pydantic models, OpenAI's error
body, and the one line a validation error becomes.

Fields and defaults follow the OpenAI API reference (Completions:
https://platform.openai.com/docs/api-reference/completions/create, Chat Completions:
https://platform.openai.com/docs/api-reference/chat/create, errors:
https://platform.openai.com/docs/guides/error-codes) plus vLLM's extra parameter
``return_tokens_as_token_ids`` (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html).
Fields a client may send that distil does not use (``user``, ``frequency_penalty``, ...) are
ignored, as vLLM ignores them; limits that depend on the server (``ServeConfig.max_tokens``,
``max_logprobs``, the model's context) are checked by ``app``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class APIError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error: ``max_tokens: Input should be ...``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return "the request body must be a JSON object", None
    param = ".".join(loc)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {message}", param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints share; None means the default."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=128)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[list[str]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    return_tokens_as_token_ids: Optional[bool] = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        """OpenAI's ``stop``: one string or a list of them (empty strings never match)."""
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        return [s for s in value if s]


class CompletionRequest(_Request):
    """POST /v1/completions. Scoring is ``prompt`` = token ids, ``echo``, ``max_tokens`` 0, ``logprobs`` k."""

    prompt: Any
    max_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[int] = Field(None, ge=0)
    echo: Optional[bool] = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[list[int]]:
        """Every prompt shape as a list: of strings, or of token-id lists."""
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(_is_id(v) for v in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError(f"prompt must be {PROMPT_SHAPES}, and not empty")
        if all(isinstance(v, str) for v in value):
            if not all(value):
                raise ValueError("prompt holds an empty string; send text to complete")
            return value
        if all(isinstance(v, list) and v and all(_is_id(i) for i in v) for v in value):
            return value
        raise ValueError(f"prompt must be {PROMPT_SHAPES} (no empty list)")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """A string, or OpenAI's list of content parts of which only text parts are served."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            return "".join(p["text"] for p in value)
        raise ValueError(
            "content must be a string or a list of text parts ({'type': 'text', 'text': ...}); images and audio are not served"
        )


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0)


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt a chat becomes: the tokenizer's chat template (with the generation prompt)
    when it has one; otherwise the messages' contents joined by newlines, roles dropped, so a
    single user message is sent exactly as written (the prompt format distil's own students
    were trained on, ``Question: ...\\nAnswer:``)."""
    plain = [{"role": m.role, "content": m.content or ""} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a jinja template raising on roles it refuses (a second system message, say)
            raise APIError(400, f"the model's chat template refuses these messages: {exc}", "messages") from None
    return "\n".join(m["content"] for m in plain)
