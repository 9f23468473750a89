"""Where sent email goes: an SMTP server, or a folder of .eml files when there is none.

The sender needs one answer from a transport: was the message accepted, may it be
retried, or will it never be delivered. So every failure becomes one of two
exceptions: TransientFailure (connection refused, timeouts, 4xx replies: try again
later) or PermanentFailure (a 5xx reply to this message or its recipient: retrying
cannot help). A 5xx before the recipient is named (the greeting, EHLO, AUTH, the
sender address) refuses this client, not the message: a configuration to fix (the
credentials, CJM_EMAIL_FROM, the relay policy), so it is transient, and the queue
waits for the fix instead of failing every email in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPNotSupported,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
)

from channels.email.message import OutgoingEmail

DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
SERVICE_CLOSING = 421  # the server is closing this connection: never reuse it
# At MAIL FROM, the one refusal about the message itself: too large for the server.
MESSAGE_TOO_LARGE = 552
# A Message-ID may hold "/" or other characters a file name must not.
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._@-]")


class TransientFailure(Exception):
    """The message was not sent, and sending it again later may succeed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentFailure(Exception):
    """The message was refused for good; `code` is the SMTP reply code.

    `code` is None when the refusal came from the client side (the server lacks an
    extension the message needs). `recipient_refused` tells a refused address (a hard
    bounce, worth suppressing) from a refused message or sender, which says nothing
    about the address.
    """

    def __init__(self, reason: str, code: int | None, *, recipient_refused: bool = False) -> None:
        super().__init__(reason if code is None else f"{code} {reason}")
        self.reason = reason
        self.code = code
        self.recipient_refused = recipient_refused


class Transport(Protocol):
    """What the sender needs from a way of delivering email, so tests and the embedded
    default (EmlDirectory) stand in for a real SMTP server."""

    async def send(self, message: OutgoingEmail) -> None: ...

    async def close(self) -> None: ...


class SmtpTransport:
    """Sends through an SMTP server given as `smtp://[user:pass@]host[:port]`, or
    `smtps://` for implicit TLS (`smtp://` upgrades with STARTTLS when offered).

    Up to `concurrency` messages are sent at once, each on its own connection, and
    connections stay open for the next message: a handshake (and a TLS one) per
    email would cost more than the email. A connection that failed is dropped and a
    new one opened on next use.
    """

    def __init__(self, url: str, *, concurrency: int = 8, timeout: float = 30) -> None:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"expected smtp://host[:port] or smtps://host[:port], got {url!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._hostname = parts.hostname
        self._port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._use_tls = parts.scheme == "smtps"
        self._username = unquote(parts.username) if parts.username is not None else None
        self._password = unquote(parts.password) if parts.password is not None else None
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._idle: list[SMTP] = []

    async def send(self, message: OutgoingEmail) -> None:
        async with self._slots:
            client = await self._checkout()
            try:
                await _transaction(client, message)
            except SMTPException as error:
                self._checkin(client, reusable=_keeps_session(error))
                raise _translate(error) from error
            except BaseException:  # cancelled half-way through a transaction
                client.close()
                raise
            self._checkin(client, reusable=True)

    async def close(self) -> None:
        """Says goodbye on every idle connection; call it after the last send."""
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(SMTPException, OSError):
                await client.quit()
            client.close()

    async def _checkout(self) -> SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:  # the server may have closed an idle one
                return client
            client.close()
        client = SMTP(
            hostname=self._hostname,
            port=self._port,
            username=self._username,
            password=self._password,
            use_tls=self._use_tls,
            timeout=self._timeout,
        )
        try:
            await client.connect()
            # Greeted now rather than by the first MAIL: the envelope needs to know
            # the server's extensions (SIZE, SMTPUTF8) before it is written.
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except SMTPHeloError:
                    await client.helo()
        except SMTPException as error:
            client.close()
            raise _translate(error) from error
        return client

    def _checkin(self, client: SMTP, *, reusable: bool) -> None:
        if reusable and client.is_connected:
            self._idle.append(client)
        else:
            client.close()


