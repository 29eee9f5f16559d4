"""Fail fast: missing configuration or credentials stop the service before it serves.

PRD FR-9 and §16.6: the pod crashes at startup and the log says which keys
are missing. These run the real ``python -m ingestd`` and read its output.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.azurite import Azurite
from tests.support.service import Layout, base_env, run_once

FALLBACK_KEYS = ("APP_AZURE_CONNECTION_STRING", "APP_AZURE_ACCOUNT_NAME", "APP_AZURE_ACCOUNT_KEY")


@pytest.mark.timeout(60)
def test_missing_required_settings_name_both_keys(layout: Layout) -> None:
    result = run_once(base_env(layout.env()))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "APP_AZURE_ACCOUNT_URL" in output
    assert "APP_AZURE_CONTAINER" in output
    assert "Traceback" not in output


@pytest.mark.timeout(60)
def test_missing_container_setting_alone_is_named(layout: Layout) -> None:
    env = base_env({**layout.env(), "APP_AZURE_ACCOUNT_URL": "https://127.0.0.1:9/x"})
    result = run_once(env)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "missing required configuration: APP_AZURE_CONTAINER" in output
    assert "APP_AZURE_ACCOUNT_URL" not in output.split("missing required configuration")[1]


@pytest.mark.timeout(60)
def test_invalid_setting_is_named(layout: Layout) -> None:
    env = base_env(
        {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": "https://127.0.0.1:9/x",
            "APP_AZURE_CONTAINER": "c",
            "APP_AZURE_MAX_BLOCK_SIZE": "eight megs",
        }
    )
    result = run_once(env)
    assert result.returncode == 2
    assert "APP_AZURE_MAX_BLOCK_SIZE" in result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_no_usable_credentials_exit_non_zero_naming_the_fallback_keys(
    layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    env = base_env(
        {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": azurite.account_url,
            "APP_AZURE_CONTAINER": azurite_container,
        }
    )
    result = run_once(env)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    for key in FALLBACK_KEYS:
        assert key in output
    assert "DefaultAzureCredential" in output
    assert "Traceback" not in output


@pytest.mark.timeout(60)
def test_wrong_account_key_says_the_key_was_rejected(
    layout: Layout, azurite: Azurite, azurite_container: str
) -> None:
    wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ=="
    env = base_env(
        {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": azurite.account_url,
            "APP_AZURE_CONTAINER": azurite_container,
            "APP_AZURE_ACCOUNT_NAME": "devstoreaccount1",
            "APP_AZURE_ACCOUNT_KEY": wrong_key,
        }
    )
    result = run_once(env)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "account key" in output and "rejected" in output
    assert wrong_key not in output


@pytest.mark.timeout(60)
def test_missing_container_is_fatal_with_a_clear_message(layout: Layout, azurite: Azurite) -> None:
    env = base_env(
        {
            **layout.env(),
            "APP_AZURE_ACCOUNT_URL": azurite.account_url,
            "APP_AZURE_CONTAINER": "no-such-container",
            "APP_AZURE_CONNECTION_STRING": azurite.connection_string,
        }
    )
    result = run_once(env)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "'no-such-container' does not exist" in output
    assert "APP_AZURE_CONTAINER" in output
    assert azurite.connection_string not in output


@pytest.mark.timeout(60)
def test_children_of_the_console_script_do_not_load_the_http_server() -> None:
    """Spawned children re-import the console script's module, ``ingestd.cli``.

    It must stay light: uvicorn and FastAPI in every child cost about 75 MiB
    over the tree (bench/RESULTS.md, Memory).
    """
    probe = (
        "import sys, ingestd.cli; "
        "print(sorted(m for m in ('uvicorn', 'fastapi', 'starlette', 'ingestd.api') "
        "if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
