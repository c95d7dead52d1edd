"""`kvlib serve`: the continuous-batching engine behind an OpenAI-compatible HTTP API.

Endpoints (Starlette on uvicorn):

* ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the chat template of the
  GGUF file), each with ``"stream": true`` as server-sent events;
* ``GET /v1/models`` and ``GET /health`` (engine and pool counters).

One thread, `EngineWorker`, owns the engine and runs its step loop; HTTP handlers run on
the event loop and talk to it only through a queue of commands (add, cancel), so every
request shares the same forward steps whatever connection it came from. Tokens travel
back through a per-request `asyncio.Queue`. A request is checked before it reaches the
engine: a bad one gets a 400 with an OpenAI-style error body and changes nothing. A
client that disconnects mid-stream has its request cancelled and its blocks freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Request
from .errors import ConfigError, KVLibError

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's legacy default; a chat turn


class BadRequest(KVLibError):
    """A request body that breaks the API's rules; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_response(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}}, status_code=status)


# --- the engine's thread ---------------------------------------------------------------
class Ticket:
    """One request's link from the engine thread back to its handler's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.state = None  # the engine's `RequestState`, once added

    def push(self, item) -> None:
        """Called from the engine thread: (token, finish_reason) or an error string."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class EngineWorker:
    """Runs `engine.step()` in a thread whenever it has work; the clock starts at 0."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = 0
        self._inbox: deque = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._tickets: dict[int, Ticket] = {}  # request id -> ticket
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="kvlib-engine", daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, request: Request, ticket: Ticket) -> None:
        """Check `request` (raises `KVLibError`, nothing queued) and hand it to the engine;
        its tokens arrive on `ticket.queue`."""
        self.engine.check(request)
        self._send(("add", request, ticket))

    def cancel(self, ticket: Ticket) -> None:
        """Cancel the ticket's request if it is still waiting or running."""
        self._send(("cancel", ticket))

    def _send(self, command) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self.engine.has_work or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for command in commands:
                self._apply(command)
            if self.engine.has_work:
                try:
                    self.steps += self.engine.step(self.now()) is not None
                except Exception as err:  # a bug, not bad input: fail the requests, go on
                    self._fail_all(f"the engine failed: {type(err).__name__}: {err}")

    def _apply(self, command) -> None:
        if command[0] == "add":
            _, request, ticket = command

            def on_token(request_id, token, finish_reason):
                ticket.push((token, finish_reason))
                if finish_reason is not None:
                    del self._tickets[request_id]

            request = dataclasses.replace(request, arrival=self.now(), on_token=on_token)
            ticket.state = self.engine.add(request)
            self._tickets[ticket.state.request_id] = ticket
        else:
            ticket = command[1]
            if ticket.state is not None and self.engine.cancel(ticket.state.request_id):
                del self._tickets[ticket.state.request_id]

    def _fail_all(self, message: str) -> None:
        for request_id, ticket in list(self._tickets.items()):
            self.engine.cancel(request_id)
            ticket.push(message)
        self._tickets.clear()


# --- request bodies --------------------------------------------------------------------
NUMBER = (int, float)
COMMON_FIELDS = {"model": str, "max_tokens": int, "temperature": NUMBER, "top_p": NUMBER,
                 "seed": int, "stream": bool, "n": int, "user": str, "stream_options": dict}
FIELDS = {"completion": COMMON_FIELDS | {"prompt": (str, list)},
          "chat": COMMON_FIELDS | {"messages": list, "max_completion_tokens": int}}


def _check_fields(body, kind: str) -> dict:
    """The body as a dict whose known fields have the right JSON types, else `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    fields = FIELDS[kind]
    for name, value in body.items():
        if name not in fields:
            raise BadRequest(f"unrecognized request argument: {name}", name)
        want = fields[name]
        is_bool = isinstance(value, bool)
        if value is not None and (not isinstance(value, want) or (is_bool and want is not bool)):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise BadRequest(f"{name} must be {names}, got {type(value).__name__}", name)
    required = "prompt" if kind == "completion" else "messages"
    if body.get(required) is None:
        raise BadRequest(f"missing required argument: {required}", required)
    if body.get("n") not in (None, 1):
        raise BadRequest("only n = 1 is supported", "n")
    return body


def _prompt_ids(body: dict, kind: str, tokenizer) -> list[int]:
    """Token ids of a completion prompt (text or token ids) or of chat messages."""
    if kind == "completion":
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer.encode(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise BadRequest("prompt must be a string, a list of one string, or token ids",
                         "prompt")
    messages = body["messages"]
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise BadRequest("each message needs a string role and string content",
                             "messages")
    return tokenizer.encode(tokenizer.render_chat(messages))


def build_request(body, kind: str, tokenizer, context: int) -> Request:
    """The engine `Request` for an API body (not yet checked against the pool)."""
    body = _check_fields(body, kind)
    prompt = _prompt_ids(body, kind, tokenizer)
    if not prompt:
        raise BadRequest("the prompt is empty", "prompt")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS[kind], context - len(prompt)))
    if max_tokens < 1:
        raise BadRequest(f"{param} must be at least 1, got {max_tokens}", param)
    if body.get("seed") is not None and body["seed"] < 0:
        raise BadRequest(f"seed must be >= 0, got {body['seed']}", "seed")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    return Request(tuple(prompt), max_tokens,
                   temperature=1.0 if temperature is None else float(temperature),
                   top_p=None if top_p is None or top_p == 1 else float(top_p),
                   seed=body.get("seed") or 0, stop_ids=tokenizer.stop_ids)


# --- responses -------------------------------------------------------------------------
class TextStream:
    """Turns tokens into text deltas; a character split across tokens waits for its end."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special=True)


