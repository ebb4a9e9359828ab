"""Run the test suite; a suite that collects no tests is a failure, said plainly.

With pytest-xdist and two or more cores the suite runs in three phases, each on
``TUNELAB_TEST_WORKERS`` workers (default: the cores, at most 2) but the last: the tests
on tiny models (one thread each); the ``slow`` end-to-end tests on the real model (each
sees the other as load and takes one thread, which on 2 cores runs about as fast as two);
then the ``serial`` ones alone (they time things or load the machine), so that they
measure an otherwise quiet machine. ``-n`` given, ``-p no:xdist`` or
``TUNELAB_TEST_WORKERS=1`` runs everything in one plain pytest.
"""

import os
import sys

import pytest


def marker_expression(args: list[str]) -> tuple[str | None, list[str]]:
    """The ``-m`` expression among pytest's arguments, and the arguments without it."""
    rest, expression, items = [], None, iter(args)
    for arg in items:
        if arg == "-m":
            expression = next(items, "")
        elif arg.startswith("-m") and len(arg) > 2:
            expression = arg[2:]
        else:
            rest.append(arg)
    return expression, rest


def workers(args: list[str]) -> int:
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in args) or "no:xdist" in args:
        return 1
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 1
    wanted = os.environ.get("TUNELAB_TEST_WORKERS")
    if wanted:
        return max(1, int(wanted))
    return min(2, len(os.sched_getaffinity(0)))


def phases(args: list[str], n: int) -> list[list[str]]:
    if n < 2:
        return [args]
    expression, rest = marker_expression(args)
    scope = f"({expression}) and " if expression else ""
    parallel = [*rest, "-n", str(n), "--dist", "loadfile", "-m"]
    return [[*parallel, f"{scope}not slow and not serial"],
            [*parallel, f"{scope}slow and not serial"],
            [*rest, "-p", "no:xdist", "-m", f"{scope}serial"]]


def main(args: list[str]) -> int:
    codes = []
    for phase in phases(args, workers(args)):
        codes.append(pytest.main(phase))
    failed = [c for c in codes if c not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)]
    if failed:
        return int(failed[0])
    if all(code == pytest.ExitCode.NO_TESTS_COLLECTED for code in codes):
        print("error: no tests were collected; the suite would pass without testing anything", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
