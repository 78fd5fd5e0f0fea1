"""Credentials never reach a message or a log line."""

from __future__ import annotations

import base64
import io
import logging

import pytest

from neu_model.core.redact import RedactingFilter, install_log_redaction, redact_url, split_credentials


@pytest.mark.parametrize("text, expected", [
    ("https://user:token@host/path/neu.zip", "https://***@host/path/neu.zip"),
    ("https://ghp_abc123@github.com/o/r/archive/x.zip", "https://***@github.com/o/r/archive/x.zip"),
    ("error: http://ci:p@ss@127.0.0.1:8080/neu.zip: HTTP 401", "error: http://***@127.0.0.1:8080/neu.zip: HTTP 401"),
    ("two: https://a:b@x/1 and s3://key:secret@bucket/k", "two: https://***@x/1 and s3://***@bucket/k"),
    ("https://bucket.s3/neu.zip?X-Amz-Credential=AK%2F1&X-Amz-Signature=f00d&x-id=GetObject",
     "https://bucket.s3/neu.zip?X-Amz-Credential=***&X-Amz-Signature=***&x-id=GetObject"),
    ("https://host/neu.zip?token=abc#frag", "https://host/neu.zip?token=***#frag"),
])
def test_credentials_are_masked(text, expected):
    assert redact_url(text) == expected


@pytest.mark.parametrize("text", [
    "https://host/path/neu.zip",
    "https://host/path?mail=a@b.example",  # an "@" after the host is no userinfo
    "/data/user@example/NEU-CLS",  # a path, not a URL
    "mail ops@plant.example when done",
])
def test_text_without_credentials_is_unchanged(text):
    assert redact_url(text) == text


def test_split_credentials_gives_the_plain_url_and_a_basic_header():
    plain, header = split_credentials("https://ci:p%40ss@files.example:8443/neu.zip?x=1")
    assert plain == "https://files.example:8443/neu.zip?x=1"
    assert base64.b64decode(header.removeprefix("Basic ")) == b"ci:p@ss"
    assert split_credentials("https://files.example/neu.zip") == ("https://files.example/neu.zip", None)


def capture(logger_name: str) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream, handler


def test_filter_redacts_messages_arguments_and_tracebacks():
    logger, stream, handler = capture("test_redact.filter")
    handler.addFilter(RedactingFilter())
    try:
        logger.info("fetching %s", "https://ci:hunter2@host/neu.zip")
        try:
            raise ValueError("bad URL https://ci:hunter2@host/neu.zip")
        except ValueError:
            logger.exception("failed")
        logging.getLogger("test_redact.filter.child").warning("child https://ci:hunter2@host/x")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2" not in out
    for line in ("fetching https://***@host/neu.zip", "ValueError: bad URL https://***@host/neu.zip",
                 "child https://***@host/x"):
        assert line in out.splitlines()


def test_install_puts_the_filter_on_every_handler_once():
    logger, stream, handler = capture("test_redact.install")
    try:
        assert install_log_redaction(logger) == 1
        assert install_log_redaction(logger) == 0
        logger.info("https://ci:hunter2@host/neu.zip")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "https://***@host/neu.zip\n"
