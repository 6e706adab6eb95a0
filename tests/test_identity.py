"""Keys and signatures on their own: what `astra-ops keygen --signing` prints works end to end,
and a process outside dev mode refuses to start without the keys that make identities proven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.identity import (
    IdentityKeyError,
    Statement,
    load_signer_file,
    parse_trusted_keys,
    verify,
)
from runtime.keys import new_key_line
from runtime.settings import REPO_ROOT, Settings, SettingsError
from starters.api import create_app
from starters.cli import app
from workers.worker import trust


def test_keygen_prints_a_pair_the_api_and_the_workers_read(tmp_path: Path) -> None:
    printed = CliRunner().invoke(app, ["keygen", "--signing", "api-7"])
    assert printed.exit_code == 0, printed.output
    key_file = tmp_path / "signing.key"
    key_file.write_text(printed.stdout)  # as the README says: the whole output, as it is
    signer = load_signer_file(key_file)
    public = printed.stdout.splitlines()[1].rsplit(" ", 1)[1]
    trusted = parse_trusted_keys(public)
    assert signer.public_line() == public and list(trusted) == ["api-7"]

    now = datetime.now(UTC)
    statement = Statement(
        act="decision", actor="bob", workflow_id="w", expires_at=now + timedelta(minutes=1)
    )
    signed = signer.sign(statement)
    assert verify(signed, trusted, now) is None
    assert "expired" in str(verify(signed, trusted, now + timedelta(minutes=2)))
    assert "does not trust" in str(verify(signed, {}, now))


@pytest.mark.parametrize("spec", ["k1", "k1:not-base64!", "k1:" + "QUJD" * 3])
def test_malformed_keys_are_refused_with_the_fix(spec: str) -> None:
    with pytest.raises(IdentityKeyError, match="keygen --signing"):
        parse_trusted_keys(spec)


def test_outside_dev_mode_a_worker_needs_trusted_keys_and_the_api_a_signing_key() -> None:
    bare = Settings(
        access_policy=REPO_ROOT / "deploy" / "access-policy.yaml", codec_keys=new_key_line("k")
    )
    with pytest.raises(SettingsError, match="ASTRA_OPS_TRUSTED_KEYS"):
        trust(bare)
    with pytest.raises(SettingsError, match="ASTRA_OPS_SIGNING_KEY_FILE"):
        create_app(bare)
    dev = bare.model_copy(update={"dev_mode": True})
    assert trust(dev).dev_mode
    create_app(dev)  # dev mode trusts names, and needs no key
