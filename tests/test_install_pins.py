"""The pip pins (requirements.txt), the conda environment and the Makefile agree."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?(===|==)(\S+)", line)
            assert match, f"not an exact pin: {line!r}"
            pins[match.group(1).lower()] = match.group(3) + match.group(4)
    return pins


def test_conda_environment_pins_equal_requirements():
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == requirements


def test_torch_and_torchvision_are_pinned_together_to_the_regular_builds():
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    # `===` is exact string equality: the local "+cpu" wheel never satisfies it.
    assert requirements["torch"] == "===2.13.0"
    assert requirements["torchvision"] == "==0.28.0"


@pytest.mark.parametrize("package", ["deepspeed", "facexlib"])
def test_packages_installed_apart_have_the_same_pin_in_makefile_and_environment(package):
    makefile = (ROOT / "Makefile").read_text()
    environment = (ROOT / "environment.yml").read_text()
    pins = set(re.findall(rf"{package}==(\S+)", makefile)) | set(re.findall(rf"{package}==(\S+)", environment))
    assert len(pins) == 1, pins