class EngineStream(StreamingResponse):
    """A server-sent-event stream that cancels its request however the stream ends
    (finished, client gone, server shutting down); cancelling a finished request is a
    no-op."""

    def __init__(self, events, on_close) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(model, engine: Engine, model_name: str = MODEL_NAME) -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine's thread."""
    tokenizer = model.tokenizer
    worker = EngineWorker(engine)
    context = engine.cache.max_seq_len

    async def health(request):
        pool = engine.cache.pool
        return JSONResponse({"status": "ok", "running": len(engine.running),
                             "waiting": len(engine.waiting), "blocks_in_use": pool.n_used,
                             "blocks_available": pool.n_available,
                             "num_blocks": engine.cache.num_blocks, "steps": worker.steps})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "kvlib"}]})

    async def generate(request: HTTPRequest, kind: str):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error_response(f"the request body is not valid JSON: {err}")
        try:
            engine_request = build_request(body, kind, tokenizer, context)
            ticket = Ticket(asyncio.get_running_loop())
            worker.submit(engine_request, ticket)
        except BadRequest as err:
            return error_response(str(err), err.param)
        except KVLibError as err:
            return error_response(str(err), "messages" if kind == "chat" else "prompt")
        reply = Reply(kind, model_name, len(engine_request.prompt_ids))
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return EngineStream(reply.events(ticket, TextStream(tokenizer), usage),
                                lambda: worker.cancel(ticket))
        stream = TextStream(tokenizer)
        finish = None
        while finish is None:
            item = await ticket.queue.get()
            if isinstance(item, str):
                return error_response(item, status=500)
            stream.push(item[0])
            finish = item[1]
        return JSONResponse(reply.whole(stream, finish))

    async def completions(request):
        return await generate(request, "completion")

    async def chat_completions(request):
        return await generate(request, "chat")

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.worker = worker
    return app


class Reply:
    """The OpenAI response objects of one request: whole, or as stream chunks."""

    def __init__(self, kind: str, model_name: str, prompt_tokens: int) -> None:
        self.kind = kind
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.model = model_name
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens

    def _head(self, chunk: bool) -> dict:
        obj = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, n_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n_tokens,
                "total_tokens": self.prompt_tokens + n_tokens}

    def _choice(self, text: str, finish: str | None, delta: bool) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {},
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish}

    def whole(self, stream: TextStream, finish: str) -> dict:
        return self._head(False) | {"choices": [self._choice(stream.text(), finish, False)],
                                    "usage": self.usage(len(stream.tokens))}

    async def events(self, ticket: Ticket, stream: TextStream, include_usage: bool):
        """Server-sent events: a chunk per text delta, the finish reason, [DONE]."""
        if self.kind == "chat":
            yield _sse(self._head(True) | {"choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None}]})
        finish = None
        while finish is None:
            item = await ticket.queue.get()
            if isinstance(item, str):
                yield _sse({"error": {"message": item, "type": "server_error",
                                      "param": None, "code": None}})
                return
            token, finish = item
            delta = stream.push(token)
            if delta:
                yield _sse(self._head(True) | {"choices": [self._choice(delta, None, True)]})
        rest = stream.text()[len(stream.sent):]
        yield _sse(self._head(True) | {"choices": [self._choice(rest, finish, True)]})
        if include_usage:
            yield _sse(self._head(True) | {"choices": [],
                                           "usage": self.usage(len(stream.tokens))})
        yield "data: [DONE]\n\n"


# --- running it ------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    return sock


class BackgroundServer:
    """uvicorn serving `app` on `sock` in a thread (tests, notebooks); `url` is its base.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, app, sock: socket.socket) -> None:
        import uvicorn

        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise KVLibError("the server stopped while starting")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on a `listen` socket in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
