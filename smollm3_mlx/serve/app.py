"""The OpenAI-compatible HTTP server: routes, auth, limits, streaming (`smollm3-mlx serve`).

Starlette + uvicorn + sse-starlette (the `server` extra), imported only here. Three dialects
(OpenAI chat and completions, OpenAI's Responses API, Anthropic's Messages API) map their bodies
onto one plan (request.py, responses.py, anthropic.py) and answer through one tail, `_answer`,
whose replies each dialect's Shape forms (reply.py, responses.py, anthropic.py); all of that on
the event loop's side. Generation runs on the engine's single worker thread (engine.py). Safe by
default: loopback only, a Host check against DNS rebinding, JSON bodies only (no cross-site form
posts), bounded bodies (size, nesting, and the time a client takes to send its headers and body),
no CORS unless asked.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..files import parse_json
from ..sample import Sampling
from .anthropic import (
    AnthropicShape,
    CountTokensRequest,
    MessagesRequest,
    chat_body as anthropic_chat_body,
    error_body as anthropic_error_body,
)
from .cache_dir import DEFAULT_DIR_BYTES
from .engine import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_QUEUE,
    Busy,
    Engine,
    Failed,
    Finished,
    Item,
    Job,
    Started,
    Token,
)
from .reply import ChatShape, Delta, Plan, Reply, Shape, Sse, TextShape, new_id
from .request import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    check_context,
    completion_prompt,
    constraint,
    error_body,
    now,
    parse,
    settings as request_settings,
    template_messages,
    thinking,
    unsupported,
)
from .responses import (
    ResponsesRequest,
    ResponsesShape,
    ResponseStore,
    chat_body as responses_chat_body,
)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_BODY = 4 * 1024**2
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's headers, then as many for its body
LOOPBACK_NAMES = ("localhost",)


class Fault(Exception):
    """An HTTP error: its status, message, OpenAI's type and code for it, and headers."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, **headers):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, None, self.code)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:  # host names are case-insensitive
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, api_key: str | None, allow_open: bool) -> str | None:
    """Why binding `host` this way is refused (None: it is fine)."""
    if is_loopback(host) or api_key or allow_open:
        return None
    return (
        f"--host {host} reaches beyond this machine: pass --api-key (or set SMOLLM3_MLX_API_KEY), "
        "or --allow-unauthenticated if an open server is really what you want"
    )


