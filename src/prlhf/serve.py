"""``prlhf serve``: an OpenAI-compatible HTTP server for a personalized model, one model for every user.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream``), ``GET /health``. The request's ``user`` field selects the user embedding (absent or
unknown: the generic user); ``user_text`` (the openai client's ``extra_body``) supplies the
explicit user text. Every response says which user served it: the ``X-Prlhf-User`` header and a
``prlhf`` field in the body (``{"user": id or null, "generic": bool}``).

Requests are decoded together: a batcher thread keeps one batch of rows (``n`` > 1 gives n rows)
decoding (``prlhf.batching.Batcher``), one token per step over one KV cache (``prlhf.sampling.DecodeBatch``), each row with its
own user embedding and sampling settings; rows that arrive while it runs join it between tokens as
others finish (continuous batching, up to ``max_batch_size`` rows), and a prompt asked for several
users at once is prefilled once where the layout allows (``before_response``). A client that
disconnects has its rows cancelled (they leave the batch at the next token). Errors follow the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` with 4xx
codes; one request never takes the server down.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at definition
import asyncio
import json
import logging
import time
import uuid

from .batching import Batcher, Job
from .sampling import Completion, SamplingParams

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(err: Exception) -> APIError:
    """A generation failure as the server reports it (500, OpenAI-shaped)."""
    if isinstance(err, APIError):
        return err
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


# -- request validation --------------------------------------------------------------------------


def _num(body: dict, key: str, default, lo=None, hi=None, kind=(int, float)):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise APIError(400, f"'{key}' must be a number, got {type(v).__name__}", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must lie in [{lo}, {hi}], got {v}", key, "invalid_value")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")


def _user(body: dict) -> tuple[str | None, str | None]:
    user, text = body.get("user"), body.get("user_text")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "'user' must be a string", "user", "invalid_type")
    if text is not None and not isinstance(text, str):
        raise APIError(400, "'user_text' must be a string", "user_text", "invalid_type")
    return user or None, text or None


class Server:
    """The model, its name and limits, and the request handling (independent of the web framework)."""

    def __init__(self, model, model_name: str, max_tokens_limit: int = 1024, max_batch_size: int = 16,
                 batch_wait_ms: float = 5.0, max_n: int = 8, continuous_batching: bool = True):
        self.model = model
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.context = int(getattr(model.llm.config, "max_position_embeddings", 0) or 0) or None
        self.batcher = Batcher(model, max_batch_size, batch_wait_ms, continuous_batching)
        self.created = int(time.time())

    def served_user(self, user: str | None) -> dict:
        known = user is not None and user in self.model.registry
        return {"user": user if known else None, "generic": not known, "requested_user": user}

    def parse(self, body: dict, chat: bool) -> tuple[object, int, SamplingParams, str | None, str | None]:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string)", "model", "missing_field")
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist (this server serves '{self.model_name}')",
                           "model", "model_not_found")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {role, content} objects with string "
                               "content", "messages", "invalid_type")
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
            max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = _num(body, max_key, 256, 1, None, int)
            lp = body.get("logprobs")
            if lp is not None and not isinstance(lp, bool):
                raise APIError(400, "'logprobs' must be a boolean", "logprobs", "invalid_type")
            top = _num(body, "top_logprobs", None, 0, 20, int)
            if top is not None and not lp:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
            logprobs = (top or 0) if lp else None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt", "invalid_type")
            max_tokens = _num(body, "max_tokens", 16, 1, None, int)
            max_key = "max_tokens"
            logprobs = _num(body, "logprobs", None, 0, 20, int)
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"'{max_key}' is {max_tokens}, over this server's limit of {self.max_tokens_limit}",
                           max_key, "invalid_value")
        n = _num(body, "n", 1, 1, self.max_n, int)
        temperature = _num(body, "temperature", 1.0, 0, 2)
        top_p = _num(body, "top_p", 1.0, 0, 1)
        seed = _num(body, "seed", None, None, None, int)
        if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
            raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
        user, text = _user(body)
        params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                                stop=_stop(body), logprobs=logprobs)
        if self.context is not None:
            n_prompt = len(self.model.prepare_prompts([prompt], [user], [text])["input_ids"][0])
            if n_prompt + max_tokens > self.context:
                raise APIError(400, f"the prompt ({n_prompt} tokens with the user prefix) plus '{max_key}' "
                               f"({max_tokens}) exceeds the model's context of {self.context} tokens",
                               "messages" if chat else "prompt", "context_length_exceeded")
        return prompt, n, params, user, text

    def submit(self, prompt, n: int, params: SamplingParams, user, text) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(n):
            p = params if n == 1 or params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            job = Job(prompt, user, text, p, loop, asyncio.Queue())
            self.batcher.submit(job)
            jobs.append(job)
        return jobs


def _chat_logprobs(c: Completion) -> dict:
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}
                                          for t in e["top"]]} for e in c.logprobs]}


def _completion_logprobs(c: Completion) -> dict:
    offsets, pos = [], 0
    for e in c.logprobs:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in c.logprobs], "token_logprobs": [e["logprob"] for e in c.logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in c.logprobs], "text_offset": offsets}


def create_app(server: Server, api_key: str | None = None):
    """The FastAPI application around a ``Server``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()

    app = FastAPI(title="prlhf", docs_url=None, redoc_url=None, lifespan=lifespan)

    def error(err: APIError, headers: dict | None = None):
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err):
        return error(APIError(400, f"invalid request: {err.errors()[:1]}", None, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err):
        return error(APIError(err.status_code, str(err.detail), None, None,
                              "not_found_error" if err.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request, err):
        logger.exception("request failed")
        return error(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                return error(APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", None,
                                      "invalid_api_key", "authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "users": len(server.model.registry),
                "batches": server.batcher.batches, "rows": server.batcher.rows, "joined": server.batcher.joined}

    @app.get("/")
    async def playground():
        """One static page (no build step, no external assets): two to four users side by side."""
        from importlib.resources import files

        return HTMLResponse(files("prlhf").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/users")
    async def users(limit: int = 1000):
        """The users the model knows (the first ``limit``, in registry order), for the playground."""
        ids = list(server.model.registry.ids)
        texts = server.model.registry.user_texts
        return {"object": "list", "total": len(ids),
                "data": [{"id": u, **({"user_text": texts[u]} if u in texts else {})} for u in ids[:max(0, limit)]]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "prlhf"}]}

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", None, "invalid_json") from None

    async def run(request: Request, chat: bool):
        body = await body_of(request)
        prompt, n, params, user, text = server.parse(body, chat)
        served = server.served_user(user)
        headers = {"X-Prlhf-User": served["user"] or "generic"}
        jobs = server.submit(prompt, n, params, user, text)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(_stream(request, jobs, chat, rid, created, served, include_usage),
                                     media_type="text/event-stream", headers=headers)
        results = []
        try:
            for job in jobs:
                while True:
                    kind, payload = await job.events.get()
                    if kind == "error":
                        raise _api_error(payload)
                    if kind == "done":
                        results.append(payload)
                        break
        except asyncio.CancelledError:
            for job in jobs:
                job.cancelled.set()
            raise
        choices = []
        for i, c in enumerate(results):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": c.text},
                          "finish_reason": c.finish_reason, "logprobs": _chat_logprobs(c) if params.logprobs is not None else None}
            else:
                choice = {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                          "logprobs": _completion_logprobs(c) if params.logprobs is not None else None}
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in results)
        prompt_tokens = results[0].prompt_tokens if results else 0
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": server.model_name, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens},
                             "prlhf": served}, headers=headers)

    async def _stream(request: Request, jobs, chat: bool, rid: str, created: int, served: dict, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": [choice],
                    "prlhf": served}
            return f"data: {json.dumps(data)}\n\n"

        completion_tokens, prompt_tokens = 0, 0
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, None, first=True)
            pending = {i: j for i, j in enumerate(jobs)}
            getters = {i: asyncio.ensure_future(j.events.get()) for i, j in pending.items()}
            while getters:
                done, _ = await asyncio.wait(getters.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if not done and await request.is_disconnected():
                    raise asyncio.CancelledError
                for i, fut in list(getters.items()):
                    if fut not in done:
                        continue
                    kind, payload = fut.result()
                    if kind == "text":
                        yield chunk(i, payload, None)
                        getters[i] = asyncio.ensure_future(pending[i].events.get())
                    elif kind == "done":
                        completion_tokens += len(payload.token_ids)
                        prompt_tokens = payload.prompt_tokens
                        yield chunk(i, None if chat else "", payload.finish_reason)
                        del getters[i]
                    else:
                        yield f"data: {json.dumps(_api_error(payload).body())}\n\n"
                        del getters[i]
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': server.model_name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            for j in jobs:  # the client went away: its rows leave the batch at the next token
                j.cancelled.set()
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
          max_tokens_limit: int = 1024, device: str | None = None, dtype: str = "float32",
          continuous_batching: bool = True) -> None:
    """Load a saved model and serve it until interrupted (``prlhf serve``)."""
    from pathlib import Path

    import uvicorn

    from .modeling import PersonalizedLM

    model = PersonalizedLM.from_pretrained(model_dir, device=device, dtype=dtype)
    name = served_model_name or Path(str(model_dir).rstrip("/")).name
    server = Server(model, name, max_tokens_limit, max_batch_size, batch_wait_ms, continuous_batching=continuous_batching)
    app = create_app(server, api_key)
    print(f"prlhf serve: model '{name}' ({len(model.registry)} users) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
