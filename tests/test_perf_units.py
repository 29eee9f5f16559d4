"""Unit tests for the fast paths: one-pass staging, block streaming, scanner offers."""

from __future__ import annotations

import hashlib
import os
from multiprocessing import Pipe
from pathlib import Path

import pytest

from ingestd import blobupload, filesteps, md5pair
from ingestd.childruntime import Channel
from ingestd.scanner import choose_offers

MiB = 1024 * 1024


class _Paths:
    def __init__(self, root: Path) -> None:
        self.claimed = root / "claimed.bin"
        self.staged = root / "staging" / "claimed.bin"


@pytest.mark.parametrize(
    "size", [0, 1000, 4 * MiB, 4 * MiB + 1, 3 * MiB + 5, 6 * MiB, filesteps.COPY_CHUNK * 5 + 17]
)
@pytest.mark.parametrize("whole_md5", [True, False], ids=["put-md5", "blocks-only"])
def test_stage_hashes_the_file_and_each_block_in_one_pass(
    tmp_path: Path, size: int, whole_md5: bool
) -> None:
    block, single_put = 2 * MiB + 512 * 1024, 4 * MiB  # a block size that does not divide the chunk
    data = os.urandom(size)
    paths = _Paths(tmp_path)
    paths.claimed.write_bytes(data)
    parent, child = Pipe()
    blocks: list[tuple[int, int, bytes]] = []

    staged = filesteps.stage(
        paths,
        Channel(child),
        "claimed.bin",
        block,
        single_put,
        lambda offset, length, md5: blocks.append((offset, length, md5)),
        whole_md5,
    )

    assert paths.staged.read_bytes() == data
    assert staged.size == size
    if size <= single_put:  # one request: its MD5 is always known, it is the Content-MD5
        assert staged.md5 == hashlib.md5(data).digest()
        assert staged.data == data and staged.block_md5s == () and blocks == []
        return
    assert staged.md5 == (hashlib.md5(data).digest() if whole_md5 else None)
    assert staged.data is None
    expected = [
        (o, len(data[o : o + block]), hashlib.md5(data[o : o + block]).digest())
        for o in range(0, size, block)
    ]
    assert blocks == expected
    assert list(staged.block_md5s) == [md5 for _, _, md5 in expected]
    assert len(staged.block_md5s) == max(1, -(-size // block))
    parent.close()


@pytest.mark.parametrize("accelerated", [True, False], ids=["c", "hashlib"])
@pytest.mark.parametrize("block", [64, 4096, 1000 * 64, MiB])
def test_md5_pair_gives_each_block_and_the_whole_file_exactly_as_hashlib(
    accelerated: bool, block: int
) -> None:
    assert md5pair.ACCELERATED, "scripts/test builds ingestd._md5pair (needs gcc)"
    rng = __import__("random").Random(block)
    for size in [
        0,
        1,
        55,
        56,
        63,
        64,
        65,
        119,
        120,
        128,
        block - 1,
        block,
        block + 1,
        3 * block + 17,
        2 * MiB + 3,
    ]:
        data = os.urandom(size)
        hashes = md5pair.pair(block, accelerated)
        digests, pos = [], 0
        while pos < size:  # feed each block in uneven pieces, as short reads do
            end = min(size, (pos // block + 1) * block)
            while pos < end:
                step = min(end - pos, rng.randint(1, 9000))
                hashes.update(memoryview(data)[pos : pos + step])
                pos += step
            digests.append(hashes.split())
        expected = [hashlib.md5(data[o : o + block]).digest() for o in range(0, size, block)]
        assert digests == expected, size
        assert hashes.digest() == hashlib.md5(data).digest(), size


def test_md5_pair_refuses_input_after_a_block_that_ends_mid_md5_block() -> None:
    assert md5pair.ACCELERATED, "scripts/test builds ingestd._md5pair (needs gcc)"
    hashes = md5pair.pair(64)
    hashes.update(b"abc")
    assert hashes.split() == hashlib.md5(b"abc").digest()
    with pytest.raises(ValueError):
        hashes.update(b"more")
    assert hashes.digest() == hashlib.md5(b"abc").digest()


def test_a_block_size_off_the_md5_block_uses_the_fallback() -> None:
    assert isinstance(md5pair.pair(1000), md5pair._HashlibPair)


def test_a_failing_block_upload_stops_the_copy_and_removes_the_partial_copy(tmp_path: Path) -> None:
    paths = _Paths(tmp_path)
    paths.claimed.write_bytes(os.urandom(8 * MiB))
    _, child = Pipe()

    def refuse(offset: int, length: int, md5: bytes) -> None:
        raise RuntimeError("storage said no")

    with pytest.raises(filesteps.BlockFailed):
        filesteps.stage(paths, Channel(child), "claimed.bin", MiB, MiB, refuse)
    assert not paths.staged.exists()


def test_file_range_reads_only_its_range_and_rewinds(tmp_path: Path) -> None:
    import requests.utils

    path = tmp_path / "f.bin"
    data = os.urandom(3 * blobupload.READ_SIZE + 10)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, length = 100, 2 * blobupload.READ_SIZE + 7
        reads: list[int] = []
        body = blobupload.FileRange(fd, offset, length, lambda: reads.append(body.tell()))
        assert len(body) == length and requests.utils.super_len(body) == length
        chunks = []
        while chunk := body.read(32 * 1024):  # what the HTTP stack asks for
            assert len(chunk) <= blobupload.READ_SIZE
            chunks.append(bytes(chunk))
        assert b"".join(chunks) == data[offset : offset + length]
        assert body.tell() == length
        assert reads == [blobupload.READ_SIZE, 2 * blobupload.READ_SIZE, length]  # a beat per read
        body.seek(0)  # the SDK's retry rewinds the body
        assert body.read() == data[offset : offset + length]
        assert body.seek(0, os.SEEK_END) == length and body.read(10) == b""
    finally:
        os.close(fd)


def test_waiting_files_are_offered_again_once_every_few_polls() -> None:
    names = [f"f{i:04d}" for i in range(800)]
    current = {n: (1, 1, i) for i, n in enumerate(names)}
    stable = [(n, 1, 1) for n in names]

    offers, offered = choose_offers(stable, current, {}, poll=1, every=8)
    assert len(offers) == len(names)  # new: all offered at once

    counts = dict.fromkeys(names, 0)
    for poll in range(2, 2 + 8):
        offers, offered = choose_offers(stable, current, offered, poll=poll, every=8)
        assert len(offers) < len(names) / 4  # a share per poll, not everything
        for name, _, _ in offers:
            counts[name] += 1
    assert set(counts.values()) == {1}  # each waiting file exactly once per 8 polls

    changed = dict(current, f0001=(2, 2, 1))  # rewritten since it was offered
    offers, offered = choose_offers([("f0001", 2, 2)], changed, offered, poll=10, every=8)
    assert offers == [("f0001", 2, 2)]
    assert list(offered) == ["f0001"]  # gone files are forgotten


class _ScanSettings:
    def __init__(self, incoming: Path) -> None:
        self.nfs_incoming_dir = incoming
        self.nfs_processing_root = incoming.parent / ".processing"
        self.min_file_age_s = 0.0
        self.poll_interval_s = 0.1
        self.lease_timeout_s = 600.0


def test_waiting_files_are_looked_at_only_when_due_and_a_change_is_still_seen(
    tmp_path: Path,
) -> None:
    """A file already offered is lstat'ed only at the polls where it is due for a
    re-offer; a change made meanwhile is seen then, and the new version is offered."""
    from ingestd.messages import Stable
    from ingestd.scanner import REOFFER_POLLS, Scanner

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    names = [f"f{i:03d}" for i in range(64)]
    for name in names:
        (incoming / name).write_bytes(b"x")
    parent, child = Pipe()
    scanner = Scanner(_ScanSettings(incoming), Channel(child), "replica~0000000a")  # type: ignore[arg-type]
    looked_at: list[str] = []
    unchecked = scanner._unchecked

    def counting(name: str):
        signature = unchecked(name)
        if signature is None:
            looked_at.append(name)
        return signature

    scanner._unchecked = counting  # type: ignore[method-assign]

    def offers() -> dict[str, int]:
        found = {}
        while parent.poll(0):
            message = parent.recv()
            if isinstance(message, Stable):
                found.update({name: size for name, size, _ in message.files})
        return found

    scanner._poll()
    scanner._poll()
    assert set(offers()) == set(names)  # stable at the second poll: offered at once
    looked_at.clear()
    (incoming / "f007").write_bytes(b"longer")  # rewritten while it waits
    seen: dict[str, int] = {}
    for _ in range(REOFFER_POLLS):
        scanner._poll()
        seen.update(offers())
    # Each waiting file was lstat'ed once in REOFFER_POLLS polls, not at every poll.
    assert sorted(set(looked_at) - {"f007"}) == sorted(set(names) - {"f007"})
    assert len(looked_at) <= len(names) + 2
    scanner._poll()
    seen.update(offers())
    assert seen["f007"] == len(b"longer"), "the new version is offered"
    parent.close()


def test_a_claim_survives_its_folder_being_pruned_while_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the benchmark (2,000 small files, 4 uploaders): one uploader's cleanup
    removed the emptied date folder between another's two mkdirs, and the claim failed."""
    source = tmp_path / "incoming" / "a.bin"
    source.parent.mkdir()
    source.write_bytes(b"x")
    target = tmp_path / ".processing" / "20260101" / "s" / "a.bin"
    real_mkdir, calls = Path.mkdir, []

    def pruned_once(self: Path, *args, **kwargs) -> None:
        calls.append(self)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", pruned_once)
    assert filesteps._rename_into(source, target)
    assert target.read_bytes() == b"x" and not source.exists()


def test_the_queue_counts_waiting_jobs_per_session_as_they_come_and_go() -> None:
    from collections import Counter

    from ingestd.messages import Job
    from ingestd.workqueue import WorkQueue

    queue = WorkQueue(10)

    def expected() -> Counter:
        return Counter(job.key[:2] for job in queue.jobs())

    jobs = [Job(name=f"f{i}", date="20260101", session=f"s{i % 3}") for i in range(7)]
    for job in jobs[:5]:
        queue.add_new(job)
    queue.add_recovered(jobs[5])
    assert queue.waiting_by_session() == expected()
    taken = [queue.take(0.0) for _ in range(4)]
    assert queue.waiting_by_session() == expected()
    queue.retry(taken[0], 5.0)  # not due yet
    queue.add_new(jobs[6])
    assert queue.waiting_by_session() == expected()
    while queue.take(10.0) is not None:
        assert queue.waiting_by_session() == expected()
    assert queue.waiting_by_session() == Counter()
