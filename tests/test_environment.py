"""The two descriptions of the environment (pyproject.toml for pip, environment.yml
for conda) must list the same requirements, so that neither drifts."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalize(requirement: str) -> str:
    return requirement.replace(" ", "").lower()


def pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {_normalize(r) for r in project["dependencies"] + extras["book"] + extras["test"]}


def environment_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip: section"
    return {_normalize(r) for r in pip_sections[0]}


def test_environment_yml_matches_pyproject():
    in_pyproject, in_environment = pyproject_requirements(), environment_requirements()
    assert in_pyproject == in_environment, (
        f"only in pyproject.toml: {sorted(in_pyproject - in_environment)}; "
        f"only in environment.yml: {sorted(in_environment - in_pyproject)}"
    )


def test_environment_yml_python_matches_requires_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    version = tuple(int(p) for p in python.split("=")[1].split("."))
    minimum = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert version >= tuple(int(p) for p in minimum.lstrip(">=").split("."))
