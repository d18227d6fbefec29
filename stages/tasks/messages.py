"""Conversations in prompt tables: the ``messages`` column.

A conversation is the OpenAI / Hugging Face chat format, a list of ``{"role", "content"}``
messages (https://platform.openai.com/docs/api-reference/chat/create,
https://huggingface.co/docs/transformers/chat_templating): an optional first ``system``
message, then ``user`` and ``assistant`` turns alternating, starting with ``user``. A final
assistant message is the row's answer (what training on gold learns to say); the turns
before it are the prompt a teacher or an evaluated model answers. ``parse_messages``
validates one row's value (a list, or a JSON string of one); ``plain`` is the one text
format for a model without a chat template (``stages.lm.chat`` renders with templates).
"""

from __future__ import annotations

import json

from stages.errors import DistilError

MESSAGES = "messages"
"""The column of a prompt table that holds conversations."""
ROLES = ("system", "user", "assistant")


def parse_messages(value, where: str) -> list[dict[str, str]]:
    """One row's conversation as ``[{"role", "content"}]`` (other keys dropped), or a
    ``DistilError`` naming ``where`` (the table and row) and what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise DistilError(
                f"{where}: messages is not valid JSON ({str(exc)[:80]}); give a list of {{role, content}} objects"
            ) from None
    if not isinstance(value, (list, tuple)):
        raise DistilError(f"{where}: messages must be a list of {{role, content}} objects, got {type(value).__name__}")
    if not value:
        raise DistilError(f"{where}: messages is empty; give at least one user turn")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DistilError(f"{where}: message {j} is not a {{role, content}} object with text content")
        if m["role"] not in ROLES:
            raise DistilError(f"{where}: message {j} has role '{m['role'][:40]}'; roles are {', '.join(ROLES)}")
        if not m["content"].strip():
            raise DistilError(f"{where}: message {j} ({m['role']}) has empty content; drop the row or fill it in")
        out.append({"role": m["role"], "content": m["content"]})
    _check_order(out, where)
    return out


def _check_order(messages: list[dict], where: str) -> None:
    """An optional system message first, then user / assistant alternating from user."""
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise DistilError(f"{where}: messages has no user turn; a conversation needs at least one")
    start = 1 if roles[0] == "system" else 0
    for j in range(start, len(roles)):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if roles[j] == "system":
            raise DistilError(f"{where}: message {j} is a system message; only the first message may be one")
        if roles[j] != want:
            raise DistilError(
                f"{where}: message {j} is {roles[j]} where {want} was due; turns alternate user/assistant after an optional system message"
            )


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The conversation a model answers: ``messages`` without a final assistant message."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def final_answer(messages: list[dict]) -> str | None:
    """The content of a final assistant message (the gold answer), else None."""
    return messages[-1]["content"] if messages[-1]["role"] == "assistant" else None


def to_json(messages: list[dict]) -> str:
    """How tables store a conversation: compact JSON, non-ASCII kept."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def from_json(text: str) -> list[dict]:
    """A conversation stored by ``to_json`` (already validated)."""
    return json.loads(text)


def plain(messages: list[dict], *, add_generation_prompt: bool, eos: str = "") -> str:
    """The plain chat format, for tokenizers without a chat template: one line per message,
    ``role: content``, each assistant turn ending with ``eos`` (the tokenizer's end-of-sequence
    text, so a model learns to stop), and ``assistant:`` after the last when a reply is due::

        system: You are terse.
        user: 2+2?
        assistant: 4</s>
        user: and 3+3?
        assistant:
    """
    text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")
