"""Summarise a py-spy collapsed-stack file (bench/e2e.py --profile): the share of samples under each frame
that matches a pattern, and the top frames by own and total time.

    python -m bench.profile_summary FILE [--top 40] [--match api/,sqlalchemy]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, n = line.rpartition(" ")
        if frames and n.isdigit():
            stacks.append((frames.split(";"), int(n)))
    return stacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--match", default="",
                    help="comma-separated substrings: share of samples with a frame matching each")
    ap.add_argument("--idle", default="select (selectors.py,_worker (concurrent/futures,get (queue.py,"
                    "wait (threading.py,_work (api/db.py",
                    help="leaf frames that are waiting, not working (left out of the busy total)")
    args = ap.parse_args()
    idle = [x for x in args.idle.split(",") if x]
    stacks = [(f, n) for f, n in load(args.file) if not any(i in f[-1] for i in idle)]
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    print(f"busy samples: {total}")
    for m in [x for x in args.match.split(",") if x]:
        hit = sum(n for f, n in stacks if any(m in fr for fr in f))
        print(f"  {hit / total:6.1%}  under a frame matching {m!r}")
    print("top by total:")
    for fr, n in incl.most_common(args.top):
        print(f"  {n / total:6.1%}  {fr}")
    print("top by own:")
    for fr, n in own.most_common(args.top):
        print(f"  {n / total:6.1%}  {fr}")


if __name__ == "__main__":
    main()