def api_key_problem(api_key: str | None) -> str | None:
    """Why `api_key` is refused (None: it is fine): an Authorization header carries visible
    ASCII only, so a key with anything else could never be sent."""
    if api_key and not all("!" <= c <= "~" for c in api_key):
        return "--api-key must be visible ASCII characters (no spaces): no client could send it"
    return None


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Api:
    """The routes, sharing the engine and the settings."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        api_key: str | None,
        loopback: bool,
        max_body: int,
        read_timeout: float,
    ):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.served = (model_name,)
        self.api_key = api_key.encode() if api_key else None
        self.loopback, self.max_body, self.read_timeout = loopback, max_body, read_timeout
        self.created = now()
        self.stored = ResponseStore()

    def guard(self, request: Request) -> None:
        host = _host_name(request.headers.get("host", ""))
        if self.loopback and not is_loopback(host):  # a rebound DNS name pointing here
            raise Fault(400, f"unexpected Host {host!r} for a loopback server",
                        "invalid_request_error")  # fmt: skip
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), self.api_key):
            raise Fault(
                401,
                "Incorrect or missing API key: send Authorization: Bearer <key> (or x-api-key)",
                "invalid_request_error",
                "invalid_api_key",
                **{"WWW-Authenticate": "Bearer"},
            )

    async def body(self, request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Fault(415, "the body must be JSON (Content-Type: application/json)",
                        "invalid_request_error")  # fmt: skip
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        data = bytearray()
        try:
            with anyio.fail_after(self.read_timeout):  # a stalled client holds nothing for long
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > self.max_body:
                        raise self._too_large()
        except TimeoutError:
            raise Fault(
                408,
                f"the body did not arrive within {self.read_timeout:g} s",
                "invalid_request_error",
                Connection="close",
            ) from None
        try:
            return parse_json(data)  # nesting bounded: a recursive reader never overflows
        except ValueError as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None

    def _too_large(self) -> Fault:
        return Fault(413, f"the body is larger than {self.max_body} bytes", "invalid_request_error")

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "ok", "busy": e.busy, "waiting": e.waiting})

    async def models(self, request: Request) -> Response:
        self.guard(request)
        return JSONResponse({"object": "list", "data": [self._model(m) for m in self.served]})

    async def model(self, request: Request) -> Response:
        self.guard(request)
        name = request.path_params["name"]
        if name not in self.served:
            raise Fault(404, f"the model {name!r} does not exist", "invalid_request_error",
                        "model_not_found")  # fmt: skip
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "smollm3-mlx"}

    async def chat(self, request: Request) -> Response:
        self.guard(request)
        r = parse(ChatRequest, await self.body(request))
        plan = await self._plan(r)
        meta = {"id": new_id("chatcmpl-"), "created": now(), "model": r.model}
        usage = r.stream_options is not None and r.stream_options.include_usage
        return await self._answer(request, plan, ChatShape(plan.reply, meta, usage), r.stream)

    async def completions(self, request: Request) -> Response:
        self.guard(request)
        r = parse(CompletionRequest, await self.body(request))
        settings = request_settings(r, self.served)
        prompt = completion_prompt(r, self.tokenizer)
        check_context(len(prompt), settings.max_tokens, self.engine.context)
        reply = Reply(self.tokenizer, prompt, stop=settings.stop,
                      top_logprobs=settings.top_logprobs, chat=False)  # fmt: skip
        meta = {"id": new_id("cmpl-"), "created": now(), "model": r.model}
        usage = r.stream_options is not None and r.stream_options.include_usage
        shape = TextShape(reply, meta, usage)
        return await self._answer(request, Plan(prompt, settings, [], reply), shape, r.stream)

    async def responses(self, request: Request) -> Response:
        self.guard(request)
        r = parse(ResponsesRequest, await self.body(request))
        history = self.stored.get(r.previous_response_id) if r.previous_response_id else []
        body = responses_chat_body(r, history)
        plan = await self._plan(parse(ChatRequest, body))
        conversation = body["messages"][1 if r.instructions else 0 :]  # instructions: not kept
        shape = ResponsesShape(plan.reply, r, self.stored if r.store else None, conversation)
        return await self._answer(request, plan, shape, r.stream)

    async def messages(self, request: Request) -> Response:
        self.guard(request)
        r = parse(MessagesRequest, await self.body(request))
        plan = await self._plan(parse(ChatRequest, anthropic_chat_body(r)))
        return await self._answer(request, plan, AnthropicShape(plan.reply, r.model), r.stream)

    async def count_tokens(self, request: Request) -> Response:
        self.guard(request)
        r = parse(CountTokensRequest, await self.body(request))
        chat = parse(ChatRequest, anthropic_chat_body(r))
        request_settings(chat, self.served)
        unsupported(chat)
        prompt = await self._prompt(chat, constraint(chat)["tools"])
        return JSONResponse({"input_tokens": len(prompt)})

    async def _plan(self, r: ChatRequest) -> Plan:
        """A chat request (whichever dialect it came in) as the plan every answer runs."""
        settings = request_settings(r, self.served)
        unsupported(r)
        wanted = constraint(r)
        prompt = await self._prompt(r, wanted["tools"])
        check_context(len(prompt), settings.max_tokens, self.engine.context)  # before a grammar
        room = settings.max_tokens or self.engine.context - len(prompt)
        processors = await anyio.to_thread.run_sync(lambda: self._processors(wanted, room))
        reply = Reply(
            self.tokenizer, prompt, stop=settings.stop, top_logprobs=settings.top_logprobs
        )
        return Plan(prompt, settings, processors, reply)

    async def _prompt(self, r: ChatRequest, tools: list[dict[str, Any]] | None) -> list[int]:
        messages, think = template_messages(r.messages), thinking(r)
        return await anyio.to_thread.run_sync(lambda: self._render(messages, think, tools))

    async def _answer(self, request: Request, plan: Plan, shape: Shape, stream: bool) -> Response:
        """The one tail of every answering route: submit the plan, then stream the shape's
        events, or collect the reply and send the shape's whole body."""
        job, items = self._submit(plan)
        if stream:
            return _sse(job, _stream(job, items, shape))
        finish = await _collect(request, job, items, plan.reply)
        return JSONResponse(shape.whole(finish))

    def _render(self, messages: list[dict[str, Any]], think: bool, tools) -> list[int]:
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, enable_thinking=think, tools=tools
            )
        except TemplateError as e:
            raise RequestError(f"the chat template refused the messages: {e}") from None
        assert isinstance(ids, list)
        return ids

    def _processors(self, wanted: dict[str, Any], room: int) -> list[Any]:
        """The request's constraints as logits processors (a grammar is compiled here; none,
        and no grammar engine loaded, when nothing but the ban on calls is asked)."""
        from ..constrain import ConstraintError, make_turn_processors

        try:
            processors, _ = make_turn_processors(self.tokenizer, room=room, **wanted)
        except ConstraintError as e:
            raise RequestError(str(e), e.param) from None
        return processors

    def _submit(self, plan: Plan) -> tuple[Job, asyncio.Queue[Item]]:
        loop, s = asyncio.get_running_loop(), plan.settings
        items: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        try:  # the ranges the core checks: an error here is the request's, not the server's
            sampling = Sampling.from_model(self.engine.model, **s.sampling, seed=s.seed)
        except ValueError as e:
            raise RequestError(str(e)) from None
        job = Job(plan.prompt, s.max_tokens, sampling, s.top_logprobs, plan.processors, emit=emit)
        try:
            self.engine.submit(job)
        except Busy as e:
            raise Fault(429, str(e), "rate_limit_error", "busy",
                        **{"Retry-After": str(e.retry_after)}) from None  # fmt: skip
        return job, items


