"""Character-level and byte-level tokenizers for language models.

A tokenizer turns text into a list of integer ids and back. `to_dict()` returns a
JSON-serialisable description that `tokenizer_from_dict` turns back into an equal
tokenizer. Models store that description in their checkpoints so that generated ids can
still be decoded after loading.
"""

from __future__ import annotations

from typing import Any


class CharTokenizer:
    """One id per distinct character of a corpus, in sorted order (id 0 is the smallest).

    The vocabulary is fixed when the tokenizer is built, so text with characters that were
    not in the corpus cannot be encoded.
    """

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ValueError("CharTokenizer needs at least one character, got an empty vocabulary")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError(
                "CharTokenizer expects its characters sorted and without repeats; "
                "build it with CharTokenizer.from_text(corpus)"
            )
        self.chars = chars
        self._id_of = {char: index for index, char in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from the sorted set of characters of `text`."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[char] for char in text]
        except KeyError:
            unknown = sorted(set(text) - self._id_of.keys())
            raise ValueError(
                f"cannot encode {len(unknown)} character(s) that are not in the vocabulary of "
                f"{self.vocab_size} characters: {''.join(unknown)!r}. Use only characters of the "
                "training corpus, or the byte tokenizer, which encodes any text."
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[index] for index in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, description: dict[str, Any]) -> CharTokenizer:
        return cls(description["chars"])


class ByteTokenizer:
    """The UTF-8 bytes of the text as ids 0-255, so any text can be encoded."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model can generate byte sequences that are not valid UTF-8; those bytes are
        # shown as U+FFFD instead of raising.
        return bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, description: dict[str, Any]) -> ByteTokenizer:
        return cls()


Tokenizer = CharTokenizer | ByteTokenizer

TOKENIZER_CLASSES: dict[str, type[CharTokenizer] | type[ByteTokenizer]] = {
    CharTokenizer.kind: CharTokenizer,
    ByteTokenizer.kind: ByteTokenizer,
}


def build_tokenizer(kind: str, corpus: str) -> Tokenizer:
    """Create the tokenizer named `kind` ("char" or "byte") for `corpus`."""
    if kind == "char":
        return CharTokenizer.from_text(corpus)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {sorted(TOKENIZER_CLASSES)}")


def tokenizer_from_dict(description: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from the output of its `to_dict()`."""
    kind = description.get("kind")
    if kind not in TOKENIZER_CLASSES:
        raise ValueError(
            f"unknown tokenizer kind {kind!r} in {description!r}; "
            f"expected one of {sorted(TOKENIZER_CLASSES)}"
        )
    return TOKENIZER_CLASSES[kind].from_dict(description)
