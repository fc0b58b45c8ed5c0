"""One pin set for every install: constraints.txt (README 'Tests and CI').

A fresh machine must resolve exactly the versions the suite last passed with, so every dependency the
job and its tests declare is pinned, every install path reads the pins, and the pins agree with the
ranges in pyproject.toml and with the versions .ci/lint names. The drift check (.ci/drift) installs the
newest allowed versions on purpose, so the check of the running environment steps aside there.
"""

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
UNPINNED_BY_DESIGN = {"torch"}  # pinned in the commands themselves: a CPU build here, a CUDA build in the image


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        found = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert found, f"{path.name} line {number} is not NAME==VERSION: {line!r}"
        name = canonicalize_name(found[1])
        assert name not in pins, f"{path.name} pins {name} twice"
        pins[name] = found[2]
    return pins


PINS = read_pins(ROOT / "constraints.txt")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DECLARED = [Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]]


def test_every_declared_dependency_is_pinned_within_its_range():
    for req in DECLARED:
        name = canonicalize_name(req.name)
        if name in UNPINNED_BY_DESIGN:
            assert name not in PINS
            continue
        assert name in PINS, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(PINS[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={PINS[name]}, outside pyproject.toml's {req}"


def test_checkov_has_its_own_pins():
    pins = read_pins(ROOT / "constraints-checkov.txt")
    lint = (ROOT / ".ci" / "lint").read_text()
    checkov = re.search(r"^CHECKOV=checkov==(\S+)", lint, re.M)[1]
    assert pins["checkov"] == checkov


def test_lint_tools_pins_agree_with_constraints():
    lint = (ROOT / ".ci" / "lint").read_text()
    named = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\")]*)", lint.split("LINT_PACKAGES=(")[0] +
                            lint.split("LINT_PACKAGES=(")[1].split(")")[0]))
    for name, version in named.items():
        if canonicalize_name(name) == "checkov":
            continue
        assert PINS.get(canonicalize_name(name)) == version, \
            f".ci/lint installs {name}=={version} but constraints.txt pins {PINS.get(canonicalize_name(name))}"


def test_every_install_path_reads_the_pins():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "pip install" in line and ".[" in line and "&&" in line]
    assert len(commands) >= 2, "the README's two set-up commands are gone"
    for command in commands:
        assert "-c constraints.txt" in command, f"README command installs without the pins: {command}"
    run = (ROOT / ".ci" / "run").read_text()
    assert "--constraint constraints.txt" in run and '"${pins[@]}" -e ".[test]"' in run
    assert "constraints.txt" in (ROOT / ".ci" / "lint").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY constraints.txt ./" in dockerfile and "--constraint constraints.txt" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text()


@pytest.mark.skipif(os.environ.get("QLORA_UNPINNED") == "1", reason="the drift check installs the newest versions")
def test_tests_run_with_the_pinned_versions():
    wrong = []
    for name, pinned in PINS.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for another install path (the image's gpu extra, the linters' virtualenv)
        if installed != pinned:
            wrong.append(f"{name} {installed} (pinned {pinned})")
    assert not wrong, ("this environment differs from constraints.txt: " + ", ".join(wrong) +
                       "; reinstall with -c constraints.txt (README command 2), or refresh the pins (.ci/drift)")
