"""Fixtures shared by the suite: Azurite, folders, and the real service.

Every test talks only to loopback: the network guard refuses any other
connect from this process, and the services it starts get an environment
that keeps DefaultAzureCredential away from IMDS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.service import Layout, Service, azurite_env, base_env

if TYPE_CHECKING:
    from tests.support.azurite import Azurite
    from tests.support.fusefs import FreezableMount

pytest_plugins = ["tests.support.azurite", "tests.support.netguard", "tests.support.fusefs"]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """Local folders standing in for /mnt/nfs and /mnt/staging."""
    return Layout.under(tmp_path).make()


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


@dataclass
class NfsRig:
    """The FUSE mount laid out like /mnt/nfs, and a way to start ingestd on it."""

    mount: FreezableMount
    layout: Layout
    make_service: ServiceFactory

    def start(self, **overrides: str) -> Service:
        """ingestd with its NFS folders inside the mount and staging on local disk."""
        on_mount = Layout(nfs=self.mount.path(), staging=self.layout.staging)
        return self.make_service(layout_=on_mount, **overrides)

    def claimed(self, session: dict[str, Any], name: str) -> Path:
        """Where a claimed file sits, seen from the backing folder (never blocks)."""
        return self.layout.processing / session["date_prefix"] / session["encoded_session"] / name


@pytest.fixture
def nfs(
    fuse_mount: FreezableMount, make_service: ServiceFactory, layout: Layout
) -> Iterator[NfsRig]:
    """The FUSE mount as the service's NFS share (tests/test_hung_nfs.py, test_peer_parity.py).

    ``fuse_mount`` comes first so that it creates ``tmp_path/nfs`` before the
    ``layout`` fixture fills it; ``layout`` then names the backing folders,
    which the test process uses so that it never touches the mount itself.
    Teardown thaws before ``make_service`` stops the service.
    """
    assert fuse_mount.backing == layout.nfs.resolve()
    for folder in (layout.incoming, layout.processing, layout.failed):
        folder.mkdir(parents=True, exist_ok=True)
    rig = NfsRig(fuse_mount, layout, make_service)
    yield rig
    fuse_mount.thaw()
    fuse_mount.clear_faults()
