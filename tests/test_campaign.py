"""The seeded fault campaign (tests/campaign) on a short, fixed set of seeds.

Each seed plays about 25 s of writers and faults against the real service,
Azurite and FUSE mount, drains, stops, and checks that every finished
version of every file is in Blob Storage or still on NFS (the exact rule is
in tests/campaign/check.py). A failure message carries the seed's summary
table and every violation; replay one with
``.venv/bin/python -m tests.campaign --seed N --keep``.

The seeds were chosen so that, between them, they play every writer kind and
every fault kind, and each has writers that append through an open
descriptor after the claim: with fix 1 of issue 12 missing, seed 1 reports
those appended bytes as lost.
"""

from __future__ import annotations

import pytest

from tests.campaign.runner import run_seed

CI_SEEDS = (3, 4, 9)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_campaign_seed_loses_nothing(seed: int) -> None:
    result = run_seed(seed)
    assert sum(result.faults.values()) > 0 and result.versions > 0, \
        "a seed that injected nothing or wrote nothing proves nothing"
    assert result.ok, f"campaign seed {seed} found violations:\n{result.table()}"
