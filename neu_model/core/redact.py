"""Keep credentials out of messages, logs and records.

A data source may carry a secret: ``https://user:token@host/neu.zip``, ``https://token@host/...``
or a pre-signed URL (``...?X-Amz-Signature=...``). Everything that shows or stores a source
passes it through ``redact_url``; a process's log handlers get ``RedactingFilter``.

    redact_url("fetching https://ci:s3cret@files.plant/neu.zip")  ->  "fetching https://***@files.plant/neu.zip"
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse

MASK = "***"
# scheme://userinfo@ : the userinfo runs to the last "@" before the path (a password may hold
# a raw "@", and urllib splits the same way).
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
# Query parameters that carry secrets: tokens, signatures (pre-signed S3/GCS/Azure URLs), keys.
_SECRET_PARAM = re.compile(
    r"([?&](?:[^=&\s#]*(?:token|signature|secret|password|passwd|credential|api_?key|access_?key)[^=&\s#]*"
    r"|sig|key|auth|code|pwd)=)[^&\s#]+",
    re.IGNORECASE,
)


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    Args:
        text: any string: a URL, a log line, an error message, a command line.

    Returns:
        The string with ``scheme://user:password@`` and ``scheme://user@`` turned into
        ``scheme://***@``, and the values of secret-looking query parameters into ``***``.
    """
    if "://" not in text:
        return text
    text = _USERINFO.sub(rf"\g<1>{MASK}@", text)
    return _SECRET_PARAM.sub(rf"\g<1>{MASK}", text)


def split_credentials(url: str) -> tuple[str, str | None]:
    """Split ``user:password@`` off an http(s) URL.

    urllib does not use the userinfo of a URL (it takes ``user:password@host`` for a host
    name); the download sends it as a Basic ``Authorization`` header instead.

    Returns:
        The URL without userinfo, and the header value (``Basic ...``) or None without one.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    plain = urllib.parse.urlunsplit(parts._replace(netloc=host))
    user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return plain, f"Basic {token}"


class RedactingFilter(logging.Filter):
    """A filter that rewrites each record's message (and traceback text) through ``redact_url``.

    Put it on handlers, not loggers: a logger's filters do not see records that propagate to
    it from child loggers, a handler's filters see every record it writes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_url(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is redacted too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_url(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_url(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> int:
    """Add a ``RedactingFilter`` to every handler of ``logger`` (default: the root logger).

    Returns:
        How many handlers got the filter (those that had one already are skipped).
    """
    added = 0
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
            added += 1
    return added
