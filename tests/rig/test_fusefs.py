"""Self-tests of the freezable FUSE mount (tests/support/fusefs.py).

Anything that may block on the mount runs in a child process: the pytest process
only touches the mount while it is known to be unfrozen, and the timeouts use
pytest-timeout's thread method, which ends the whole run (the daemon's lifeline
then thaws and unmounts) instead of waiting on a signal a frozen syscall ignores.
Measured figures are printed (run with -s) and stored with record_property.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import fusefs
from tests.support.fusefs import FreezableMount, is_mounted
from tests.support.service import md5_of, write_random

MiB = 1 << 20
BIG_SIZE = 256 * MiB
COPY_CHUNK = 1 * MiB
#: A floor only a broken path misses (e.g. losing big requests or the zero-copy
#: read/write path), not a performance target: measured here 460-780 MB/s write
#: (fsync included) and 590-1250 MB/s read, recorded as figures; a busy machine
#: stays far above 10.
MIN_THROUGHPUT_MB_S = 10.0
#: How long a frozen call must stay blocked to count as "does not return".
BLOCK_PROBE_S = 1.0
#: A SIGKILLed or thawed child must be reaped within this (measured: 0.01-0.06 s, the
#: figure is recorded). The behaviour is "reaped at all, while the freeze lasts", so
#: the bound is far above what a busy machine adds.
REAPED_WITHIN_S = 15.0
#: How long a child that must stay unreapable is watched for.
UNREAPED_PROBE_S = 2.0

Spawn = Callable[..., subprocess.Popen]
Record = Callable[[str, object], None]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def spawn(fuse_mount: FreezableMount) -> Iterator[Spawn]:
    """Start ``python -c CODE`` children; teardown thaws, kills and reaps them.

    Thaw comes first: a child SIGKILLed on a frozen mount may be unreapable until
    the daemon answers, and the mount fixture's teardown runs after this one.
    """
    children: list[subprocess.Popen] = []

    def _spawn(code: str, **kwargs: object) -> subprocess.Popen:
        proc = subprocess.Popen(python(code), **kwargs)  # type: ignore[call-overload]
        children.append(proc)
        return proc

    yield _spawn
    fuse_mount.thaw()
    for proc in children:
        if proc.poll() is None:
            proc.kill()
    stuck = []
    for proc in children:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stuck.append(proc.pid)
    assert not stuck, f"children {stuck} still unreapable 10 s after thaw"


def python(code: str) -> list[str]:
    """argv running ``code`` in a fresh interpreter (a child that may block on the mount)."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def reaped_within(proc: subprocess.Popen, seconds: float) -> float | None:
    """Seconds until ``proc`` was reaped (poll, never a blocking wait), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if proc.poll() is not None:
            return time.monotonic() - start
        time.sleep(0.005)
    return None


def status(proc: subprocess.Popen) -> str:
    try:
        return psutil.Process(proc.pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def nfs_layout(mount: FreezableMount) -> None:
    """The production share's layout: producers drop files into incoming/."""
    (mount.backing / "incoming").mkdir()
    (mount.backing / ".processing").mkdir()


def report(record_property: Record, name: str, value: object) -> None:
    record_property(name, value)
    print(f"[fusefs] {name} = {value}")


# ------------------------------------------------------------------- passthrough basics


@pytest.mark.timeout(60, method="thread")
def test_round_trip_preserves_content_and_metadata(fuse_mount: FreezableMount) -> None:
    mount = fuse_mount
    os.mkdir(mount.path("incoming"))
    os.mkdir(mount.path(".processing"))
    data = os.urandom(8 * MiB + 123)  # not a multiple of any request size
    with open(mount.path("incoming", "a.bin"), "wb") as fh:
        fh.write(data)
        os.fsync(fh.fileno())
    expected = hashlib.md5(data).hexdigest()

    assert md5_of(mount.backing_path("incoming", "a.bin")) == expected, "backing copy differs"
    assert md5_of(mount.path("incoming", "a.bin")) == expected, "read back through mount differs"
    st = os.stat(mount.path("incoming", "a.bin"))
    assert st.st_size == len(data)
    assert st.st_ino == os.stat(mount.backing_path("incoming", "a.bin")).st_ino
    mtime_ns = 1_700_000_000_987_654_321
    os.utime(mount.path("incoming", "a.bin"), ns=(1_600_000_000_123_456_789, mtime_ns))
    assert os.stat(mount.backing_path("incoming", "a.bin")).st_mtime_ns == mtime_ns
    os.truncate(mount.path("incoming", "a.bin"), 10)
    assert mount.backing_path("incoming", "a.bin").read_bytes() == data[:10]
    assert sorted(os.listdir(mount.path())) == [".processing", "incoming"]


