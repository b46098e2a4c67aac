"""Docstring style (Google convention), the ament way (ament_pep257 comes from the dev extras)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.linter
def test_pep257():
    ament_pep257 = pytest.importorskip("ament_pep257.main")
    # Google convention; short docstrings without Args sections are allowed on small helpers.
    rc = ament_pep257.main(argv=["--convention", "google", "--add-ignore", "D100", "D101", "D102", "D103",
                                 "D104", "D105", "D107", "D403", "D417", "--",
                                 str(ROOT / "dgss_perception"), str(ROOT / "training"), str(ROOT / "launch")])
    assert rc == 0, "docstring problems (see output above)"
