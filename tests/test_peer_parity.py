"""Issue 18, peer parity: the access tier, provenance metadata, the bandwidth cap.

End to end: the real service as a process over HTTP, a real Azurite on
loopback, the MD5 of every blob's downloaded bytes checked against the source.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

import ingestd
from tests.support.azurite import Azurite
from tests.support.service import Layout, md5_of, run_once, write_random

MiB = 1024 * 1024
ODD_NAME = "odd name 100% ünï 文件 #1.bin"
POD = "ingestd-test-pod-0"


def drop_with_mtime(layout: Layout, name: str, size: int, mtime_ns: int) -> tuple[str, int]:
    """Write ``name`` outside incoming, give it ``mtime_ns``, rename it in (same filesystem).

    Returns its MD5 and size. The mtime is set before the file appears, so
    the scanner sees it stable (and old enough) at once.
    """
    outside = layout.root / "writer"
    outside.mkdir(exist_ok=True)
    path = outside / name
    md5 = write_random(path, size)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    os.rename(path, layout.incoming / name)
    return md5, size


def blob_properties(azurite: Azurite, container: str, blob_name: str):
    with azurite.container_client(container) as client:
        return client.get_blob_client(blob_name).get_blob_properties()


# The tier


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tier", ["cool", "COLD"])
def test_every_blob_lands_in_the_configured_tier(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str, tier: str
) -> None:
    """Set at commit, for blobs committed block by block and those sent in one request.

    The value is given in odd case on purpose: it is normalised. Cold is
    here too because Azurite 3.37 accepts it (checked: commit and put both).
    """
    service = make_service(APP_AZURE_ACCESS_TIER=tier, APP_AZURE_MAX_BLOCK_SIZE="4MiB")
    session = service.start_session(f"tier {tier}")
    prefix = f"{session['date_prefix']}/{session['encoded_session']}/"
    sizes = {"small.bin": 100_000, "blocks.bin": 10 * MiB + 7, "empty.bin": 0}
    expected = {name: write_random(layout.incoming / name, size) for name, size in sizes.items()}
    service.wait_processed(len(sizes), timeout=60)
    for name, md5 in expected.items():
        assert azurite.blob_md5(azurite_container, prefix + name) == md5, name
        properties = blob_properties(azurite, azurite_container, prefix + name)
        assert properties.blob_tier == tier.capitalize(), (name, properties.blob_tier)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("variable", "value", "words"), [
    ("APP_AZURE_ACCESS_TIER", "Frozen", ["Hot", "Cool", "Cold", "Archive"]),
    ("APP_AZURE_MAX_MBPS", "-5", ["greater than or equal to 0"]),
    ("APP_AZURE_MAX_MBPS", "fast", ["number"]),
])
def test_a_bad_value_stops_the_start_naming_the_variable(
    azurite: Azurite, azurite_container: str, layout: Layout,
    variable: str, value: str, words: list[str]
) -> None:
    from tests.conftest import azurite_env
    from tests.support.service import base_env

    env = base_env({**layout.env(), **azurite_env(azurite, azurite_container), variable: value})
    result = run_once(env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert variable in output, output
    for word in words:
        assert word in output, output


# The metadata


@pytest.mark.timeout(120)
@pytest.mark.parametrize("put_md5", [False, True])
def test_every_blob_says_where_it_came_from(
    make_service, layout: Layout, azurite: Azurite, azurite_container: str, put_md5: bool
) -> None:
    """Name (spaces, %, unicode), session, date, size, mtime, pod, version, MD5 if computed.

    A file that goes in one request always has its whole MD5; a file sent
    in blocks has it only with APP_AZURE_PUT_MD5=true.
    """
    service = make_service(HOSTNAME=POD, APP_AZURE_MAX_BLOCK_SIZE="4MiB",
                           APP_AZURE_PUT_MD5=str(put_md5).lower())
    session_name = "provenance 50% süß"
    session = service.start_session(session_name)
    prefix = f"{session['date_prefix']}/{session['encoded_session']}/"
    mtime_ns = 1_700_000_000_123_456_789
    files = {
        ODD_NAME: drop_with_mtime(layout, ODD_NAME, 9 * MiB + 3, mtime_ns),
        "small %41.bin": drop_with_mtime(layout, "small %41.bin", 1000, mtime_ns + 1),
    }
    service.wait_processed(len(files), timeout=60)

    for i, (name, (md5, size)) in enumerate(sorted(files.items())):
        blob_name = prefix + name
        assert azurite.blob_md5(azurite_container, blob_name) == md5, name
        meta = blob_properties(azurite, azurite_container, blob_name).metadata
        print(f"{name!r}: {meta}")
        assert all(key.startswith("ingestd_") and key.isidentifier() for key in meta), meta
        assert all(value.isascii() for value in meta.values()), meta
        assert unquote(meta["ingestd_name"]) == name
        assert unquote(meta["ingestd_session"]) == session_name
        assert meta["ingestd_date"] == session["date_prefix"]
        assert int(meta["ingestd_size"]) == size
        assert meta["ingestd_host"] == POD
        assert meta["ingestd_version"] == ingestd.__version__
        in_one_request = size <= 4 * MiB
        if in_one_request or put_md5:
            assert meta["ingestd_md5"] == md5
        else:
            assert "ingestd_md5" not in meta
        expected_mtime = mtime_ns + (1 if name.startswith("small") else 0)
        assert meta["ingestd_mtime"] == _rfc3339(expected_mtime)


def _rfc3339(mtime_ns: int) -> str:
    """Independent of ingestd's formatter: via time.gmtime."""
    seconds, nanos = divmod(mtime_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
