"""Every docstring example in the package runs and prints what it says (doctest)."""

from __future__ import annotations

import doctest
import importlib
import logging
import pkgutil
import warnings

import pytest

import gradwatch

MODULES = sorted(info.name for info in pkgutil.walk_packages(gradwatch.__path__, "gradwatch."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name: str) -> None:
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # examples that trigger a finding warn on purpose
        logging.disable(logging.CRITICAL)
        try:
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
        finally:
            logging.disable(logging.NOTSET)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail"
