"""Sending over real SMTP (an aiosmtpd server on localhost) and into a folder of .eml files."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from channels.email import RenderedEmail
from channels.email.message import OutgoingEmail, build_message
from channels.email.transport import (
    EmlDirectory,
    PermanentFailure,
    SmtpTransport,
    TransientFailure,
)


class Recorder:
    """An aiosmtpd handler that keeps what it received and refuses what it is told to."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.sessions: list[Session] = []
        self.rcpt_reply: str | None = None
        self.refused_addresses: set[str] | None = None  # None: rcpt_reply for every address
        self.data_reply: str | None = None

    async def handle_EHLO(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not any(seen is session for seen in self.sessions):
            self.sessions.append(session)
        return responses

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_reply and (
            self.refused_addresses is None or address in self.refused_addresses
        ):
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def received(self) -> list[EmailMessage]:
        messages = []
        for envelope in self.envelopes:
            assert isinstance(envelope.content, bytes)
            message = message_from_bytes(envelope.content, policy=default)
            assert isinstance(message, EmailMessage)
            messages.append(message)
        return messages


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def written(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def read(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server_url(recorder: Recorder) -> Iterator[str]:
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{controller.port}"
    finally:
        controller.stop()


@asynccontextmanager
async def transport_to_own_server(
    recorder: Recorder, *, smtputf8: bool, concurrency: int = 4
) -> AsyncIterator[SmtpTransport]:
    """A transport to a server of its own, which offers SMTPUTF8 or not."""
    server = Controller(recorder, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=smtputf8)
    server.start()
    transport = SmtpTransport(f"smtp://127.0.0.1:{server.port}", concurrency=concurrency, timeout=5)
    try:
        yield transport
    finally:
        await transport.close()
        server.stop()


@pytest.fixture
async def transport(server_url: str) -> AsyncIterator[SmtpTransport]:
    transport = SmtpTransport(server_url, concurrency=2, timeout=5)
    try:
        yield transport
    finally:
        await transport.close()


LONG_UNSUBSCRIBE = "https://cjm.example.com/e/unsubscribe/" + "t" * 140 + "." + "s" * 22


_numbers = itertools.count(1)


def message(
    to: str = "ada@example.com",
    subject: str = "Doors for Ada",
    unsubscribe_url: str = "https://cjm.example.com/u/tok",
) -> OutgoingEmail:
    return build_message(
        RenderedEmail(
            subject=subject,
            html='<html><body><p>Hi <a href="https://shop.example.com/">Ada</a></p></body></html>',
            text="Hi Ada https://shop.example.com/",
        ),
        sender="news@shop.example.com",
        to=to,
        message_id=f"<{next(_numbers)}.test@shop.example.com>",
        unsubscribe_url=unsubscribe_url,
        click_url=lambda url: "https://cjm.example.com/c/tok",
        open_pixel_url="https://cjm.example.com/o/tok",
        now=datetime(2025, 3, 4, 9, 30, tzinfo=UTC),
    )


async def test_a_sent_message_arrives_with_its_headers_and_both_parts(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    sent = message(subject="Türen für Ada")

    await transport.send(sent)

    (envelope,) = recorder.envelopes
    assert envelope.mail_from == "news@shop.example.com"
    assert envelope.rcpt_tos == ["ada@example.com"]
    (received,) = recorder.received()
    assert received["Message-ID"] == sent.message_id
    assert received["Subject"] == "Türen für Ada"
    assert received["List-Unsubscribe"] == "<https://cjm.example.com/u/tok>"
    assert received["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text, html = received.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    assert text.get_content().strip() == "Hi Ada https://shop.example.com/"
    assert 'href="https://cjm.example.com/c/tok"' in html.get_content()


async def test_messages_sent_one_after_another_share_one_connection(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    for number in range(5):
        await transport.send(message(to=f"lead{number}@example.com"))

    assert len(recorder.envelopes) == 5
    assert len(recorder.sessions) == 1


async def test_concurrent_sends_open_at_most_the_configured_connections(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    await asyncio.gather(*(transport.send(message(to=f"l{n}@example.com")) for n in range(8)))

    assert len(recorder.envelopes) == 8
    assert 1 <= len(recorder.sessions) <= 2


async def test_a_refused_recipient_is_a_permanent_failure_with_its_code(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    recorder.rcpt_reply = "550 no such user"

    with pytest.raises(PermanentFailure) as failure:
        await transport.send(message())

    assert failure.value.code == 550
    assert failure.value.recipient_refused
    assert "no such user" in failure.value.reason


async def test_a_message_refused_after_data_is_permanent_but_not_a_refused_recipient(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    recorder.data_reply = "550 message rejected"

    with pytest.raises(PermanentFailure) as failure:
        await transport.send(message())

    assert failure.value.code == 550
    assert not failure.value.recipient_refused


async def test_a_4xx_reply_is_a_transient_failure(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    recorder.rcpt_reply = "451 try later"

    with pytest.raises(TransientFailure, match=r"451 .*try later"):
        await transport.send(message())


async def test_an_address_the_server_cannot_take_is_a_permanent_failure_without_a_code(
    recorder: Recorder,
) -> None:
    async with transport_to_own_server(recorder, smtputf8=False) as transport:
        with pytest.raises(PermanentFailure) as failure:
            await transport.send(message(to="zoë@example.com"))

    assert failure.value.code is None


async def test_an_address_the_server_cannot_take_leaves_the_connection_for_the_next_message(
    recorder: Recorder,
) -> None:
    """Refused before MAIL FROM: no envelope is left open to refuse the next message."""
    async with transport_to_own_server(recorder, smtputf8=False, concurrency=1) as transport:
        with pytest.raises(PermanentFailure):
            await transport.send(message(to="zoë@example.com"))
        await transport.send(message(to="ada@example.com"))

    assert [envelope.rcpt_tos for envelope in recorder.envelopes] == [["ada@example.com"]]
    assert len(recorder.sessions) == 1


async def test_a_non_ascii_address_is_delivered_where_the_server_offers_smtputf8(
    recorder: Recorder,
) -> None:
    async with transport_to_own_server(recorder, smtputf8=True) as transport:
        await transport.send(message(to="zoë@example.com"))

    [envelope] = recorder.envelopes
    assert envelope.rcpt_tos == ["zoë@example.com"]
    assert "SMTPUTF8" in envelope.mail_options
    assert b"\r\nTo: zo\xc3\xab@example.com\r\n" in envelope.original_content


async def test_the_envelope_declares_the_size_of_the_message_as_sent(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    sent = message()

    await transport.send(sent)

    [envelope] = recorder.envelopes
    assert f"SIZE={len(sent.data)}" in envelope.mail_options
    assert envelope.original_content == sent.data


async def test_the_connection_carries_on_after_a_refusal(
    transport: SmtpTransport, recorder: Recorder
) -> None:
    recorder.rcpt_reply = "550 no such user"
    with pytest.raises(PermanentFailure):
        await transport.send(message(to="gone@example.com"))
    recorder.rcpt_reply = None

    await transport.send(message(to="ada@example.com"))

    assert [envelope.rcpt_tos for envelope in recorder.envelopes] == [["ada@example.com"]]
    assert len(recorder.sessions) == 1


async def test_nothing_listening_is_a_transient_failure() -> None:
    transport = SmtpTransport(f"smtp://127.0.0.1:{free_port()}", timeout=5)

    with pytest.raises(TransientFailure):
        await transport.send(message())


async def test_a_server_that_never_answers_is_a_transient_failure_after_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", timeout=0.3)
    try:
        with pytest.raises(TransientFailure):
            await transport.send(message())
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_the_server_dropped_is_replaced_on_the_next_send(
    recorder: Recorder,
) -> None:
    port = free_port()
    first = Controller(recorder, hostname="127.0.0.1", port=port)
    first.start()
    transport = SmtpTransport(f"smtp://127.0.0.1:{port}", concurrency=1, timeout=5)
    await transport.send(message(to="first@example.com"))
    first.stop()  # hangs up on the idle connection
    second = Controller(recorder, hostname="127.0.0.1", port=port)
    second.start()
    try:
        await asyncio.sleep(0.1)  # lets the client see the hang-up

        await transport.send(message(to="second@example.com"))
    finally:
        await transport.close()
        second.stop()

    assert [envelope.rcpt_tos for envelope in recorder.envelopes] == [
        ["first@example.com"],
        ["second@example.com"],
    ]
    assert len(recorder.sessions) == 2


@pytest.mark.parametrize("url", ["http://mail.example.com", "smtp://", "mail.example.com:25"])
def test_a_url_that_is_not_smtp_is_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        SmtpTransport(url)


async def test_the_eml_directory_writes_a_parseable_message_per_send(tmp_path: Path) -> None:
    outbox = tmp_path / "var" / "outbox"
    sent = message()

    await EmlDirectory(outbox).send(sent)

    (path,) = written(outbox)
    assert path.suffix == ".eml"
    assert sent.message_id.strip("<>") in path.name
    received = message_from_bytes(read(path), policy=default)
    assert received["Message-ID"] == sent.message_id
    assert received.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in received.iter_parts()] == [
        "text/plain",
        "text/html",
    ]


async def test_the_eml_directory_names_files_in_sending_order(tmp_path: Path) -> None:
    outbox = EmlDirectory(tmp_path)
    first, second = message(), message()

    await outbox.send(first)
    await outbox.send(second)

    names = [path.name for path in written(tmp_path)]
    assert first.message_id.strip("<>") in names[0]
    assert second.message_id.strip("<>") in names[1]


async def test_a_long_list_unsubscribe_reaches_the_server_and_the_file_as_written(
    recorder: Recorder, tmp_path: Path
) -> None:
    server = Controller(recorder, hostname="127.0.0.1", port=free_port())
    server.start()
    transport = SmtpTransport(f"smtp://127.0.0.1:{server.port}", timeout=5)
    try:
        await transport.send(message(unsubscribe_url=LONG_UNSUBSCRIBE))
    finally:
        await transport.close()
        server.stop()
    await EmlDirectory(tmp_path).send(message(unsubscribe_url=LONG_UNSUBSCRIBE))

    header = f"List-Unsubscribe: <{LONG_UNSUBSCRIBE}>".encode()
    (envelope,) = recorder.envelopes
    assert header in bytes(envelope.original_content or b"")
    (path,) = written(tmp_path)
    assert header in read(path)
