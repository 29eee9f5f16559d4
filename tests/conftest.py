"""Fixtures shared by the suite: Azurite, folders, and the real service.

Every test talks only to loopback: the network guard refuses any other
connect from this process, and the services it starts get an environment
that keeps DefaultAzureCredential away from IMDS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.service import Layout, Service, base_env

if TYPE_CHECKING:
    from tests.support.azurite import Azurite

pytest_plugins = ["tests.support.azurite", "tests.support.netguard", "tests.support.fusefs"]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """Local folders standing in for /mnt/nfs and /mnt/staging."""
    return Layout(tmp_path).make()


def azurite_env(azurite: Azurite, container: str) -> dict[str, str]:
    """Settings that point the service at a (HTTP, shared-key) Azurite."""
    return {
        "APP_AZURE_ACCOUNT_URL": azurite.account_url,
        "APP_AZURE_CONTAINER": container,
        "APP_AZURE_CONNECTION_STRING": azurite.connection_string,
    }


ServiceFactory = Callable[..., Service]


@pytest.fixture
def make_service(
    azurite: Azurite, azurite_container: str, layout: Layout, tmp_path: Path
) -> Iterator[ServiceFactory]:
    """Start real ingestd processes; each is killed at the end and must leave no process.

    ``make_service(start=False, **env)`` overrides settings (``APP_...``) and
    returns the service unstarted if asked.
    """
    services: list[Service] = []

    def make(start: bool = True, layout_: Layout | None = None, **overrides: str) -> Service:
        env = base_env({**(layout_ or layout).env(), **azurite_env(azurite, azurite_container)})
        env.update(overrides)
        service = Service(env, tmp_path / f"ingestd-{len(services)}.log")
        services.append(service)
        return service.start() if start else service

    yield make
    for service in services:
        service.stop()
        assert not service.survivors(), f"processes left behind: {service.survivors()}"
