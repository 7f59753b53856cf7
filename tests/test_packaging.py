"""Packaging: pyproject.toml's metadata builds without deprecation noise, and every place
that installs setuptools asks for the version pyproject.toml's metadata needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = re.compile(r'"setuptools>=([0-9.]+)"')


def setuptools_minimum(path: Path) -> str:
    found = SETUPTOOLS.findall(path.read_text())
    assert len(found) == 1, f"{path.name}: expected one \"setuptools>=...\", found {found}"
    return found[0]


def run_setup_py(code: str = "pass") -> subprocess.CompletedProcess:
    """``python setup.py --version`` in a fresh process, after ``code``."""
    script = f"import runpy, sys; {code}; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_license_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"  # PEP 639; a {text = ...} table is deprecated


def test_ci_installs_the_setuptools_that_pyproject_requires():
    """CI builds with --no-build-isolation, so build-system.requires is not installed for
    it: .ci/run must ask for the same minimum."""
    assert setuptools_minimum(ROOT / ".ci" / "run") == setuptools_minimum(ROOT / "pyproject.toml")


def test_reading_the_metadata_prints_no_deprecation_warning():
    result = run_setup_py()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.1.0"
    assert "deprecat" not in (result.stdout + result.stderr).lower(), result.stderr


def test_an_older_setuptools_is_refused_naming_the_version_to_install():
    minimum = setuptools_minimum(ROOT / "pyproject.toml")
    result = run_setup_py("import setuptools; setuptools.__version__ = '65.5.0'")
    assert result.returncode != 0
    assert f'needs setuptools>={minimum} to build (pyproject.toml), found 65.5.0' in result.stderr
    assert f'pip install "setuptools>={minimum}"' in result.stderr
