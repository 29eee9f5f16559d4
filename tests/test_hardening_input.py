"""Hostile input: request bodies, session names and file names.

Over HTTP every bad request gets a clear 4xx (never a 500, never a hang),
and the service keeps answering afterwards. A session name is either refused
with 422 or percent-encoded into exactly one folder name: a file dropped
under it lands in ``<root>/<date>/<encoded>/`` of each configured root and
nowhere else. File names travel to blob names byte for byte (tests/test_pipeline.py
covers spaces, unicode, ``#``, ``?``, ``%``, a leading ``-``, 255 ASCII
bytes and an empty file; these are the rest). A file replaced while it
waits, before or after it was found stable, is uploaded with its final bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
import unicodedata
from pathlib import Path

import httpx
import pytest

from tests.support.azurite import Azurite
from tests.support.checks import assert_all_arrived, assert_nothing_left, failed_files
from tests.support.faults import MiB, drop, folder_layout
from tests.support.fusefs import FreezableMount
from tests.support.service import Layout, md5_of, wait_until, write_random

JSON = {"content-type": "application/json"}


def chunks(total: int, size: int = 1024):
    """A body sent chunked (no Content-Length), so only counting can stop it."""
    for _ in range(total // size):
        yield b" " * size


BAD_REQUESTS = {
    "malformed JSON": (dict(content=b'{"session_name": ', headers=JSON), 422, "json_invalid"),
    "wrong type": (dict(json={"session_name": 5}), 422, "string_type"),
    "extra field": (dict(json={"session_name": "a", "admin": True}), 422, "extra_forbidden"),
    "not an object": (dict(json=["a"]), 422, "model_attributes_type"),
    "form body": (
        dict(
            content=b"session_name=a", headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        422,
        "",
    ),
    "over 16 KiB declared": (dict(json={"session_name": "x" * 17000}), 413, "16384"),
    "over 16 KiB chunked": (dict(content=chunks(20 * 1024), headers=JSON), 413, "16384"),
    "nested 8000 deep": (dict(content=b"[" * 8000 + b"]" * 8000, headers=JSON), 400, ""),
    "lone surrogate": (
        dict(content=b'{"session_name": "\\ud800"}', headers=JSON),
        422,
        "not valid Unicode",
    ),
    "dot": (dict(json={"session_name": "."}), 422, "not allowed"),
    "dot dot": (dict(json={"session_name": ".."}), 422, "not allowed"),
    "300 characters": (dict(json={"session_name": "s" * 300}), 422, "too long"),
    "256 bytes once encoded": (dict(json={"session_name": "é" * 43}), 422, "too long"),
}


@pytest.mark.timeout(60)
def test_bad_requests_get_a_clear_4xx_and_change_nothing(make_service) -> None:
    service = make_service()
    service.start_session("before")
    for label, (request, expected, detail) in BAD_REQUESTS.items():
        # A fresh connection each time: a server that gives up on a body may close it.
        with httpx.Client(base_url=service.url, timeout=5) as client:
            response = client.post("/v1/watch/start", **request)
        assert response.status_code == expected, (label, response.status_code, response.text)
        assert detail in response.text, (label, response.text)
        assert response.headers["content-type"].startswith("application/json"), label
    status = service.status()
    assert status["active_session"] == "before", "a refused request must not change the session"
    assert service.http.get("/healthz").status_code == 200


SESSIONS = {  # name -> its folder (the percent-encoding, no safe characters)
    "../escape": "..%2Fescape",
    "a/b": "a%2Fb",
    "/absolute": "%2Fabsolute",
    "..\\win": "..%5Cwin",
    "nul\x00byte": "nul%00byte",
    "日本 セッション": "%E6%97%A5%E6%9C%AC%20%E3%82%BB%E3%83%83%E3%82%B7%E3%83%A7%E3%83%B3",
    "%2e%2e%2f": "%252e%252e%252f",
    "...": "...",
    ".hidden": ".hidden",
    "é" * 42: "%C3%A9" * 42,  # 252 bytes once encoded: still one folder
}


@pytest.mark.timeout(90)
def test_session_names_become_one_folder_under_each_root_and_nowhere_else(
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    service = make_service(APP_POLL_INTERVAL_S="0.1", APP_MIN_FILE_AGE_S="0")
    expected: dict[str, tuple[str, str]] = {}  # blob name -> (md5, folder)
    for index, (name, folder) in enumerate(SESSIONS.items()):
        started = service.start_session(name)
        assert started["encoded_session"] == folder and started["session_name"] == name
        file = f"file-{index}.bin"
        md5 = write_random(layout.incoming / file, 1000 + index)
        service.wait_processed(index + 1, timeout=20)
        expected[f"{started['date_prefix']}/{folder}/{file}"] = (md5, folder)
    blank = service.start_session("   ")
    assert blank["session_name"].startswith("00-session-"), "blank means generated"
    date = blank["date_prefix"]

    for blob, (md5, _) in expected.items():
        assert azurite.blob_md5(azurite_container, blob) == md5, blob
    for root in (layout.processing, layout.staging):
        # Each session had its folder under <root>/<date>/ (the blob names above
        # say which); once its files were done, it was removed, date folder too
        # (when the uploader had no more work of that session: idle for 1 s).
        wait_until(
            lambda root=root: not (root / date).exists(),
            10,
            what=f"{root / date} to be removed",
        )
    # Nothing anywhere else: the test's whole tree holds only the configured roots.
    allowed = (layout.incoming, layout.processing, layout.failed, layout.staging)
    strays = [
        p
        for p in tmp_path.rglob("*")
        if not p.name.startswith("ingestd-")
        and not any(p == a or a in p.parents or p in a.parents for a in allowed)
    ]
    assert strays == []
    assert_nothing_left(layout)


FILE_NAMES = [
    "new\nline.bin",
    "tab\there.bin",
    "plus+and&eq=semi;.bin",
    "quotes'\"`.bin",
    "<angle>|pipe*star.bin",
    " leading-space.bin",
    "trailing-space.bin ",
    "trailing-dot.",
    " ",
    "-",
    "--help",
    "%",
    "%%41",
    "a%2Fb.bin",
    "%00",
    "?q=1&x=2#frag",
    "~[]{}$!@^().bin",
    "emoji-\U0001f600.bin",
    unicodedata.normalize("NFC", "café.bin"),  # two names that look the same:
    unicodedata.normalize("NFD", "café.bin"),  # two files, two blobs
    "division\u2215slash.bin",
    "zero\u200bwidth.bin",
    "rtl\u202egnp.exe",
    "€" * 85,  # 255 bytes of 3-byte UTF-8, the longest name
    "CON",
]


@pytest.mark.timeout(90)
def test_odd_file_names_become_exactly_those_blob_names(
    make_service,
    layout: Layout,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    assert len(set(FILE_NAMES)) == len(FILE_NAMES)
    service = make_service(APP_MAX_ATTEMPTS="1")
    date = service.start_session("odd names")["date_prefix"]
    prefix = f"{date}/odd%20names/"
    expected = {
        name: drop(layout.incoming / name, os.urandom(700 + i)) for i, name in enumerate(FILE_NAMES)
    }
    service.wait_processed(len(expected), timeout=60)
    assert_all_arrived(azurite, azurite_container, prefix, expected)
    assert azurite.blob_names(azurite_container, prefix=prefix) == sorted(
        prefix + name for name in expected
    ), "no blob under any other name"

    # Sent unchanged, but the storage side has its own rules. A backslash is
    # stored as "/" (Azure and Azurite alike; the exact name still reads it).
    # Control characters are refused by Azure (400: counted, so such a file
    # ends in .failed); Azurite stores them but its List Blobs then answers
    # 500, so these are checked by name only, each under a session of its own.
    service.start_session("storage rules")
    odd = {
        "back\\slash.bin": drop(layout.incoming / "back\\slash.bin", os.urandom(998)),
        "ctrl-\x01-\x1f-\x7f.bin": drop(
            layout.incoming / "ctrl-\x01-\x1f-\x7f.bin", os.urandom(999)
        ),
    }
    service.wait_processed(len(expected) + len(odd), timeout=20)
    for name, md5 in odd.items():
        assert azurite.blob_md5(azurite_container, f"{date}/storage%20rules/{name}") == md5
    assert (
        azurite.blob_md5(azurite_container, f"{date}/storage%20rules/back/slash.bin")
        == odd["back\\slash.bin"]
    )

    # A name that is not UTF-8 cannot be a blob name: it is quarantined, says why,
    # and /v1/status keeps answering while the name is in last_error.
    service.start_session("bytes")
    raw = os.fsencode(layout.incoming) + b"/latin1-caf\xe9.bin"
    with open(raw, "wb") as stream:
        stream.write(b"not utf-8")
    wait_until(lambda: service.status()["quarantined"] == 1, 20, what="the quarantine")
    response = service.http.get("/v1/status")
    assert response.status_code == 200, response.text
    status = response.json()
    assert "utf-8" in status["last_error"].lower() and "latin1-caf" in status["last_error"]
    failed = os.fsencode(layout.failed / date / "bytes") + b"/latin1-caf\xe9.bin"
    with open(failed, "rb") as stream:
        assert stream.read() == b"not utf-8"
    assert status["processed_ok"] == len(expected) + len(odd)
    assert_nothing_left(layout)


@pytest.mark.timeout(60)
def test_file_replaced_while_it_waits_for_stability_uploads_the_final_bytes(
    make_service,
    layout: Layout,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    service = make_service(APP_MIN_FILE_AGE_S="2")
    date = service.start_session("replaced")["date_prefix"]
    polls = service.status()["scan"]["polls"]

    # 1. Swapped by rename for a different, larger file.
    write_random(layout.incoming / "swapped.bin", MiB)
    # 2. Swapped for a file of the same size and mtime: only the inode differs.
    same = layout.incoming / "same-size.bin"
    write_random(same, MiB)
    # 3. Rewritten in place, truncated then written slowly, smaller than before.
    rewritten = layout.incoming / "rewritten.bin"
    write_random(rewritten, 2 * MiB)
    wait_until(
        lambda: service.status()["scan"]["polls"] >= polls + 2,
        5,
        what="the first versions to be seen",
    )

    final = {"swapped.bin": write_random(tmp_path / "v2-swapped", 3 * MiB)}
    os.rename(tmp_path / "v2-swapped", layout.incoming / "swapped.bin")
    before = os.stat(same)
    final["same-size.bin"] = write_random(tmp_path / "v2-same", MiB)
    os.utime(tmp_path / "v2-same", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.rename(tmp_path / "v2-same", same)
    data = os.urandom(MiB + 7)
    with open(rewritten, "r+b") as stream:
        stream.truncate(0)
        for start in range(0, len(data), 64 * 1024):
            stream.write(data[start : start + 64 * 1024])
            stream.flush()
            time.sleep(0.05)
            assert rewritten.exists(), "claimed while being rewritten"
    final["rewritten.bin"] = md5_of(rewritten)

    service.wait_processed(3, timeout=30)
    assert_all_arrived(azurite, azurite_container, f"{date}/replaced/", final)
    assert_nothing_left(layout)


@pytest.mark.timeout(60)
def test_file_rewritten_after_it_was_found_stable_is_not_taken_half_written(
    fuse_mount: FreezableMount,
    make_service,
    tmp_path: Path,
    azurite: Azurite,
    azurite_container: str,
) -> None:
    """Stable, queued behind a busy uploader, then rewritten in place: the claim must
    notice the file is no longer what was found stable and leave it until it is again."""
    layout = folder_layout(fuse_mount.mountpoint, tmp_path / "staging")
    service = make_service(
        layout_=layout,
        APP_WORKER_CONCURRENCY="1",
        APP_AUTOSTART="true",
        APP_AUTOSTART_SESSION="queued",
    )
    date = service.status()["session"]["date_prefix"]
    # The only uploader sits in the kernel opening the first file.
    fuse_mount.freeze("open", glob=f"/.processing/{date}/queued/blocker.bin")
    blocker = write_random(fuse_mount.backing_path("incoming", "blocker.bin"), MiB)
    fuse_mount.wait_blocked(1, op="open", timeout=15)
    victim = fuse_mount.backing_path("incoming", "victim.bin")
    write_random(victim, 2 * MiB)
    wait_until(
        lambda: service.status()["queue"]["depth"] == 1,
        15,
        what="victim.bin found stable and queued",
    )

    data = os.urandom(3 * MiB)
    with open(victim, "r+b") as stream:  # the writer starts over, in place
        stream.truncate(0)
        stream.write(data[:MiB])
        stream.flush()
        fuse_mount.thaw()
        # The uploader finishes the blocker, then reaches victim.bin mid-rewrite.
        wait_until(
            lambda: (
                (s := service.status())["processed_ok"] >= 1
                and not s["in_flight"]
                and s["queue"]["depth"] == 0
            ),
            15,
            what="victim.bin's turn",
        )
        stream.write(data[MiB:])
    service.wait_processed(2, timeout=20)
    assert_all_arrived(
        azurite,
        azurite_container,
        f"{date}/queued/",
        {"blocker.bin": blocker, "victim.bin": hashlib.md5(data).hexdigest()},
    )
    assert service.status()["skipped_gone"] >= 1
    assert_nothing_left(layout)
    assert failed_files(layout) == []
