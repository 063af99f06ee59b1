"""How text becomes tokens: one row per token with its id, vocabulary piece, the bytes it stands for, and whether it
is a special token."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.text.tokenizer import Tokenizer


@dataclass
class TokenRow:
    """One token of a sequence: position, id, vocabulary piece ('▁Hello', '<0x0A>'), its bytes, special or not."""

    index: int
    token_id: int
    piece: str
    bytes: bytes
    special: bool

    @property
    def text(self) -> str | None:
        """The bytes as UTF-8 text; None for part of a character (a byte-fallback token such as '<0xF0>')."""
        try:
            return self.bytes.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def to_json(self) -> dict:
        """A JSON-ready dict: the fields, bytes as a list of ints, and `text`."""
        d = asdict(self)
        d["bytes"] = list(self.bytes)
        d["text"] = self.text
        return d


def token_rows(tokenizer: Tokenizer, ids) -> list[TokenRow]:
    """ids (sequence of ints) -> one TokenRow per token, in order."""
    return [TokenRow(index=i, token_id=int(t), piece=tokenizer.id_to_token(t), bytes=tokenizer.token_bytes(t),
                     special=int(t) in tokenizer.special_ids) for i, t in enumerate(ids)]


def shown_piece(piece: str) -> str:
    """A piece as a one-line label: characters that do not print (a newline, a tab) written as escapes ('\\n')."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in piece)
