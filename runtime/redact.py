"""Removing credentials from text before people (or log files) see it.

Errors from HTTP clients, database drivers and the Temporal SDK quote the URL or DSN they used,
and that is where credentials live: ``user:password@`` userinfo, ``?token=`` query parameters,
and whole URLs that are themselves the secret (a Slack-compatible incoming webhook, whose path is
the key). Every message that leaves an activity or a workflow for people, and every log record
of an astra-ops process, passes through :func:`redact`. It is pure (no I/O, no clock), so
workflow code may call it too.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable
from typing import Any

MASK = "***"

# A path segment that marks an incoming-webhook URL (Slack /services/..., Mattermost and
# Rocket.Chat /hooks/..., Discord /api/webhooks/..., Teams /webhookb2/...): the path is the key.
_WEBHOOK_SEGMENT = re.compile(r"^(services|hooks?|webhooks?|webhookb2|triggers)$", re.IGNORECASE)
# A path segment that reads like a token: long, and letters mixed with digits.
_TOKEN_SEGMENT = re.compile(r"^(?=[^/]*[A-Za-z])(?=[^/]*\d)[A-Za-z0-9_\-.~+=]{20,}$")
# Query parameters that carry credentials (OAuth codes, signed-URL signatures, API keys).
_SECRET_PARAM = re.compile(
    r"(access[_-]?token|api[_-]?key|apikey|auth|client[_-]?secret|code|key|passw(or)?d|pwd|"
    r"secret|sig|signature|token|x-amz-(signature|credential|security-token)).*",
    re.IGNORECASE,
)
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^\s'\"<>`]+)")
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/\-]+=*", re.IGNORECASE)
# `password=...`, `api_key: ...`, `"token": "..."`, `Authorization: Basic ...`: the name ends in
# a word that says secret, so `tokens: 1200` or `author: bob` stay as they are.
_PAIR = re.compile(
    r"(?<![A-Za-z0-9_])([A-Za-z0-9_\-]*(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|"
    r"access[_-]?key|signature|authorization)[\"']?)(\s*[=:]\s*)(?![A-Za-z]+\s+<)"
    r"((?:Basic|Bearer|Token)\s+)?(\"[^\"]*\"|'[^']*'|[^\s&,;'\"]+)",
    re.IGNORECASE,
)


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    trailing = ""
    while rest and rest[-1] in ".,;:)]}":  # sentence punctuation after the URL
        trailing, rest = rest[-1] + trailing, rest[:-1]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    if not slash:
        return f"{scheme}{authority}{trailing}"
    path, question, query = path.partition("?")
    path, hash_mark, _fragment = path.partition("#")
    segments = path.split("/")
    if any(_WEBHOOK_SEGMENT.match(s) for s in segments):
        return f"{scheme}{authority}/{MASK}{trailing}"
    path = "/".join(MASK if _TOKEN_SEGMENT.match(s) else s for s in segments)
    if question:
        query = "&".join(
            f"{name}={MASK}" if _SECRET_PARAM.fullmatch(name) else f"{name}{eq}{v}"
            for name, eq, v in (p.partition("=") for p in query.split("&"))
        )
    return f"{scheme}{authority}/{path}{question}{query}{hash_mark and '#' + MASK}{trailing}"


def redact(text: str) -> str:
    """``text`` without the credentials it may quote; everything else is left as it was."""
    text = _URL.sub(_redact_url, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)


_installed: list[Callable[..., logging.LogRecord]] = []


def redact_logs() -> None:
    """Redact every log record this process makes, whoever logs it (httpx logs each request's
    URL at INFO; the SDK logs a failed activity with its exception chain).

    Done where records are made rather than in a handler, so every handler sees the redacted
    record, including ones added later (uvicorn's, pytest's). Calling it again does nothing.
    """
    if _installed:
        return
    make = logging.getLogRecordFactory()
    _installed.append(make)

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is logging's to report, at emit time
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters reuse exc_text when set, so the traceback they print is this one.
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_text = record.exc_text.rstrip("\n")
        return record

    logging.setLogRecordFactory(redacted_record)
