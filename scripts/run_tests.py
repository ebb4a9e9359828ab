"""Run pytest; a suite that collects no tests is a failure, said plainly."""

import sys

import pytest

code = pytest.main(sys.argv[1:])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("error: no tests were collected; the suite would pass without testing anything", file=sys.stderr)
    code = 1
sys.exit(int(code))
