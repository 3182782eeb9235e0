"""Shared test helpers: the path to ../shared and hypothesis settings for the whole suite."""
import os
import pathlib

import pytest
import torch
from hypothesis import Phase, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# The suite's tensors are tiny: a second torch thread costs more than it saves, and on a shared
# 2-core machine two threads per process oversubscribe the cores (measured up to 40x slower).
torch.set_num_threads(1)

# Small example counts and no deadline: the suite runs on 2 shared CPU cores.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
# bench/mutants.py: a failing example is enough, shrinking it would only cost time.
settings.register_profile("mutants", parent=settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def shared_path(*parts: str) -> pathlib.Path:
    """Path inside ../shared, skipping the calling test with a reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the ../shared fixtures are not checked out beside the repo")
    return path
