"""Code style, the ament way (ament_flake8 comes from the dev extras)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.linter
def test_flake8():
    ament_flake8 = pytest.importorskip("ament_flake8.main")
    paths = [str(ROOT / d) for d in ("dgss_perception", "training", "launch", "test")]
    errors = ament_flake8.main_with_errors(argv=["--config", str(ROOT / ".flake8"), *paths])
    assert errors[0] == 0, f"flake8 found {errors[0]} problem(s):\n" + "\n".join(errors[1])
