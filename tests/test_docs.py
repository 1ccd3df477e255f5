"""Every docstring example in the package runs, and every table and model file carries one."""

import doctest
import importlib
import pkgutil

import pytest

import embcompress
import embcompress.ctr_models
import embcompress.tables

# tables/ and ctr_models/ live outside embcompress/ (package_dir), so each package is walked on its own path.
MODULES = sorted(
    m.name
    for package in (embcompress, embcompress.tables, embcompress.ctr_models)
    for m in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    kind = name.split(".")[1]
    if kind in ("tables", "ctr_models") and not name.endswith((".__init__", ".layers")) and name.count(".") == 2:
        assert result.attempted > 0, f"{name} has no runnable example in its docstrings"


def test_readme_examples_run():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    result = doctest.testfile(str(readme), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
