"""Print the installed packages whose versions differ from requirements/lock.txt (the canary's first line).

    .venv-latest/bin/python scripts/lock_diff.py requirements/lock.txt
"""
from __future__ import annotations

import importlib.metadata
import re
import sys


def canonical(name: str) -> str:
    """PEP 503 names: ``Jinja2`` and ``jinja2``, ``huggingface_hub`` and ``huggingface-hub`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path, encoding="utf-8"):
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def main(path: str) -> int:
    pins = locked(path)
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    changed = [f"  {name}: {pins[name]} -> {version}" for name, version in sorted(installed.items())
               if name in pins and pins[name] != version]
    print("\n".join(changed) if changed else "  none: the newest releases are the locked ones")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
