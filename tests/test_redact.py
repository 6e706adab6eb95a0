"""What redaction removes from a message, and what it must leave for the person reading it."""

from __future__ import annotations

import logging

import httpx
import pytest

from runtime.redact import redact, redact_logs


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "Server error '500 Internal Server Error' for url "
            "'https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXX'",
            "Server error '500 Internal Server Error' for url 'https://hooks.slack.com/***'",
        ),
        (
            "POST https://discord.com/api/webhooks/123/abc failed",
            "POST https://discord.com/*** failed",
        ),
        (
            "could not connect to postgresql://astra:hunter2@db.internal:5432/astra",
            "could not connect to postgresql://***@db.internal:5432/astra",
        ),
        (
            "GET https://api.example.com/v1/spend?tenant=acme&access_token=abc123&sig=zz.",
            "GET https://api.example.com/v1/spend?tenant=acme&access_token=***&sig=***.",
        ),
        (
            "GET https://x.example/files/AKIAabc123def456ghi789/a",
            "GET https://x.example/files/***/a",
        ),
        ("Authorization: Bearer eyJhbGciOi.abc", "Authorization: Bearer ***"),
        ("Authorization: Basic dXNlcjpwdw==", "Authorization: Basic ***"),
        ("password=hunter2 user=bob", "password=*** user=bob"),
        ('{"api_key": "k-123", "vault_token": "s.abc"}', '{"api_key": ***, "vault_token": ***}'),
    ],
)
def test_credentials_are_removed(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "llm-cost-spike failed at step 'tell Agent Platform': cost 3.2x",
        "tokens: 1200, author: bob, shards: 12",
        "send Authorization: Bearer <token>",
        "rollout of astra/astra-worker at https://kube.internal/apis/apps/v1/namespaces/astra",
        "see https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/500",
    ],
)
def test_ordinary_messages_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_log_records_are_redacted_with_their_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    redact_logs()
    redact_logs()  # a second install must not redact twice or wrap the factory again
    secret = "https://hooks.slack.com/services/T1/B1/CANARY0secret0123456789"
    request = httpx.Request("POST", secret)
    try:
        httpx.Response(500, request=request).raise_for_status()
    except httpx.HTTPStatusError as err:
        logging.getLogger("astra.test").warning("post to %s failed", secret, exc_info=err)
    assert "CANARY" not in caplog.text
    assert "post to https://hooks.slack.com/*** failed" in caplog.text
    assert "HTTPStatusError: Server error '500 Internal Server Error'" in caplog.text
