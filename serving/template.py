"""The chat template: OpenAI chat messages -> the model's prompt text and its images, in order.

One template, the prompt layout the model was trained on (``model_src/data/tasks.py``: the image
lines, the text line, ``"\\nAnswer:"``; follow-up turns as ``"\\n" + text line + "\\nAnswer:"``
after the previous answer, ``model_src/train/batches.py``)::

    [system text "\\n"]                                     system / developer messages, if any
    Image 1: <image>\\nImage 2: <image>\\nQuestion: q1?\\nAnswer:   first user turn
     a1                                                       assistant turn: " " + its text
    \\nImage 3: <image>\\nQuestion: q2?\\nAnswer:                  next user turn (its own images)

Rules, in order:

1. **System** (and ``developer``) messages must come before every other message; their texts,
   joined by newlines, open the prompt on their own line. (The shipped models were not trained
   with one; it is passed through verbatim, not dropped.)
2. **Turns.** After the system messages the conversation alternates user and assistant turns and
   ends with a user turn (the one the model answers). Consecutive user messages form one turn.
3. **Images** are numbered 1, 2, ... across the whole conversation in the order they appear
   (earlier turns' images stay in the prompt). In a user turn, each of its images gets a line
   ``Image k: <image>`` before the turn's text, whatever its position among the turn's parts; a
   conversation with exactly one image uses the bare ``<image>`` line instead (the single-image
   training layout).
4. **Text line.** A user turn's text parts are stripped and joined with a space. Text ending in
   ``?`` is a question and becomes ``Question: <text>`` (unless it already starts with
   ``Question:``); any other text is an instruction and stands alone (``Describe the image.``).
   The turn ends with ``\\nAnswer:``. A user turn without text is refused.
5. **Explicit placement.** A user turn whose text contains ``<image>`` placeholders is used
   verbatim (text parts concatenated, nothing added): its images fill its placeholders in
   order, and their numbers must match, else the request is refused. This reproduces any prompt
   ``maven-edge generate --prompt`` takes.
6. **Assistant** turns render as ``" " + text`` (stripped); later user turns start with ``"\\n"``.
   The training text also had ``<eos>`` after each answer; a text prompt cannot carry it, so
   multi-turn prompts differ from training there.

So a single user message with two images and ``which image has a red square?`` gives exactly
``Image 1: <image>\\nImage 2: <image>\\nQuestion: which image has a red square?\\nAnswer:``, the
prompt of the bundled demo and of ``maven-edge generate`` for the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from maven_edge.core.errors import PromptError
from maven_edge.core.tokenizer import IMAGE_TOKEN
from maven_edge.serving.protocol import (
    AssistantMessage,
    ImagePart,
    Message,
    SystemMessage,
    TextPart,
    UserMessage,
    message_text,
)

QUESTION_PREFIX = "Question:"
ANSWER_CUE = "\nAnswer:"


@dataclass(frozen=True)
class ChatPrompt:
    """What the model is asked: the prompt text (one ``<image>`` per image) and the images' URLs."""

    prompt: str
    image_urls: tuple[str, ...]


def text_line(text: str) -> str:
    """A user turn's text as the model's text line (rule 4)."""
    text = text.strip()
    if text.endswith("?") and not text.startswith(QUESTION_PREFIX):
        return f"{QUESTION_PREFIX} {text}"
    return text


def image_lines(first: int, count: int, total: int) -> list[str]:
    """The lines for images ``first .. first + count - 1`` (1-based) of a conversation of ``total`` (rule 3)."""
    if total == 1:
        return [IMAGE_TOKEN] * count
    return [f"Image {k}: {IMAGE_TOKEN}" for k in range(first, first + count)]


def _user_parts(messages: Sequence[UserMessage]) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    urls: list[str] = []
    for m in messages:
        if isinstance(m.content, str):
            texts.append(m.content)
            continue
        for part in m.content:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                urls.append(part.image_url.url)
    return texts, urls


def render(messages: Sequence[Message]) -> ChatPrompt:
    """The prompt and image URLs for a conversation; a PromptError (400) for one that breaks the rules."""
    messages = list(messages)
    system: list[str] = []
    i = 0
    while i < len(messages) and isinstance(messages[i], SystemMessage):
        system.append("\n".join(t.strip() for t in message_text(messages[i].content)).strip())
        i += 1
    turns: list[tuple[str, list[UserMessage] | AssistantMessage]] = []
    for m in messages[i:]:
        if isinstance(m, SystemMessage):
            raise PromptError(f"a {m.role} message must come before the conversation's user and assistant messages")
        if isinstance(m, UserMessage):
            if turns and turns[-1][0] == "user":
                turns[-1][1].append(m)  # type: ignore[union-attr]
            else:
                turns.append(("user", [m]))
        else:
            if not turns:
                raise PromptError("the conversation must start with a user message (after any system messages)")
            if turns[-1][0] == "assistant":
                raise PromptError("two assistant messages in a row: put a user message between them")
            turns.append(("assistant", m))
    if not turns or turns[-1][0] != "user":
        raise PromptError("the last message must be from the user: the model answers the last user turn")

    parts = [s for s in system if s]
    user_parts = [_user_parts(t[1]) for t in turns if t[0] == "user"]  # type: ignore[arg-type]
    total = sum(len(urls) for _, urls in user_parts)
    out: list[str] = ["\n".join(parts) + "\n"] if parts else []
    urls_all: list[str] = []
    user_index = 0
    for kind, payload in turns:
        if kind == "assistant":
            assert isinstance(payload, AssistantMessage)
            out.append(" " + " ".join(t.strip() for t in message_text(payload.content)).strip())
            continue
        texts, urls = user_parts[user_index]
        lead = "\n" if user_index else ""
        user_index += 1
        joined = "".join(texts)
        if IMAGE_TOKEN in joined:  # rule 5: explicit placement, verbatim
            n = joined.count(IMAGE_TOKEN)
            if n != len(urls):
                raise PromptError(
                    f"user turn {user_index} has {n} {IMAGE_TOKEN} placeholder(s) in its text but {len(urls)} "
                    f"image(s); give one image per {IMAGE_TOKEN}, or leave the placeholders out and let the "
                    "server place the images")
            out.append(lead + joined)
        else:
            text = " ".join(t.strip() for t in texts if t.strip())
            if not text:
                raise PromptError(f"user turn {user_index} has no text: ask a question about the image(s)")
            lines = image_lines(len(urls_all) + 1, len(urls), total) + [text_line(text)]
            out.append(lead + "\n".join(lines) + ANSWER_CUE)
        urls_all.extend(urls)
    return ChatPrompt("".join(out), tuple(urls_all))
