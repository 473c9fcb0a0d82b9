"""The words an error message uses for its fix, in the caller's own vocabulary.

The same loading error reaches users of `get_model` in Python, of `eva02 predict --checkpoint`, and of
`eva02 train --set model.init=...`; each should be told the option it can actually use. Library code
asks `hint(key)`; a command (or the engine) states its words once with `using(...)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# The Python API's words: the default for library use.
PYTHON = {
    "local_file": "pretrained='FILE' (get_model)",
    "num_classes": "num_classes=N (get_model)",
    "model_name": "get_model(NAME, pretrained=FILE)",
    "matching_model": "the model name or config that matches the checkpoint (see eva02.list_models())",
}
# The command line's words (predict, features, convert, export, info).
CLI = {
    "local_file": "--checkpoint FILE",
    "num_classes": "a --model NAME with that many classes, or a checkpoint of ours (it carries its config)",
    "model_name": "--model NAME",
    "matching_model": "the --model NAME that matches the checkpoint (see `eva02 list`)",
}
# Run configs (train, test, pretrain): every choice is a config field.
CONFIG = {
    "local_file": "--set model.init=FILE",
    "num_classes": "--set model.num_classes=N",
    "model_name": "--set model.name=NAME",
    "matching_model": "--set model.name=NAME (and the model.* sizes) matching the checkpoint",
}

_WORDS: ContextVar[dict[str, str]] = ContextVar("eva02_hint_words", default=PYTHON)


def hint(key: str) -> str:
    """The current caller's words for `key` (see PYTHON for the keys)."""
    return _WORDS.get().get(key, PYTHON[key])


@contextlib.contextmanager
def using(words: dict[str, str]) -> Iterator[None]:
    """Within the block, messages name fixes in `words` (CLI, CONFIG, or your own)."""
    token = _WORDS.set({**PYTHON, **words})
    try:
        yield
    finally:
        _WORDS.reset(token)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images' (`plural` for nouns not made with an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
