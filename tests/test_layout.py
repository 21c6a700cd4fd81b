"""The import direction the kit keeps: commands (`echovideo/`) use the library; the library
(`lightning_modules/`, `datamodules/`, `callbacks/`) never imports the command line."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("lightning_modules", "datamodules", "callbacks")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_command_line():
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                            if name == "echovideo" or name.startswith("echovideo."))
        for package in LIBRARY for path in sorted((ROOT / package).glob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_test_helpers_never_go_through_a_package_named_tests():
    """torch-fidelity installs a top-level `tests` package; a `tests.x` import or class_path
    would find that one. The suite names its helpers by module (`cpu_deepspeed`, ...), found
    in this folder, which pytest puts first on the path."""
    import cpu_deepspeed

    assert Path(cpu_deepspeed.__file__).parent == ROOT / "tests"
    offenders = []
    scanned = [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]
    for path in scanned + sorted((ROOT / "experiments").rglob("*.yaml")):
        if path.suffix == ".py":
            names = imported_modules(path)
            offenders += [f"{path.name}: import {n}" for n in names if n == "tests" or n.startswith("tests.")]
        offenders += [f"{path.name}: {line.strip()}" for line in path.read_text().splitlines()
                      if "class_path: tests." in line or '"tests.' in line]
    assert offenders == []