async def _collect(request: Request, job: Job, items: asyncio.Queue[Item], reply: Reply) -> str:
    """Feed the reply until the job ends; a client that leaves cancels it at once."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    watcher = asyncio.create_task(watch())
    finish = "stop"
    try:
        async for d in _deltas(job, items, reply):
            if isinstance(d, str):
                finish = d
        return finish
    finally:
        watcher.cancel()
        job.cancel.set()


async def _deltas(job: Job, items: asyncio.Queue[Item], reply: Reply) -> AsyncIterator:
    """The job's items fed into `reply`: None once the prompt is in, the Deltas, then the
    finish reason (a str)."""
    while True:
        item = await items.get()
        if isinstance(item, Started):
            reply.usage.cached_tokens = item.cached_tokens
            yield None
        elif isinstance(item, Token):
            delta = reply.feed(item.id, item.logprob, item.top)
            if reply.stopped:
                job.cancel.set()
            if delta:
                yield delta
        elif isinstance(item, Finished):
            delta = reply.flush()
            if delta:
                yield delta
            yield reply.finish_reason(item.reason)
            return
        elif isinstance(item, Failed):
            raise Fault(500, f"generation failed: {item.error}", "server_error")


async def _stream(job: Job, items: asyncio.Queue[Item], shape: Shape) -> AsyncIterator[Sse]:
    """The shape's events for the job's reply."""
    try:
        async for d in _deltas(job, items, shape.reply):
            events = (
                shape.opened()
                if d is None
                else shape.delta(d)
                if isinstance(d, Delta)
                else shape.closed(d)
            )
            for event in events:
                yield event
    except Fault as e:  # the status line is sent already: the error goes in the stream
        for event in shape.failed(e.status, e.message):
            yield event
    finally:  # the client left, or the reply is complete: stop generating either way
        job.cancel.set()


def _sse(job: Job, events: AsyncIterator[Sse]) -> Response:
    shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down

    async def sent() -> AsyncIterator[dict[str, str]]:
        async def on_shutdown() -> None:
            await shutdown.wait()
            job.cancel.set()  # the answer ends, and the stream with its last events

        watcher = asyncio.create_task(on_shutdown())
        try:
            async for name, data in events:
                text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
                yield {"data": text} if name is None else {"event": name, "data": text}
        finally:
            watcher.cancel()

    return EventSourceResponse(
        sent(),
        ping=15,
        headers={"Cache-Control": "no-cache"},
        shutdown_event=shutdown,
        shutdown_grace_period=2,  # under uvicorn's timeout_graceful_shutdown (3 s)
    )


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def make_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    loopback: bool = True,
    max_body: int = DEFAULT_MAX_BODY,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Starlette:
    """The ASGI app; it starts the engine's worker when it starts, and stops it when it stops.

    Args:
        engine: the generation worker, on the loaded model.
        model_name: the id clients name in `model`.
        api_key: require `Authorization: Bearer <api_key>` on /v1 routes.
        cors_origins: browser origins allowed to call the API (none by default).
        loopback: the server is bound to loopback: refuse Host headers naming anything else.
        max_body: the largest request body, in bytes.
        read_timeout: seconds a client has to send a body once its headers came (then 408);
            `serve` also drops a connection that takes as long to send its headers.
    """
    problem = api_key_problem(api_key)
    if problem:
        raise ValueError(problem)
    api = _Api(engine, model_name, api_key, loopback, max_body, read_timeout)

    def route(path: str, handler: Callable, methods: list[str], errors=None) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Fault as e:
                return _error(
                    e.status, errors(e.status, e.message) if errors else e.body(), e.headers
                )
            except RequestError as e:
                return _error(400, errors(400, e.message) if errors else e.body())
            except ClientDisconnect:
                return Response(status_code=499)

        return Route(path, endpoint, methods=methods)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal server error"
        return _error(status, error_body(str(message), "invalid_request_error"))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version"],
            )
        )
    return Starlette(
        routes=[
            route("/health", api.health, ["GET"]),
            route("/v1/models", api.models, ["GET"]),
            route("/v1/models/{name:path}", api.model, ["GET"]),
            route("/v1/chat/completions", api.chat, ["POST"]),
            route("/v1/completions", api.completions, ["POST"]),
            route("/v1/responses", api.responses, ["POST"]),
            route("/v1/messages", api.messages, ["POST"], anthropic_error_body),
            route("/v1/messages/count_tokens", api.count_tokens, ["POST"], anthropic_error_body),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )


def serve(
    model,
    tokenizer,
    *,
    model_name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    queue_size: int = DEFAULT_QUEUE,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    kv_bits: int | None = None,
    cache_dir: str | None = None,
    cache_dir_bytes: int = DEFAULT_DIR_BYTES,
    max_body: int = DEFAULT_MAX_BODY,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_batch: int | None = None,
    on_ready: Callable[[str], None] = print,
) -> None:
    """Serve `model` until interrupted (Ctrl-C shuts down cleanly); `on_ready(url)` once bound.
    `max_batch` requests are decoded together (None: the most the memory estimate allows)."""
    engine = Engine(model, tokenizer, queue_size=queue_size, cache_bytes=cache_bytes,
                    kv_bits=kv_bits, cache_dir=cache_dir, cache_dir_bytes=cache_dir_bytes,
                    max_batch=max_batch)  # fmt: skip
    app = make_app(
        engine,
        model_name=model_name,
        api_key=api_key,
        cors_origins=cors_origins,
        loopback=is_loopback(host),
        max_body=max_body,
        read_timeout=read_timeout,
    )
    sockets = _bind(host, port)
    try:
        engine.start()  # warmed up before it listens (a failure is one line, not a traceback)
        _server(app, engine, host, on_ready, read_timeout).run(sockets=sockets)
    finally:  # however serving ended (in the normal case the app's lifespan stopped the engine)
        engine.stop()
        for sock in sockets:
            sock.close()


def _server(
    app: Starlette,
    engine: Engine,
    host: str,
    on_ready: Callable[[str], None],
    read_timeout: float = DEFAULT_READ_TIMEOUT,
):
    """A uvicorn Server for `app`: at shutdown the answers in progress end at once,
    `on_ready(url)` is called once it listens, and a connection that has not sent a request's
    headers `read_timeout` seconds after it opened (or after its last response) is dropped."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            engine.close()  # answers in progress end now, before uvicorn waits for them
            await super().shutdown(sockets)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                on_ready(f"http://{shown}:{bound}/v1")

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        lifespan="on",
        http=header_deadline(read_timeout),
    )
    return Server(config)


def header_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, dropping a connection that waits for a request's headers (none
    sent yet, or half of them) longer than `seconds`: uvicorn waits forever for a first request,
    and its keep-alive timeout stops counting once any byte arrives."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            self._arm()  # between requests, bytes of the next one's headers start the clock
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete: the app has it
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self.transport.close)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    return Protocol


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of `host` on one port, not yet listening, as asyncio's
    create_server binds them (IPv6 ones IPv6-only): "localhost" gets both 127.0.0.1 and ::1.
    Bound here, a taken port or an address that is not this machine's is an OSError for the
    caller to report (uvicorn would log it in its own format and exit 3)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(sockets) > 1:  # on the first one's port (port 0: the one it was given)
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
