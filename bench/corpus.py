"""The corpus: random files written once, handed to each contender as hard links.

A hard link per run gives every contender the very same bytes (hot in the
page cache for all alike) without copying a gigabyte per round: ``rclone
move`` and ingestd delete or rename the link, the master stays. Masters get
an mtime a day old, so ingestd's minimum-age rule is already met when a link
is renamed into incoming; only its two-poll stability check remains.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

OLD_S = 24 * 3600
CHUNK = 4 * 1024 * 1024


@dataclass
class Corpus:
    folder: Path
    sizes: dict[str, int] = field(default_factory=dict)  # master name -> size
    md5s: dict[str, str] = field(default_factory=dict)  # master name -> hex md5

    @classmethod
    def make(cls, folder: Path, count: int, size: int, prefix: str = "f") -> Corpus:
        folder.mkdir(parents=True, exist_ok=True)
        corpus = cls(folder)
        old = time.time() - OLD_S
        width = max(3, len(str(count - 1)))
        for index in range(count):
            name = f"{prefix}{index:0{width}d}.bin"
            digest = hashlib.md5()
            with open(folder / name, "wb") as stream:
                left = size
                while left > 0:
                    block = os.urandom(min(CHUNK, left))
                    digest.update(block)
                    stream.write(block)
                    left -= len(block)
            os.utime(folder / name, (old, old))
            corpus.sizes[name] = size
            corpus.md5s[name] = digest.hexdigest()
        return corpus

    @property
    def names(self) -> list[str]:
        return list(self.sizes)

    @staticmethod
    def run_name(round_: int, master: str) -> str:
        return f"r{round_}-{master}"

    @staticmethod
    def master_of(name: str) -> str:
        return name.split("-", 1)[1]

    def names_for(self, round_: int) -> list[str]:
        return [self.run_name(round_, m) for m in self.names]

    def total(self, names: list[str]) -> int:
        return sum(self.sizes[self.master_of(n)] for n in names)

    def md5_of(self, name: str) -> str:
        return self.md5s[self.master_of(name)]

    def link_into(self, folder: Path, names: list[str]) -> list[Path]:
        """Hard-link each master to ``folder/<name>`` (same filesystem)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in names:
            path = folder / name
            path.unlink(missing_ok=True)
            os.link(self.folder / self.master_of(name), path)
            paths.append(path)
        return paths
