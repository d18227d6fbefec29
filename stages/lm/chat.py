"""Chat templates for conversations (``stages.tasks.messages``): rendering a conversation as
the text a model reads, and tokenising one for training with the loss on assistant turns only.

``render`` applies a tokenizer's chat template (``tokenizer.apply_chat_template(...,
tokenize=False)``, https://huggingface.co/docs/transformers/chat_templating), or, for a
tokenizer without one, the plain format of ``stages.tasks.messages.plain`` with the
tokenizer's eos text closing each assistant turn. ``template`` (``lm.chat_template``) chooses:

- ``""``: the tokenizer's own template, else the plain format;
- ``"required"``: the tokenizer's own template; a tokenizer without one is an error;
- ``"plain"``: the plain format, even when the tokenizer has a template;
- anything else: a Jinja chat template used instead of the tokenizer's.

``distil distill`` installs the choice on the student's tokenizer (``install_template``), so
the saved student renders at evaluation and serving exactly as it was trained.

``encode_chat`` labels the tokens of every assistant turn (TRL's ``assistant_only_loss``
convention; ``last_only`` labels the final turn alone). A turn's span is found by rendering
prefixes: messages[:i] with the generation prompt ends where assistant turn i begins, and
messages[:i+1] ends where it ends (its end-of-turn token included, trailing whitespace not).
The text is tokenised span by span, so no token straddles a boundary, and the prompt of the
final turn tokenises exactly as the rendered prompt does at inference.
"""

from __future__ import annotations

from stages.errors import DistilError
from stages.lm.training import IGNORE
from stages.tasks.messages import MESSAGES, from_json, plain, prompt_turns

CHOICES = ("", "required", "plain")
"""The values of ``lm.chat_template`` that name no template of their own."""
_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def _template(tokenizer, template: str) -> str | None:
    """The Jinja template ``render`` applies, or None for the plain format."""
    own = getattr(tokenizer, "chat_template", None) or None
    if template == "":
        return own
    if template == "required":
        if own is None:
            raise DistilError(
                f"lm.chat_template=required, but the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'the model'} has "
                "no chat template; give a Jinja template in lm.chat_template, or '' for the plain format"
            )
        return own
    if template == "plain":
        return None
    if "{" not in template:
        raise DistilError(f"lm.chat_template must be '', required, plain or a Jinja chat template, got '{template[:60]}'")
    return template


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, template: str = "") -> str:
    """``messages`` as the text the model reads (see the module docstring for ``template``)."""
    chosen = _template(tokenizer, template)
    if chosen is None:
        return plain(messages, add_generation_prompt=add_generation_prompt, eos=tokenizer.eos_token or "")
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chosen, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)  # fmt: skip
    except jinja2.TemplateSyntaxError as exc:
        raise DistilError(f"the chat template does not parse (line {exc.lineno}: {exc.message}); fix lm.chat_template") from None
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise DistilError(f"the chat template fails on a conversation ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(text, str):
        raise DistilError("the chat template did not render text; check the tokenizer's chat_template")
    return text


def install_template(tokenizer, template: str) -> None:
    """Make ``template`` (``lm.chat_template``) the tokenizer's own, checked: a template that
    does not parse, or ``required`` on a tokenizer without one, is an error."""
    chosen = _template(tokenizer, template)
    if template in ("", "required"):
        return
    if chosen is not None:
        try:
            render(tokenizer, _PROBE, add_generation_prompt=False, template=chosen)
        except DistilError as exc:
            if "does not parse" in str(exc):
                raise
            # a template may refuse the probe (no system role, say); real conversations decide
    tokenizer.chat_template = chosen


def row_prompt(tokenizer, row: dict) -> str:
    """The text a model answers for a prompt row: its conversation (before any final
    assistant turn) rendered with the model's template and the generation prompt, else the
    row's text prompt."""
    if not row.get(MESSAGES):
        return row["prompt"]
    return render(tokenizer, prompt_turns(from_json(row[MESSAGES])), add_generation_prompt=True)


def training_conversation(row: dict) -> list[dict]:
    """The conversation sft learns from: a teacher sample's prompt turns with its completion
    as the final assistant turn, or a gold row's conversation ending with its answer."""
    messages = from_json(row[MESSAGES])
    if "completion" in row:
        return [*prompt_turns(messages), {"role": "assistant", "content": row["completion"].strip()}]
    if messages[-1]["role"] == "assistant":
        return messages
    return [*messages, {"role": "assistant", "content": str(row["answer"]).strip()}]


def assistant_spans(tokenizer, messages: list[dict], template: str = "", *, last_only: bool = False):
    """(the rendered conversation, [(start, end)] character spans of its assistant turns)."""
    full = render(tokenizer, messages, add_generation_prompt=False, template=template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[tuple[int, int]] = []
    for i in turns[-1:] if last_only else turns:
        last = i == len(messages) - 1
        upto = full if last else render(tokenizer, messages[: i + 1], add_generation_prompt=False, template=template)
        head = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        start = len(head) if upto.startswith(head) else _content_start(tokenizer, messages, i, upto, template)
        end = len(upto.rstrip())
        if not full.startswith(upto) or start < 0 or start >= end or (spans and start < spans[-1][1]):
            raise DistilError(
                f"the chat template does not render assistant turn {i} as a continuation of the turns before it, so its "
                "tokens cannot be located for the loss; set lm.chat_template to a template that does (or plain)"
            )
        spans.append((start, end))
    return full, spans


def _content_start(tokenizer, messages: list[dict], i: int, upto: str, template: str) -> int:
    """Where assistant turn i's content starts when the generation prompt is not a prefix of
    the rendered turn (a template whose generation prompt adds more, e.g. an empty think
    block): its content's first occurrence after the turns before it, -1 if none."""
    before = render(tokenizer, messages[:i], add_generation_prompt=False, template=template)
    return upto.find(messages[i]["content"].strip(), len(before)) if upto.startswith(before) else -1


def encode_chat(tokenizer, messages: list[dict], max_len: int, template: str = "", *, last_only: bool = False):
    """(input ids, labels) of a conversation that ends with an assistant turn: labels are
    IGNORE except on assistant tokens (module docstring), cut at ``max_len`` tokens. Raises
    if the first labelled token would not fit."""
    text, spans = assistant_spans(tokenizer, messages, template, last_only=last_only)
    if not spans:
        raise DistilError("a training conversation has no assistant turn to learn; end it with the assistant's answer")
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for start, end in spans:
        context = tokenizer(text[at:start], add_special_tokens=False)["input_ids"]
        turn = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ids += context + turn
        labels += [IGNORE] * len(context) + turn
        at = end
    first = next(j for j, v in enumerate(labels) if v != IGNORE)
    if first + 1 >= max_len:
        raise DistilError(
            f"a conversation's first assistant token is token {first}, beyond the context of {max_len}; "
            "raise lm.context or shorten the conversations"
        )
    return ids[:max_len], labels[:max_len]
