"""The seeded fault campaign (tests/campaign) on a short, fixed set of seeds.

Each seed plays about 25 s of writers and faults against the real service,
Azurite and FUSE mount, drains, stops, and checks that every finished
version of every file is in Blob Storage or still on NFS (the exact rule is
in tests/campaign/check.py). A failure message carries the seed's summary
table and every violation; replay one with
``.venv/bin/python -m tests.campaign --seed N --keep``.

The seeds were chosen so that, between them, they play every writer kind and
every fault kind (3: kill_child, kill_tree, sigterm, freeze, eio, blackhole,
two replicas; 4: staging_full, refuse, sigterm, two replicas on small tmpfs
staging, two session switches; 9: refuse, blackhole, kill_tree, kill_child,
freeze, one replica, small staging), and each has two writers that keep
appending through an open descriptor after the claim. With fix 1 of issue 12
missing, every run of the three caught it, through different seeds (timing
decides which): run 1, seed 3 (blob held the first 35,006,644 of 35,225,911
bytes written while linked); run 2, seed 9 (35,447,851 of 35,606,570) and
seed 4, a slow writer (162,663 of 168,651). About 35 s per seed here, under
2 minutes for the three.
"""

from __future__ import annotations

import pytest

from tests.campaign.runner import run_seed

CI_SEEDS = (3, 4, 9)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_campaign_seed_loses_nothing(seed: int) -> None:
    result = run_seed(seed)
    assert sum(result.faults.values()) > 0 and result.versions > 0, (
        "a seed that injected nothing or wrote nothing proves nothing"
    )
    assert result.ok, f"campaign seed {seed} found violations:\n{result.table()}"
