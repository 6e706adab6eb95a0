"""How the worker and the API log: text for a person at a terminal, one JSON object per line for
a log pipeline (``ASTRA_OPS_LOG_FORMAT=auto|text|json``; ``auto`` is text when stderr is a
terminal, JSON otherwise, as in a container).

Every line is redacted first (runtime/redact.py: where records are made, so the JSON line's
message and exception are the redacted ones). A line logged while a workflow or an activity runs
says which run, runbook and step it is about: the process passes a ``context`` function that
knows how to tell (the worker's: workers/log_context.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Literal

from runtime.redact import redact_logs

LogFormat = Literal["auto", "text", "json"]
Context = Callable[[logging.LogRecord], Mapping[str, object]]
"""The run, runbook, step (...) a record is about; empty when it is about none."""

CONTEXT_ATTRIBUTE = "astra_context"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = {"httpx": logging.WARNING}
"""Loggers that say too much at INFO: httpx logs every request (a kube poll, a chat post)."""


class ContextFilter(logging.Filter):
    """Puts ``context(record)`` on each record, while the code that logged is still running
    (in its workflow or activity); never drops a record."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, CONTEXT_ATTRIBUTE, dict(self.context(record)))
        return True


def context_of(record: logging.LogRecord) -> Mapping[str, object]:
    context: Mapping[str, object] = getattr(record, CONTEXT_ATTRIBUTE, {})
    return context


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the record's
    context (run_id, runbook, step, ...), and the exception's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context_of(record),
        }
        if record.exc_info:
            # exc_text is the traceback redact_logs() already cleaned; formatted only if unset.
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then the record's context as ``key=value`` pairs."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(f"{k}={v!r}" for k, v in context_of(record).items() if v is not None)
        if not context:
            return text
        first, newline, rest = text.partition("\n")  # the context stays on the message's line
        return f"{first}  [{context}]{newline}{rest}"


def configure_logging(log_format: LogFormat, context: Context | None = None) -> None:
    """Send this process's records (INFO and above) to stderr in ``log_format``, redacted.

    The SDK's workflow and activity loggers append their info to the message by default; with
    a ``context`` that tells the same on every line, they stop, so nothing is said twice.
    """
    redact_logs()
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    if context is not None:
        handler.addFilter(ContextFilter(context))
        from temporalio import activity, workflow

        workflow.logger.workflow_info_on_message = False
        activity.logger.activity_info_on_message = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
