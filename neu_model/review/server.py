"""``neu-review serve``'s web app: the review page, its script, and a small JSON API.

FastAPI rather than plain Starlette: it is already a pinned dependency (Prefect's server runs on
it), and its pydantic request models refuse a missing reviewer name, an unknown label or a
non-integer tile id with a one-line answer before any handler runs. Both are served by uvicorn.

Security, for a page that writes training data:

- It binds 127.0.0.1 by default; another address needs a token (``check_bind``).
- Every ``/api`` request needs the header ``X-Review-Token``. Without ``--token`` a random one is
  made per start and written into the page itself: another web site's page cannot read it
  (same-origin policy), so it cannot post labels; the Host header must then name this machine,
  which stops a DNS-rebinding site from reading it. With ``--token`` the page asks for it (or
  takes ``?token=`` once and drops it from the address bar). The token is never logged: uvicorn's
  access log, which prints query strings, is off.
- Tiles are asked for by queue id, never by path; a request holding ``../`` or an absolute path
  anywhere is refused before routing. The page, script and style are package files; no CDN,
  no external fonts (a content security policy allows this origin alone).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from neu_model.core.stage import StageError
from neu_model.review.auditlog import LABELS, AuditLog
from neu_model.review.queue import load_queue
from neu_model.review.session import AHEAD, Refused, ReviewSession

TOKEN_HEADER = "X-Review-Token"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
MIN_TOKEN_LENGTH = 16  # a shorter shared secret can be guessed over the network
STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PATH_REFUSED = "refused: a request naming a path; tiles are asked for by queue id (reload the review page)"
NAME = re.compile(r"[\w .@'-]{1,64}")
FORBIDDEN = (f"missing or wrong {TOKEN_HEADER}: reload the review page (with --token: open it with ?token=... "
             "or enter the token)")


class Forbidden(Exception):
    """A request without the review token."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token, or with a guessable one.

    Raises:
        StageError: naming the fix.
    """
    if host not in LOCAL_HOSTS and not token:
        raise StageError(f"--host {host}: other machines could post labels; pass --token T (or set "
                         "NEU_REVIEW_TOKEN) to serve beyond this machine, or bind --host 127.0.0.1")
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise StageError(f"the review token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")


def names_a_path(path: str, query: str = "") -> bool:
    """Whether a request's path or query holds ``..`` as a segment or an absolute path (decoded
    twice: a doubly encoded ``%252e%252e`` is caught too). In the path an absolute one shows as
    ``//`` (``/api/tiles/%2Fetc...``); in the query as a value starting ``/``, ``~`` or ``C:/``."""
    path, query = (urllib.parse.unquote(urllib.parse.unquote(t)).replace("\\", "/") for t in (path, query))
    return bool(any(re.search(r"(^|[/=&])\.\.(/|&|$)", t) for t in (path, query)) or "//" in path
                or re.search(r"(^|[&=])(/|[A-Za-z]:/|~)", query))


class Reviewed(BaseModel):
    reviewer: str

    @field_validator("reviewer")
    @classmethod
    def named(cls, value: str) -> str:
        value = value.strip()
        if not NAME.fullmatch(value):
            raise ValueError("a reviewer name is required: 1 to 64 letters, digits, spaces or . @ ' -")
        return value


class Claim(Reviewed):
    holding: list[int] = Field(default_factory=list, max_length=50)


class Decision(Reviewed):
    id: int
    kind: Literal["label", "skip"]
    label: Literal[LABELS] | None = None  # type: ignore[valid-type]
    seconds: float | None = Field(default=None, ge=0, le=86400)


def page(token: str) -> str:
    html = resources.files("neu_model.review").joinpath("static/index.html").read_text()
    return html.replace("{{TOKEN}}", token)


