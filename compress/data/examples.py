"""A document as a training example: input tokens, next-token targets and a loss mask.

    example = encode_document(document, tokenizer)
    # {"inputs": [n] int32, "targets": [n] int32, "loss_mask": [n] float32}

Text (a text file, a JSONL "text", a built-in corpus): `tokenizer.encode(text)` (with the
special tokens the tokenizer adds itself, e.g. a BOS) followed by EOS. The inputs are every
token but the last and the targets every token but the first, so each position's target is
the next token of its own document and the loss mask is 1 everywhere. Shifting before
packing means a document split across rows loses no prediction at the split.

Chat (a JSONL "messages" list): rendered with the tokenizer's chat template. Only the
assistant turns are trained on: a target counts (loss mask 1) when it is a token of an
assistant turn. The turns are found by rendering each prefix of the conversation, so the
template itself says where they are: the text before an assistant message, up to and
including the generation prompt ("<|im_start|>assistant\\n" for SmolLM2), is prompt; from
there to the end of that message's rendering ("Hello!<|im_end|>\\n") is the answer, its
end-of-turn token included (that is how the model learns to stop). The pieces are tokenized
one by one without added special tokens (the template writes its own), so token boundaries
fall on turn boundaries. No EOS is appended: the template's end-of-turn token ends a chat.
A template that does not render a conversation's prefixes as prefixes of its whole
rendering cannot say where the turns are, and is an InputError naming the line.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from compress.data.sources import ChatDocument, Document
from compress.errors import InputError

EXAMPLE_KEYS = ("inputs", "targets", "loss_mask")


class Tokenizer(Protocol):
    """What the data pipeline needs of a tokenizer. Press's tokenizers (transformers') have it."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, conversation: list[dict[str, Any]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str: ...


def encode_document(document: Document, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The document's inputs, targets [n] int32 and loss mask [n] float32 (n is 0 for an empty one)."""
    if isinstance(document, ChatDocument):
        ids, trained = [], []
        for text, is_answer in chat_pieces(document.messages, tokenizer, document.where):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids.extend(piece)
            trained.extend([is_answer] * len(piece))
    else:
        text = document.text
        ids = list(tokenizer.encode(text)) + [tokenizer.eos_token_id] if text.strip() else []
        trained = [True] * len(ids)
    ids = np.asarray(ids, np.int32)
    if len(ids) < 2:  # no token has a next one: nothing to train on
        return {key: np.zeros((0,), np.float32 if key == "loss_mask" else np.int32) for key in EXAMPLE_KEYS}
    return {
        "inputs": ids[:-1],
        "targets": ids[1:],
        "loss_mask": np.asarray(trained[1:], np.float32),  # a target counts when it is an answer's token
    }


def chat_pieces(messages: Sequence[dict[str, Any]], tokenizer: Tokenizer, where: str) -> list[tuple[str, bool]]:
    """The chat's rendering cut into consecutive (text, is an assistant's answer) pieces.

    Raises InputError naming `where` when the template cannot render the conversation or does
    not render its prefixes as prefixes of the whole.
    """
    full = _render(tokenizer, messages, False, where)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where)  # everything before the answer
        through = _render(tokenizer, messages[: i + 1], False, where)  # ... and the answer
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
            raise InputError(
                f"{where}: the tokenizer's chat template does not render this conversation's first {i} "
                f"messages as the start of the whole, so the assistant turn of message {i} cannot be found "
                f"(does the conversation start with an assistant message?)"
            )
        pieces += [(full[done : len(prompt)], False), (full[len(prompt) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, is_answer) for text, is_answer in pieces if text]


def _render(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template raises what it likes (jinja's TemplateError, ValueError...)
        raise InputError(f"{where}: the tokenizer's chat template cannot render this conversation: {e}") from None