@pytest.mark.slow
@pytest.mark.timeout(120, method="thread")
def test_256_mib_throughput(
    fuse_mount: FreezableMount, tmp_path: Path, record_property: Record
) -> None:
    """Copy 256 MiB in and out through the mount, as the uploader will, and time it.

    The write includes fsync (the data reaches the backing disk); os.sync() before
    each phase keeps the writeback of earlier data out of the measurement.
    """
    src = tmp_path / "src.bin"
    expected = write_random(src, BIG_SIZE)
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    target = fuse_mount.path("big.bin")

    os.sync()
    start = time.monotonic()
    with open(src, "rb", buffering=0) as fin, open(target, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(view[:n])
        os.fsync(fout.fileno())
    write_mb_s = BIG_SIZE / (time.monotonic() - start) / 1e6

    os.sync()
    start = time.monotonic()
    total = 0
    with open(fuse_mount.path("big.bin"), "rb", buffering=0) as fin:
        while n := fin.readinto(buf):
            total += n
    read_mb_s = BIG_SIZE / (time.monotonic() - start) / 1e6

    report(record_property, "write_MB_s", round(write_mb_s))
    report(record_property, "read_MB_s", round(read_mb_s))
    assert total == BIG_SIZE
    assert md5_of(fuse_mount.path("big.bin")) == expected
    assert write_mb_s > MIN_THROUGHPUT_MB_S and read_mb_s > MIN_THROUGHPUT_MB_S
    src.unlink()  # pytest keeps the last runs' tmp_path: do not keep 512 MiB in it
    fuse_mount.backing_path("big.bin").unlink()


# ------------------------------------------------------------------------------- rename


@pytest.mark.timeout(60, method="thread")
def test_rename_moves_the_same_inode(fuse_mount: FreezableMount) -> None:
    """A claim rename keeps the inode: it is a real rename(2), not a copy + delete."""
    nfs_layout(fuse_mount)
    src = fuse_mount.path("incoming", "a.bin")
    src.write_bytes(b"payload")
    ino = os.stat(src).st_ino
    os.makedirs(fuse_mount.path(".processing", "2024-05-01", "session-1"))
    dst = fuse_mount.path(".processing", "2024-05-01", "session-1", "a.bin")

    os.rename(src, dst)

    assert not os.path.exists(src)
    assert os.stat(dst).st_ino == ino
    backing = fuse_mount.backing_path(".processing", "2024-05-01", "session-1", "a.bin")
    assert os.stat(backing).st_ino == ino
    assert os.listdir(fuse_mount.path("incoming")) == []


@pytest.mark.timeout(60, method="thread")
def test_rename_over_a_name_is_atomic_for_concurrent_lookups(
    fuse_mount: FreezableMount, spawn: Spawn, tmp_path: Path
) -> None:
    """A process that keeps looking a name up never finds it missing while it is replaced.

    The reader only stats: if it held the target OPEN, libfuse would first rename
    the busy target to .fuse_hiddenNNNN (as an NFS client silly-renames it to .nfsNNNN)
    and the name would briefly not exist, on this mount as on NFS.
    """
    nfs_layout(fuse_mount)
    target = fuse_mount.path(".processing", "current")
    stop = tmp_path / "stop"  # outside the mount

    def version(n: int) -> bytes:
        return (f"version-{n:06d}\n" * 4096).encode()

    target.write_bytes(version(0))
    reader = spawn(
        f"""
        import errno, json, os
        versions, lookups, missing, stale, wrong_size = set(), 0, 0, 0, 0
        while not os.path.exists({str(stop)!r}):
            try:
                st = os.stat({str(target)!r})
            except FileNotFoundError:
                missing += 1
                continue
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                stale += 1
                continue
            lookups += 1
            versions.add((st.st_ino, st.st_mtime_ns))
            wrong_size += st.st_size != {len(version(0))}
        print(json.dumps({{"lookups": lookups, "versions": len(versions), "missing": missing,
                          "stale": stale, "wrong_size": wrong_size}}))
        """,
        stdout=subprocess.PIPE,
        text=True,
    )
    renames = 0
    deadline = time.monotonic() + 20
    while renames < 300 and time.monotonic() < deadline:
        renames += 1
        tmp = fuse_mount.path(".processing", f".tmp-{renames}")
        tmp.write_bytes(version(renames))
        os.rename(tmp, target)
    stop.touch()
    out, _ = reader.communicate(timeout=20)
    result = json.loads(out)
    print(f"[fusefs] concurrent lookups during {renames} renames: {result}")
    assert result["missing"] == 0, result
    assert result["wrong_size"] == 0, result
    assert result["versions"] >= 2, f"reader never overlapped the renames: {result}"
    assert target.read_bytes() == version(renames)
    assert sorted(os.listdir(fuse_mount.path(".processing"))) == ["current"]


@pytest.mark.timeout(30, method="thread")
def test_rename_noreplace_is_honoured(fuse_mount: FreezableMount) -> None:
    """renameat2(RENAME_NOREPLACE) must fail with EEXIST, not silently overwrite."""
    nfs_layout(fuse_mount)
    fuse_mount.path("incoming", "a").write_bytes(b"a")
    fuse_mount.path("incoming", "b").write_bytes(b"b")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    at_fdcwd, rename_noreplace = -100, 1
    rc = libc.renameat2(
        at_fdcwd,
        os.fsencode(fuse_mount.path("incoming", "a")),
        at_fdcwd,
        os.fsencode(fuse_mount.path("incoming", "b")),
        rename_noreplace,
    )
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert fuse_mount.backing_path("incoming", "b").read_bytes() == b"b"


# ------------------------------------------------------------------------------- freeze


@pytest.mark.timeout(30, method="thread")
def test_freeze_blocks_stat_until_thaw(fuse_mount: FreezableMount, spawn: Spawn) -> None:
    nfs_layout(fuse_mount)
    fuse_mount.backing_path("incoming", "a.bin").write_bytes(b"x" * 1234)
    probe = str(fuse_mount.path("incoming", "a.bin"))
    os.stat(probe)  # warm every kernel cache: a cached answer must not mask the freeze
    fuse_mount.freeze()
    child = spawn(
        f"import os; print(os.stat({probe!r}).st_size)", stdout=subprocess.PIPE, text=True
    )

    fuse_mount.wait_blocked(1, pid=child.pid)
    assert reaped_within(child, BLOCK_PROBE_S) is None, "stat returned although the mount is frozen"
    assert status(child) in (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP)
    # The control channel answers while the mount is frozen (it would otherwise
    # wait for the thaw, which never comes here: the call would time out).
    assert fuse_mount.stats()["frozen"] is True

    fuse_mount.thaw()
    out, _ = child.communicate(timeout=10)
    assert child.returncode == 0
    assert out.strip() == "1234"


@pytest.mark.timeout(30, method="thread")
def test_freeze_blocks_writes_no_writeback_cache(fuse_mount: FreezableMount, spawn: Spawn) -> None:
    """Writes are write-through: a frozen `write` stops the writer (nothing buffers it)."""
    nfs_layout(fuse_mount)
    fuse_mount.freeze(["write"])
    child = spawn(f"open({str(fuse_mount.path('incoming', 'w.bin'))!r}, 'wb').write(b'x' * 4096)")
    fuse_mount.wait_blocked(1, op="write", pid=child.pid)
    assert reaped_within(child, BLOCK_PROBE_S) is None
    assert fuse_mount.backing_path("incoming", "w.bin").stat().st_size == 0
    fuse_mount.thaw()
    assert child.wait(10) == 0
    assert fuse_mount.backing_path("incoming", "w.bin").stat().st_size == 4096


@pytest.mark.timeout(30, method="thread")
def test_sigkill_ends_child_blocked_in_stat(
    fuse_mount: FreezableMount, spawn: Spawn, record_property: Record
) -> None:
    """Default (killable) freeze = hard NFS mount: SIGKILL ends the waiting caller."""
    nfs_layout(fuse_mount)
    probe = str(fuse_mount.path("incoming"))
    fuse_mount.freeze()
    child = spawn(f"import os; os.stat({probe!r})")
    fuse_mount.wait_blocked(1, pid=child.pid)

    child.kill()
    seconds = reaped_within(child, REAPED_WITHIN_S)

    assert seconds is not None, f"child blocked in stat survived SIGKILL ({status(child)})"
    report(record_property, "stat_reaped_after_sigkill_s", round(seconds, 3))
    assert child.returncode == -9
    stats = fuse_mount.stats()
    assert stats["frozen"] is True and sum(stats["interrupted"].values()) >= 1
    other = spawn(f"import os; os.stat({probe!r})")  # the mount itself is still frozen
    fuse_mount.wait_blocked(1, pid=other.pid)


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("killable", [True, False], ids=["killable", "unkillable"])
def test_sigkill_child_blocked_in_listdir(
    fuse_mount: FreezableMount, spawn: Spawn, killable: bool, record_property: Record
) -> None:
    """Measure whether a listdir child killed on a frozen mount can be reaped.

    Measured here: killable freeze -> reaped in about 0.05 s; unkillable freeze ->
    D state for as long as the freeze lasts, reaped about 0.01 s after thaw (the
    daemon already holds the request, so the kernel waits uninterruptibly).
    """
    nfs_layout(fuse_mount)
    fuse_mount.freeze(killable=killable)
    child = spawn(f"import os; os.listdir({str(fuse_mount.path('incoming'))!r})")
    fuse_mount.wait_blocked(1, pid=child.pid)

    child.kill()
    seconds = reaped_within(child, REAPED_WITHIN_S if killable else UNREAPED_PROBE_S)

    if killable:
        assert seconds is not None, f"killable freeze: child survived SIGKILL ({status(child)})"
        report(record_property, "listdir_killable_reaped_s", round(seconds, 3))
        return
    assert seconds is None, "unkillable freeze: child was reaped while frozen"
    assert status(child) == psutil.STATUS_DISK_SLEEP
    fuse_mount.thaw()
    after_thaw = reaped_within(child, REAPED_WITHIN_S)
    assert after_thaw is not None, f"child not reaped after thaw ({status(child)})"
    report(record_property, "listdir_unkillable_reaped_after_thaw_s", round(after_thaw, 3))


@pytest.mark.timeout(30, method="thread")
def test_killed_child_blocked_in_close_stays_unreapable_until_thaw(
    fuse_mount: FreezableMount, spawn: Spawn, record_property: Record
) -> None:
    """close() waits for FLUSH like NFS waits for writeback: SIGKILL does not end it."""
    nfs_layout(fuse_mount)
    child = spawn(
        f"""
        import sys
        fh = open({str(fuse_mount.path("incoming", "w.bin"))!r}, "wb")
        fh.write(b"x" * 100)
        fh.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        fh.close()
        """,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    fuse_mount.freeze(["flush"])  # killable, yet flush is in UNKILLABLE_OPS
    child.stdin.write("\n")
    child.stdin.flush()
    fuse_mount.wait_blocked(1, op="flush", pid=child.pid)

    child.kill()
    assert reaped_within(child, UNREAPED_PROBE_S) is None, (
        "child blocked in close() was reaped while frozen"
    )
    assert status(child) == psutil.STATUS_DISK_SLEEP
    fuse_mount.thaw()
    seconds = reaped_within(child, REAPED_WITHIN_S)
    assert seconds is not None
    report(record_property, "close_reaped_after_thaw_s", round(seconds, 3))


@pytest.mark.timeout(30, method="thread")
def test_killed_writer_hangs_in_exit_flush_until_thaw(
    fuse_mount: FreezableMount, spawn: Spawn
) -> None:
    """SIGKILL interrupts the frozen write, but the dying process then closes its file.

    That FLUSH is sent from the exit path with SIGKILL already consumed, so it waits
    for the frozen server: the production "killed child stays unreapable" case.
    """
    nfs_layout(fuse_mount)
    child = spawn(
        f"""
        fh = open({str(fuse_mount.path("incoming", "w.bin"))!r}, "wb", buffering=0)
        while True:
            fh.write(b"y" * 65536)
        """
    )
    written = fuse_mount.backing_path("incoming", "w.bin")
    deadline = time.monotonic() + 10
    while not (written.exists() and written.stat().st_size >= 4 * MiB):
        assert time.monotonic() < deadline, "writer made no progress"
        time.sleep(0.01)
    fuse_mount.freeze()
    fuse_mount.wait_blocked(1, op="write", pid=child.pid)

    child.kill()
    fuse_mount.wait_blocked(1, op="flush", pid=child.pid)
    assert reaped_within(child, UNREAPED_PROBE_S) is None
    assert status(child) == psutil.STATUS_DISK_SLEEP
    assert fuse_mount.stats()["interrupted"].get("write", 0) >= 1
    fuse_mount.thaw()
    assert reaped_within(child, REAPED_WITHIN_S) is not None


@pytest.mark.slow
@pytest.mark.timeout(120, method="thread")
def test_read_freeze_stalls_copy_mid_file_while_listing_answers(
    fuse_mount: FreezableMount, spawn: Spawn, tmp_path: Path
) -> None:
    nfs_layout(fuse_mount)
    expected = write_random(fuse_mount.backing_path("incoming", "big.bin"), BIG_SIZE)
    dest = tmp_path / "copy.bin"  # local disk: safe to stat from the test process
    stall_at = 64 * MiB
    fuse_mount.freeze(["read"], glob="/incoming/big.bin", from_offset=stall_at)
    source = str(fuse_mount.path("incoming", "big.bin"))
    copier = spawn(
        f"""
        with open({source!r}, "rb") as src, open({str(dest)!r}, "wb") as dst:
            while chunk := src.read({COPY_CHUNK}):
                dst.write(chunk)
                dst.flush()
        """
    )
    fuse_mount.wait_blocked(1, op="read", pid=copier.pid, timeout=30)
    size = dest.stat().st_size
    time.sleep(BLOCK_PROBE_S)
    assert dest.stat().st_size == size, "copy kept going while reads are frozen"
    assert stall_at - COPY_CHUNK < size <= stall_at
    assert copier.poll() is None

    lister = spawn(
        f"import os; print(os.listdir({str(fuse_mount.path('incoming'))!r}),"
        f" os.stat({source!r}).st_size)",
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = lister.communicate(timeout=5)
    assert out.strip() == f"['big.bin'] {BIG_SIZE}"

    fuse_mount.thaw()
    assert copier.wait(60) == 0
    assert md5_of(dest) == expected
    dest.unlink()  # pytest keeps the last runs' tmp_path: do not keep 512 MiB in it
    fuse_mount.backing_path("incoming", "big.bin").unlink()


@pytest.mark.timeout(60, method="thread")
def test_many_frozen_readers_do_not_starve_other_calls(
    fuse_mount: FreezableMount, spawn: Spawn
) -> None:
    """More frozen readers than libfuse's default 10 threads / kernel's 12 background slots."""
    nfs_layout(fuse_mount)
    readers = 40
    for i in range(readers):
        fuse_mount.backing_path("incoming", f"f{i}").write_bytes(os.urandom(256 * 1024))
    fuse_mount.freeze(["read"])
    paths = [str(fuse_mount.path("incoming", f"f{i}")) for i in range(readers)]
    children = [spawn(f"open({path!r}, 'rb').read()") for path in paths]
    blocked = fuse_mount.wait_blocked(readers, op="read", timeout=20)
    assert {b["pid"] for b in blocked} >= {c.pid for c in children}

    lister = spawn(
        f"import os; print(len(os.listdir({str(fuse_mount.path('incoming'))!r})))",
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = lister.communicate(timeout=5)
    assert out.strip() == str(readers)
    fuse_mount.thaw()
    assert all(c.wait(20) == 0 for c in children)


# ------------------------------------------------------------------------------- faults


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("op", ["readdir", "read"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ESTALE], ids=["EIO", "ESTALE"])
def test_injected_fault_reaches_caller(fuse_mount: FreezableMount, op: str, err: int) -> None:
    nfs_layout(fuse_mount)
    fuse_mount.backing_path("incoming", "a.bin").write_bytes(os.urandom(3 * MiB))
    fuse_mount.backing_path(".processing", "b.bin").write_bytes(b"b")

    def call(directory: str, name: str) -> object:
        if op == "readdir":
            return os.listdir(fuse_mount.path(directory))
        return fuse_mount.path(directory, name).read_bytes()

    fuse_mount.fail(op, err, glob="/incoming*")
    with pytest.raises(OSError) as caught:
        call("incoming", "a.bin")
    assert caught.value.errno == err
    call(".processing", "b.bin")  # glob: other paths unaffected
    assert fuse_mount.stats()["faults_injected"][op] >= 1

    fuse_mount.clear_faults()
    call("incoming", "a.bin")


@pytest.mark.timeout(30, method="thread")
def test_fault_count_fails_only_the_next_n_calls(fuse_mount: FreezableMount) -> None:
    nfs_layout(fuse_mount)
    fuse_mount.fail("readdir", errno.EIO, count=2)
    outcomes = []
    for _ in range(3):
        try:
            os.listdir(fuse_mount.path("incoming"))
            outcomes.append("ok")
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno])
    assert outcomes == ["EIO", "EIO", "ok"]
    assert fuse_mount.stats()["faults"] == []


@pytest.mark.timeout(30, method="thread")
def test_fault_after_carries_the_rename_out_then_fails_it(fuse_mount: FreezableMount) -> None:
    """A lost reply: the rename happened, yet the caller is told ENOENT."""
    nfs_layout(fuse_mount)
    fuse_mount.backing_path("incoming", "a.bin").write_bytes(b"x")
    fuse_mount.fail("rename", errno.ENOENT, glob="/incoming/a.bin", count=1, after=True)
    with pytest.raises(FileNotFoundError):
        os.rename(fuse_mount.path("incoming", "a.bin"), fuse_mount.path("incoming", "b.bin"))
    assert not fuse_mount.backing_path("incoming", "a.bin").exists()
    assert fuse_mount.backing_path("incoming", "b.bin").read_bytes() == b"x"


@pytest.mark.timeout(30, method="thread")
def test_unknown_operation_names_are_rejected(fuse_mount: FreezableMount) -> None:
    """A typo must not create a rule that silently never matches."""
    with pytest.raises(ValueError, match="unknown FUSE operation"):
        fuse_mount.fail("readir", errno.EIO)
    with pytest.raises(ValueError, match="unknown FUSE operation"):
        fuse_mount.freeze(["stat"])


# ---------------------------------------------------------------------- teardown safety


@pytest.mark.timeout(60, method="thread")
def test_unmount_while_frozen_leaves_no_mount(tmp_path: Path) -> None:
    backing = tmp_path / "nfs"
    backing.mkdir()
    mount = FreezableMount.start(backing)
    try:
        mount.freeze(killable=False)
        child = subprocess.Popen(python(f"import os; os.stat({str(mount.path())!r})"))
        mount.wait_blocked(1, pid=child.pid)
    finally:
        mount.unmount()
    assert not is_mounted(mount.mountpoint)
    assert mount.process.returncode is not None
    assert child.wait(10) == 0, "thaw on unmount should let the blocked stat finish"
    assert not mount.mountpoint.exists(), "private mount directory left behind"


@pytest.mark.timeout(60, method="thread")
def test_lifeline_unmounts_when_test_process_disappears(tmp_path: Path) -> None:
    """Closing the daemon's stdin stands in for pytest being killed mid-freeze."""
    backing = tmp_path / "nfs"
    backing.mkdir()
    mount = FreezableMount.start(backing)
    try:
        mount.freeze(killable=False)
        child = subprocess.Popen(python(f"import os; os.listdir({str(mount.path())!r})"))
        mount.wait_blocked(1, pid=child.pid)
        assert mount.process.stdin is not None
        mount.process.stdin.close()
        mount.process.wait(10)
        assert not is_mounted(mount.mountpoint)
        assert child.wait(10) == 0
    finally:
        mount.unmount()


@pytest.mark.timeout(60, method="thread")
def test_fixture_fails_instead_of_skipping_without_fuse(tmp_path: Path) -> None:
    """Run a tiny pytest session whose /dev/fuse is missing: it must error, not skip."""
    repo = Path(__file__).resolve().parents[2]
    test_file = tmp_path / "test_needs_fuse.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import tests.support.fusefs as fusefs
            from tests.support.fusefs import fuse_mount  # noqa: F401

            fusefs.DEV_FUSE = "/nonexistent/fuse"

            def test_uses_mount(fuse_mount):
                pass
            """
        )
    )
    pythonpath = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 error" in output and "skipped" not in output, output
    assert "/nonexistent/fuse does not exist" in output, output
    assert fusefs.DEV_FUSE == "/dev/fuse"  # the outer session was not affected
