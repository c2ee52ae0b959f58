"""SMTP replies as values.

Policy code never writes to the wire: it returns a :class:`Reply` (basic code,
enhanced status code, text) and one adapter in :mod:`mailserver.smtpd` writes
it.  Tests compare replies directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``550 5.1.1 <a@b>: Recipient address rejected: ...``.

    ``text`` may contain several lines separated by ``\\n``; they are sent as a
    multi-line reply, each line carrying the code and the enhanced code.
    """

    code: int
    enhanced: str
    text: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply as wire lines without CRLF (multi-line aware)."""
        parts = self.text.split("\n") if self.text else [""]
        last = len(parts) - 1
        out = []
        for i, part in enumerate(parts):
            head = f"{self.code}{'-' if i < last else ' '}"
            body = f"{self.enhanced} {part}" if self.enhanced else part
            out.append((head + body).rstrip())
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())


class ReplyError(Exception):
    """An exception that carries the reply to send (raised by parsers/policy)."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply
