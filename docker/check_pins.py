"""Exits non-zero, naming each one, when an installed distribution does not satisfy a pin.

Run by docker/Dockerfile after the last install: a later ``pip install`` may silently
replace an earlier pin (a CUDA vLLM wheel brings its own torch), and a build that fails here
costs minutes, a job that fails at its first vLLM start or TE import costs a queue wait.

    python docker/check_pins.py "torch==2.13.0" "vllm==0.32.0" ...
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement


def displaced(pins: list[str]) -> list[str]:
    """One line per pin the environment does not satisfy."""
    problems = []
    for pin in pins:
        requirement = Requirement(pin)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{pin}: not installed")
            continue
        # prereleases=True: a pin such as transformer-engine>=2.9.0a0 admits them anyway, and
        # a local build (2.13.0+cu130) must count as its release.
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{pin}: installed {installed}")
    return problems


def main(argv: list[str] | None = None) -> int:
    problems = displaced(sys.argv[1:] if argv is None else argv)
    for problem in problems:
        print(f"pin displaced: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