async def _transaction(client: SMTP, message: OutgoingEmail) -> None:
    """MAIL, RCPT and DATA for one message to its one recipient.

    What `SMTP.sendmail` does for one recipient, less what build_message made needless:
    sendmail parses each address once more than MAIL and RCPT do (with the standard
    library's slow address parser), and rewrites the line endings of the whole message
    once more than DATA does, to size it; the bytes are CRLF already, so their length
    is the size. Together about 140 µs of CPU a message, a tenth of what cjm spends on
    an email. A refusal resets the envelope, so the connection carries the next
    message, as sendmail does.
    """
    utf8 = not (message.envelope_from.isascii() and message.recipient.isascii())
    if utf8 and not client.supports_extension("smtputf8"):
        # Checked before MAIL: an envelope left half-written would refuse the next one.
        raise SMTPNotSupported("the server cannot take this address (it lacks SMTPUTF8)")
    options = [f"SIZE={len(message.data)}"] if client.supports_extension("size") else []
    if utf8:
        options.append("SMTPUTF8")
    encoding = "utf-8" if utf8 else "ascii"
    try:
        await client.mail(message.envelope_from, options=options, encoding=encoding)
        await client.rcpt(message.recipient, encoding=encoding)
        await client.data(message.data)
    except SMTPResponseException:
        with contextlib.suppress(ConnectionError, SMTPResponseException):
            await client.rset()
        raise


def _keeps_session(error: SMTPException) -> bool:
    """Whether the connection can carry the next message after `error`.

    A refusal leaves the session usable (_transaction resets the envelope), except 421,
    the server closing; a lost connection or a timeout may have left it half-way.
    """
    if isinstance(error, SMTPNotSupported):  # found out before any command was sent
        return True
    return isinstance(error, SMTPResponseException) and error.code != SERVICE_CLOSING


def _failure(code: int, reason: str, *, recipient: bool) -> TransientFailure | PermanentFailure:
    if code >= 500:
        return PermanentFailure(reason, code, recipient_refused=recipient)
    return TransientFailure(f"{code} {reason}")


def _refuses_the_client(error: SMTPResponseException) -> bool:
    """A refusal before any recipient is named: of the connection, the login or the
    sender address, which every message would meet alike."""
    if isinstance(error, SMTPSenderRefused):
        return error.code != MESSAGE_TOO_LARGE
    return isinstance(error, (SMTPConnectResponseError, SMTPHeloError, SMTPAuthenticationError))


def _translate(error: SMTPException) -> TransientFailure | PermanentFailure:
    if isinstance(error, SMTPRecipientRefused):
        return _failure(error.code, f"{error.recipient}: {error.message}", recipient=True)
    if isinstance(error, SMTPResponseException):
        if _refuses_the_client(error):
            return TransientFailure(f"the server refuses this client: {error.code} {error.message}")
        return _failure(error.code, error.message, recipient=False)
    if isinstance(error, SMTPNotSupported):
        return PermanentFailure(error.message, None)
    # Connection refused or lost, timeouts: nothing the server said about this message.
    return TransientFailure(error.message)


class EmlDirectory:
    """Writes each message as an .eml file into a folder instead of sending it.

    The embedded default when no SMTP server is configured: nothing leaves the
    machine, and every email can still be opened in a mail client. Files are named
    `<UTC time>-<Message-ID>.eml`, so a listing is in sending order, and appear whole
    or not at all (written aside, then renamed into place).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, message: OutgoingEmail) -> None:
        await asyncio.to_thread(self._write, message)

    async def close(self) -> None:
        """Nothing is held open between messages."""

    def _write(self, message: OutgoingEmail) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        message_id = message.message_id or uuid.uuid4().hex
        name = f"{stamp}-{_UNSAFE_IN_NAME.sub('_', message_id.strip().strip('<>'))}.eml"
        descriptor, temporary = tempfile.mkstemp(dir=self.path, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(message.data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
