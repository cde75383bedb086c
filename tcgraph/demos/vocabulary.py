"""The text demo's prompt vocabulary and prompt templates, without torch (the CLI's `--help` lists them).

`tcgraph.demos.digits_text` re-exports every name here. A prompt word outside the vocabulary reads
as "<unk>", which the demo learned to ignore; `PromptEncoder.encode` warns about such words
(`UnknownWordsWarning`, naming them and the vocabulary).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

PAD, END, UNK = "<pad>", "</s>", "<unk>"
SPECIAL = (PAD, END, UNK)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY: tuple[str, ...] = (PAD, END, UNK, "a", "an", "the", "handwritten", "digit", "number", "of",
                               *WORDS, *(str(d) for d in range(10)))

# Prompt templates of a digit: {word} is its name ("seven"), {num} its numeral ("7").
TEMPLATES = ("a handwritten {word}", "the digit {num}", "{word}", "a {num}", "number {word}",
             "a handwritten digit {num}", "the number {word}", "{num}", "an image of the digit {word}")
# "image" is not in the vocabulary on purpose: the last template teaches the model that an unknown word
# ("<unk>") carries nothing.
PROMPTS: dict[int, tuple[str, ...]] = {d: tuple(t.format(word=WORDS[d], num=d) for t in TEMPLATES) for d in range(10)}


class UnknownWordsWarning(UserWarning):
    """Prompt words outside the text demo's vocabulary; `words` holds them, in order of first use."""

    def __init__(self, message: str, words: Sequence[str] = ()):
        super().__init__(message)
        self.words = tuple(words)


def split_words(prompt: str) -> list[str]:
    """The lower-cased words of a prompt, split on whitespace and punctuation."""
    return [w for w in re.split(r"[\W_]+", prompt.lower()) if w]


def describe_vocabulary(vocabulary: Iterable[str] = VOCABULARY) -> str:
    """The words a prompt may use, special tokens left out and the numerals 0..9 as one range."""
    words = [w for w in vocabulary if w not in SPECIAL]
    numerals = [str(d) for d in range(10)]
    if all(n in words for n in numerals):
        words = [w for w in words if w not in numerals] + ["0-9"]
    return ", ".join(words)


def unknown_words(prompts: Iterable[str], vocabulary: Iterable[str] = VOCABULARY) -> list[str]:
    """The words of `prompts` outside `vocabulary`, each once, in order of first use."""
    known = set(vocabulary) - set(SPECIAL)
    out: list[str] = []
    for prompt in prompts:
        out += [w for w in split_words(prompt) if w not in known and w not in out]
    return out


def unknown_words_message(words: Sequence[str], vocabulary: Iterable[str] = VOCABULARY) -> str:
    """One line: which words the demo does not know, what it makes of them, and the words it knows."""
    listed = ", ".join(repr(w) for w in words)
    return (f"the digits-text demo does not know the word{'s' if len(words) > 1 else ''} {listed}: each reads as "
            f"{UNK}, which carries nothing; its vocabulary: {describe_vocabulary(vocabulary)}")


__all__ = ["END", "PAD", "PROMPTS", "SPECIAL", "TEMPLATES", "UNK", "VOCABULARY", "WORDS", "UnknownWordsWarning",
           "describe_vocabulary", "split_words", "unknown_words", "unknown_words_message"]