def create_app(session: ReviewSession, token: str, embed_token: bool = True,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app over ``session``.

    Args:
        token: what ``X-Review-Token`` must be.
        embed_token: write the token into the page (a token made for this start on 127.0.0.1).
        allowed_hosts: the Host header must be one of these (None: any).
    """
    app = FastAPI(title="neu-review", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    html = page(token if embed_token else "")
    static = {name: resources.files("neu_model.review").joinpath(f"static/{name}").read_bytes() for name in STATIC}

    @app.middleware("http")
    async def refuse_paths(request: Request, call_next):
        raw = request.scope.get("raw_path", b"").decode("latin-1")
        if names_a_path(raw, request.scope.get("query_string", b"").decode("latin-1")):
            return JSONResponse({"error": PATH_REFUSED}, status_code=400, headers=SECURITY_HEADERS)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(Forbidden)
    async def forbidden(_request: Request, exc: Forbidden):
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(StageError)
    async def not_recorded(_request: Request, exc: StageError):
        return JSONResponse({"error": str(exc)}, status_code=507)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        why = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return JSONResponse({"error": f"{where}: {why}"}, status_code=422)

    def authorised(x_review_token: Annotated[str | None, Header()] = None) -> None:
        if not x_review_token or not secrets.compare_digest(x_review_token.encode(), token.encode()):
            raise Forbidden(FORBIDDEN)

    api = [Depends(authorised)]

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/static/{name}")
    def asset(name: str) -> Response:
        if name not in STATIC:  # a fixed list: no file name from a request reaches the disk
            return JSONResponse({"error": f"no {name}"}, status_code=404)
        return Response(static[name], media_type=STATIC[name])

    @app.get("/api/state", dependencies=api)
    def state(reviewer: str = "") -> dict:
        return {"counts": session.counts(reviewer), "ahead": AHEAD}

    @app.post("/api/claim", dependencies=api)
    def claim(body: Claim) -> dict:
        keep, add = session.claim(body.reviewer, body.holding)
        return {"keep": keep, "add": add, "counts": session.counts(body.reviewer)}

    @app.post("/api/decide", dependencies=api)
    def decide(body: Decision) -> dict:
        record = session.decide(body.reviewer, body.id, body.kind, body.label, body.seconds)
        return {"id": record["id"], "counts": session.counts(body.reviewer)}

    @app.post("/api/undo", dependencies=api)
    def undo(body: Reviewed) -> dict:
        record, tile = session.undo(body.reviewer)
        return {"undone": {"id": record["undoes"], "label": record["label"]}, "tile": tile,
                "counts": session.counts(body.reviewer)}

    @app.get("/api/tiles/{tile_id}/tile.png", dependencies=api)
    def tile_png(tile_id: int) -> Response:
        return Response(session.image(tile_id), media_type="image/png")

    @app.get("/api/tiles/{tile_id}/context.png", dependencies=api)
    def context(tile_id: int) -> Response:
        return Response(session.image(tile_id, context=True), media_type="image/png")

    return app


def lock_state(state: Path) -> int:
    """Hold ``<state>/serve.lock`` for this process's life: two servers appending to one audit log
    would hand out the same tiles. The kernel frees it when the process dies, even by SIGKILL.

    Raises:
        StageError: another server holds it.
    """
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "serve.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StageError(f"{state}: another neu-review serve is using this state folder; stop it, or pass "
                         "another --state") from None
    return fd


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn (bound here, so that a taken port is a one-line error)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pass another "
                         "--port") from None
    return sock


def serve(csvs: Sequence[Path], host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          state: Path = Path(".review"), random_share: float = 0.02, seed: int = 0) -> None:
    """Serve the review of ``csvs`` until interrupted (module docstring for the security)."""
    check_bind(host, token)
    queue = load_queue(csvs, random_share, seed)  # bad input is refused before the state folder is made
    lock_state(state)
    for note in queue.notes[:20]:
        print(f"note: {note}", file=sys.stderr)
    if len(queue.notes) > 20:
        print(f"note: {len(queue.notes) - 20} more rows skipped", file=sys.stderr)
    session = ReviewSession(queue, AuditLog(state))
    app = create_app(session, token or secrets.token_urlsafe(32), embed_token=token is None,
                     allowed_hosts=list(LOCAL_HOSTS) if host in LOCAL_HOSTS else None)
    sock = listen(host, port)
    counts = session.counts()
    audit = sum(t.queue == "audit" for t in queue.tiles)
    print(f"review page: http://{host}:{sock.getsockname()[1]}/ ({counts['left']} tiles left of {counts['total']}, "
          f"{audit} of them drawn for audit; {counts['reviewed']} reviewed; audit log {session.log.path}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    import uvicorn  # imported here: `neu-review commit` does not need it

    # access_log off: it prints query strings, and a page opened with ?token= would put the token there
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
