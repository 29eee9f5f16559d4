"""The seeded fault campaign (issue 12): the property itself as the test.

"Every byte that reaches incoming ends up in Blob Storage or stays on NFS."

A seed fixes a schedule (schedule.py) of writers (whole files, slow writers
with pauses on both sides of the stability window, appends through an open
descriptor after the claim, the same name written again) and faults (kill -9
of a child or of the whole tree, SIGTERM mid-upload, NFS frozen, EIO on
reads, the blob endpoint refusing or blackholing through a proxy, staging
full). The runner (runner.py) plays it against the real service, real
Azurite and a real FUSE mount (rig.py), lets it drain, stops it, and checks
the invariant (check.py, whose docstring states the exact rule).

Run::

    .venv/bin/python -m tests.campaign --seed 7
    .venv/bin/python -m tests.campaign --seeds 1,2,3
    .venv/bin/python -m tests.campaign --minutes 30     # soak: seeds 1, 2, ... until time is up

Exit code 1 if any seed found a violation; the seed replays its schedule.
"""
