"""The client's one boundary: every HTTP status class and every aiohttp exception mapped.

A scripted aiohttp server on 127.0.0.1 answers what each test asks of it (a status, a
body, a dropped connection, a stall, a cut body); a port that is closed gives a real
refusal. The emulator checks that its own 401/429 wording is read the same way.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web

from sfbatch.client import TRANSPORT_ERRORS, SiliconFlowClient, map_transport_error
from sfbatch.emulator import Emulator
from sfbatch.errors import (
    AccountBlockedError,
    ApiError,
    AuthenticationError,
    BadRequestError,
    DailyQuotaError,
    EndpointNotFoundError,
    MalformedResponseError,
    ModelDisabledError,
    RateLimitError,
    RequestTimeoutError,
    RunBlockedError,
    ServerError,
    TransportError,
    redact,
)

KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """A loopback server whose next answer is whatever ``handler`` returns."""

    base_url: str = ""
    handler: Handler | None = None
    requests: list[str] = field(default_factory=list)

    def reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, body=data, headers=headers)

        self.handler = handler

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        assert self.handler is not None
        return await self.handler(request)


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scripted.dispatch)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scripted.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield scripted
    finally:
        await runner.cleanup()


def client_for(base_url: str, **kwargs: float) -> SiliconFlowClient:
    return SiliconFlowClient(base_url=base_url, api_key=KEY, **kwargs)  # type: ignore[arg-type]


async def failure(base_url: str, request: dict[str, object] | None = None) -> BaseException:
    async with client_for(base_url, request_timeout_s=0.5, connect_timeout_s=5.0) as client:
        with pytest.raises(Exception) as info:
            await client.generate(request or {"prompt": "a cat", "model": "Kwai-Kolors/Kolors"})
    return info.value


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_no_key(*texts: object) -> None:
    for text in texts:
        s = str(text)
        for n in range(5, len(KEY) + 1):
            for i in range(len(KEY) - n + 1):
                assert KEY[i : i + n] not in s, f"{KEY[i : i + n]!r} leaked in {s[-80:]!r}"


# -- statuses ---------------------------------------------------------------------------


async def test_400_fails_the_item_with_the_servers_code(server: Scripted) -> None:
    server.reply(400, {"code": 20012, "message": "Model does not exist.", "data": None})
    exc = await failure(server.base_url)
    assert type(exc) is BadRequestError and not exc.retryable
    assert exc.status == 400 and exc.code == 20012 and "Model does not exist" in str(exc)


async def test_401_is_authentication(server: Scripted) -> None:
    server.reply(401, "Invalid token")
    exc = await failure(server.base_url)
    assert type(exc) is AuthenticationError and exc.status == 401
    assert "Invalid token" in str(exc) and "SILICONFLOW_API_KEY" in str(exc)


@pytest.mark.parametrize(
    ("body", "what_to_do"),
    [
        ({"code": 30001, "message": "Sorry, your account balance is insufficient"}, "top up"),
        ({"code": "30011", "message": "Please complete real-name verification"}, "real-name"),
        ("403 Forbidden", "permissions"),
    ],
)
async def test_403_for_the_account_blocks_the_run_without_blaming_the_key(
    server: Scripted, body: object, what_to_do: str
) -> None:
    server.reply(403, body)
    exc = await failure(server.base_url)
    assert isinstance(exc, AccountBlockedError) and isinstance(exc, RunBlockedError)
    assert isinstance(exc, ApiError) and not isinstance(exc, AuthenticationError)
    assert exc.status == 403 and not exc.retryable
    message = str(exc)
    assert what_to_do in message and "run the same command again" in message
    assert "SILICONFLOW_API_KEY" not in message and "key" not in message.lower()
    said = body["message"] if isinstance(body, dict) else body
    assert f'"{said}"' in message


async def test_403_model_disabled_fails_only_that_models_rows(server: Scripted) -> None:
    server.reply(403, {"code": 30003, "message": "Model disabled."})
    exc = await failure(server.base_url, {"prompt": "a cat", "model": "Qwen/Qwen-Image"})
    assert isinstance(exc, ModelDisabledError) and isinstance(exc, BadRequestError)
    assert not isinstance(exc, RunBlockedError)
    assert exc.model == "Qwen/Qwen-Image" and exc.code == 30003 and exc.status == 403
    assert exc.to_record() == {"status": 403, "code": 30003, "message": str(exc)}
    assert "Qwen/Qwen-Image" in str(exc)


async def test_404_is_a_wrong_base_url(server: Scripted) -> None:
    server.reply(404, b"404 page not found", {"Content-Type": "text/plain"})
    exc = await failure(server.base_url)
    assert type(exc) is EndpointNotFoundError and "/v1" in str(exc)


@pytest.mark.parametrize(
    ("message", "cls", "limit"),
    [
        ("Request was rejected due to rate limiting. Details:IPM limit reached.", "minute", "IPM"),
        ("Request was rejected due to rate limiting. Details:RPM limit reached.", "minute", "RPM"),
        ("Request was rejected due to rate limiting. Details:TPM limit reached.", "minute", "TPM"),
        ("Request was rejected due to rate limiting.", "minute", None),
        ("Request was rejected due to rate limiting. Details:IPD limit reached.", "day", "IPD"),
        ("Request was rejected due to rate limiting. Details:RPD limit reached.", "day", "RPD"),
        ("daily limit reached", "day", None),
    ],
)
async def test_429_names_its_limit(
    server: Scripted, message: str, cls: str, limit: str | None
) -> None:
    server.reply(429, {"code": 50604, "message": message}, {"Retry-After": "7"})
    exc = await failure(server.base_url)
    assert isinstance(exc, RateLimitError) and exc.limit == limit and exc.code == 50604
    assert isinstance(exc, DailyQuotaError) is (cls == "day")
    assert exc.retryable is (cls == "minute") and exc.retry_after_s == 7.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, {"code": 50505, "message": "Model service overloaded. Please try again later."}),
        (500, {"code": 50000, "message": "Internal server error"}),
        (504, b"Gateway Timeout"),
        (502, b"<html><body>bad gateway</body></html>"),
    ],
)
async def test_5xx_is_retried(server: Scripted, status: int, body: object) -> None:
    server.reply(status, body)
    exc = await failure(server.base_url)
    assert type(exc) is ServerError and exc.retryable and exc.status == status


@pytest.mark.parametrize(
    "body",
    [b"not json at all", b"[]", b'{"images": []}', b'{"images": [{"url": ""}]}', b'"ok"'],
)
async def test_a_malformed_200_is_retried(server: Scripted, body: bytes) -> None:
    server.reply(200, body)
    exc = await failure(server.base_url)
    assert type(exc) is MalformedResponseError and exc.retryable


async def test_a_long_error_body_arriving_in_pieces_is_read_whole(server: Scripted) -> None:
    message = "x" * 3000 + " Details:IPD limit reached."

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=429)
        await resp.prepare(request)
        body = orjson.dumps({"message": message})
        for i in range(0, len(body), 500):
            await resp.write(body[i : i + 500])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    server.handler = handler
    exc = await failure(server.base_url)
    assert isinstance(exc, DailyQuotaError) and exc.limit == "IPD"
    assert len(str(exc)) < 600  # cut to length for the manifest


# -- secrets ------------------------------------------------------------------------------


async def test_a_key_echoed_anywhere_in_an_error_never_comes_back(server: Scripted) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        # The key in the code field, at the 500-character cut of the message, and as
        # the trace id: the three places a careless gateway echoes it.
        message = "y" * (500 - 10) + key + " and again " + key
        body = {"code": f"bad key {key}", "message": message}
        return web.Response(
            status=400, body=orjson.dumps(body), headers={"x-siliconcloud-trace-id": key}
        )

    server.handler = echo
    exc = await failure(server.base_url)
    assert isinstance(exc, BadRequestError)
    assert_no_key(str(exc), exc.code, exc.trace_id, orjson.dumps(exc.to_record()))
    assert "***" in str(exc) and exc.code == "bad key ***"


async def test_a_key_in_a_plain_text_body_never_comes_back(server: Scripted) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.Response(status=502, text=("z" * 495) + key)

    server.handler = echo
    exc = await failure(server.base_url)
    assert isinstance(exc, ServerError)
    assert_no_key(str(exc), orjson.dumps(exc.to_record()))


def test_redact_cuts_first_and_scrubs_a_key_split_by_any_cut() -> None:
    for cut in range(480, 500 + len(KEY)):
        text = redact("a" * 480 + KEY + " tail", KEY, max_chars=cut)
        assert len(text) <= cut + 3
        assert_no_key(text)
    # A key someone else already cut, at either end.
    assert_no_key(redact(KEY[:-6] + " ...", KEY), redact("... " + KEY[9:], KEY))
    assert redact("nothing here", KEY) == "nothing here"
    assert redact("sk-a", KEY) == "sk-a"  # a short, public prefix is not worth hiding


# -- exceptions ---------------------------------------------------------------------------


async def test_a_refused_connection_is_connection_level() -> None:
    exc = await failure(f"http://127.0.0.1:{free_closed_port()}/v1")
    assert type(exc) is TransportError and exc.connection_level and exc.retryable


async def test_a_connection_closed_before_any_answer_is_connection_level(
    server: Scripted,
) -> None:
    async def close(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=499)

    server.handler = close
    exc = await failure(server.base_url)
    assert type(exc) is TransportError and exc.connection_level


async def test_a_reset_connection_is_connection_level(server: Scripted) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()  # RST instead of FIN
        return web.Response(status=499)

    server.handler = reset
    exc = await failure(server.base_url)
    assert isinstance(exc, TransportError) and exc.connection_level


async def test_a_stalled_answer_times_out_but_is_not_connection_level(server: Scripted) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    server.handler = stall
    exc = await failure(server.base_url)
    assert type(exc) is RequestTimeoutError and isinstance(exc, TimeoutError)
    assert not exc.connection_level and exc.retryable


async def test_a_body_cut_short_is_a_transport_error_of_the_request(server: Scripted) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"images": [')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    server.handler = cut
    exc = await failure(server.base_url)
    assert type(exc) is TransportError and not exc.connection_level
    assert "ClientPayloadError" in str(exc)


def aiohttp_exception_classes() -> list[type[BaseException]]:
    return [
        obj
        for name in aiohttp.__all__
        if isinstance(obj := getattr(aiohttp, name), type) and issubclass(obj, BaseException)
    ]


# Every exception class aiohttp exports, with whether the client treats it as the
# endpoint being unreachable. A new aiohttp class fails this test until it is decided.
EXPECTED_CONNECTION_LEVEL = {
    "ClientConnectionError": True,
    "ClientConnectionResetError": True,
    "ClientConnectorCertificateError": True,
    "ClientConnectorDNSError": True,
    "ClientConnectorError": True,
    "ClientConnectorSSLError": True,
    "ClientOSError": True,
    "ClientProxyConnectionError": True,
    "ClientSSLError": True,
    "ServerConnectionError": True,
    "ServerDisconnectedError": True,
    "ConnectionTimeoutError": True,
    "ClientHttpProxyError": True,
    "ServerFingerprintMismatch": False,
    "ServerTimeoutError": False,
    "SocketTimeoutError": False,
    "ClientError": False,
    "ClientPayloadError": False,
    "ClientResponseError": False,
    "ContentTypeError": False,
    "InvalidURL": False,
    "InvalidUrlClientError": False,
    "InvalidUrlRedirectClientError": False,
    "NonHttpUrlClientError": False,
    "NonHttpUrlRedirectClientError": False,
    "RedirectClientError": False,
    "TooManyRedirects": False,
    "UploadAbortedError": False,
    "WSServerHandshakeError": False,
}
# Raised by websocket and multipart code only, never by an HTTP request.
NOT_SEEN_BY_THE_CLIENT = {
    "WebSocketError",
    "WSMessageTypeError",
    "EofStream",
    "BadContentDispositionHeader",
    "BadContentDispositionParam",
}


def test_every_aiohttp_exception_is_mapped() -> None:
    names = {cls.__name__ for cls in aiohttp_exception_classes()}
    assert names == set(EXPECTED_CONNECTION_LEVEL) | NOT_SEEN_BY_THE_CLIENT
    for cls in aiohttp_exception_classes():
        if cls.__name__ in NOT_SEEN_BY_THE_CLIENT:
            assert not issubclass(cls, aiohttp.ClientError)
            continue
        exc = cls.__new__(cls)  # their constructors differ; the mapping reads only the type
        exc.args = ("boom " + KEY,)
        mapped = map_transport_error(exc, "http://127.0.0.1:1/v1/x", secret=KEY)
        assert isinstance(mapped, TransportError), cls
        assert mapped.connection_level is EXPECTED_CONNECTION_LEVEL[cls.__name__], cls
        assert isinstance(mapped, RequestTimeoutError) is issubclass(cls, TimeoutError), cls
        assert cls.__name__ in str(mapped) or isinstance(mapped, RequestTimeoutError)
        assert_no_key(str(mapped))
    # The table's builtin rows: a total deadline, and an OS error aiohttp let through.
    timeout = map_transport_error(TimeoutError(), "u", secret=KEY)
    assert type(timeout) is RequestTimeoutError and not timeout.connection_level
    reset = map_transport_error(ConnectionResetError(104, "reset"), "u", secret=KEY)
    assert type(reset) is TransportError and reset.connection_level
    assert all(issubclass(to, TransportError) for _, to, _ in TRANSPORT_ERRORS)


# -- the emulator's wording, and the probe -----------------------------------------------


async def test_the_emulators_answers_map_the_same_way() -> None:
    async with Emulator(host="127.0.0.1", port=0, ipm=1) as emu:
        async with SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key) as client:
            await client.generate({"prompt": "a cat"})
            with pytest.raises(RateLimitError) as info:
                await client.generate({"prompt": "a cat"})
            assert info.value.limit == "IPM" and not isinstance(info.value, DailyQuotaError)
        async with SiliconFlowClient(base_url=emu.base_url, api_key="sk-nope") as client:
            with pytest.raises(AuthenticationError):
                await client.generate({"prompt": "a cat"})


async def test_probe_answers_for_any_http_status_and_raises_when_unreachable(
    server: Scripted,
) -> None:
    server.reply(401, "Invalid token")
    async with client_for(server.base_url) as client:
        await client.probe()
    assert server.requests == ["GET /v1/models"]
    async with client_for(f"http://127.0.0.1:{free_closed_port()}/v1") as client:
        with pytest.raises(TransportError) as info:
            await client.probe()
    assert info.value.connection_level


async def test_a_401_names_which_of_several_keys_to_check(server: Scripted) -> None:
    server.reply(401, "Invalid token")
    name = "key #1 of the run's keys (counting from 0)"
    async with SiliconFlowClient(base_url=server.base_url, api_key=KEY, key_name=name) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.generate({"prompt": "a cat"})
    assert "check key #1 of the run's keys" in str(info.value)
    assert "SILICONFLOW_API_KEY " not in str(info.value)
    assert_no_key(info.value)


async def test_model_names_from_the_server_never_carry_the_key(server: Scripted) -> None:
    server.reply(200, {"data": [{"id": "Kwai-Kolors/Kolors"}, {"id": f"echo-{KEY}"}]})
    async with client_for(server.base_url) as client:
        models = await client.list_models()
    assert models[0] == "Kwai-Kolors/Kolors" and models[1].startswith("echo-")
    assert_no_key(*models)
