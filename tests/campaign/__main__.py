"""Command line of the campaign: ``python -m tests.campaign --seed 7`` (see the package doc)."""

from __future__ import annotations

import argparse
import sys
import time

from tests.campaign.runner import Result, run_seed


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.campaign", description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run one seed")
    which.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    which.add_argument(
        "--minutes",
        type=float,
        help="soak: run seeds --first, --first+1, ... until this much time is up",
    )
    parser.add_argument("--first", type=int, default=1, help="first seed of a soak (default 1)")
    parser.add_argument(
        "--duration",
        type=float,
        default=25.0,
        help="seconds of schedule per seed (default 25; the drain comes on top)",
    )
    parser.add_argument("--writers", type=int, default=30, help="writers per seed (default 30)")
    parser.add_argument(
        "--append-writers",
        type=int,
        default=2,
        help="writers that append after the claim (fix 1's case; default 2)",
    )
    parser.add_argument(
        "--big", action="store_true", help="some files of 100-300 MiB (the soak's default)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder of every seed")
    return parser.parse_args(argv)


def seeds_of(args: argparse.Namespace):
    if args.seed is not None:
        yield args.seed
    elif args.seeds:
        yield from (int(s) for s in args.seeds.split(","))
    elif args.minutes:
        deadline = time.monotonic() + args.minutes * 60
        seed = args.first
        while time.monotonic() < deadline:
            yield seed
            seed += 1
    else:
        yield 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    big = args.big or bool(args.minutes)
    results: list[Result] = []
    for seed in seeds_of(args):
        results.append(
            run_seed(seed, args.duration, args.writers, big, args.append_writers, keep=args.keep)
        )
    failed = [r.seed for r in results if not r.ok]
    faults = sum(sum(r.faults.values()) for r in results)
    print(
        f"=== {len(results)} seed(s), {faults} faults, "
        f"{sum(r.versions for r in results)} versions of {sum(r.files for r in results)} "
        f"files, {sum(r.late for r in results)} late writes; "
        f"seeds with violations: {failed or 'none'} ==="
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
