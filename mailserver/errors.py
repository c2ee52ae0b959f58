"""mailserver's exception hierarchy (for code that embeds the server).

Every error says whether it is temporary (try again later) or permanent, and
carries an RFC 3463 enhanced status code, so an application can map it to a
retry, a user-facing message or a bounce without parsing text.
"""

from __future__ import annotations


class MailserverError(Exception):
    """Base class.  ``status`` is an enhanced status code (``4.3.0``)."""

    temporary: bool = True
    status: str = "4.3.0"

    def __init__(self, text: str = "", *, status: str | None = None):
        super().__init__(text)
        self.text = text
        if status is not None:
            self.status = status
            self.temporary = status.startswith("4")

    @property
    def permanent(self) -> bool:
        return not self.temporary


class TemporaryError(MailserverError):
    temporary = True
    status = "4.3.0"


class PermanentError(MailserverError):
    temporary = False
    status = "5.0.0"


class SubmissionError(PermanentError):
    """A message given to ``MailServer.submit`` cannot be accepted
    (no recipients, bad address, over ``message_size_limit``)."""

    status = "5.5.4"


class QueueWriteError(TemporaryError):
    """The queue could not store the message durably (disk full, I/O error)."""

    status = "4.3.0"


class NotRunningError(TemporaryError):
    """The server is not started (or already stopped)."""

    status = "4.3.2"
