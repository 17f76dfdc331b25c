"""Every docstring example in the core and the analyses runs and prints what it says."""
import doctest
import importlib

import numpy as np
import pytest
import torch

from lensdyn import citations, fits, metric, models, ops, plots, resampling, results, spectra, sphere, verdicts
from lensdyn.analyses import idealized
from lensdyn.analyses.registry import analyses

MODULES = [ops, fits, metric, verdicts, resampling, sphere, spectra, idealized, results, citations, plots, models]
MODULES += [importlib.import_module(analysis.measure.__module__) for analysis in analyses()]  # every analysis
MODULES += [importlib.import_module(f"lensdyn.hooks.{name}")
            for name in ("capture", "external", "patching", "jacobian", "steering", "heads")]
MODULES += [importlib.import_module(name) for name in ("lensdyn.streaming", "lensdyn.progress", "lensdyn.app.parsing",
                                                            "lensdyn.app.corpus", "lensdyn.app.run", "lensdyn.app.study",
                                                            "lensdyn.app.report")]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    failures, attempted = doctest.testmod(module, extraglobs={"torch": torch, "np": np}, optionflags=doctest.ELLIPSIS)
    assert attempted > 0
    assert failures == 0
