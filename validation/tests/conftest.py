"""validation/ CPU tests: the repo root on sys.path, and Triton kernels under the interpreter
(TRITON_INTERPRET=1, set before triton is imported) so they run on CPU tensors.
Run with the GPU-side venv:  .venv-gpu/bin/pytest validation/tests -q"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def pytest_configure(config):
    # triton 3.6's interpreter converts 1-element arrays to scalars (deprecated in numpy 1.25)
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim:DeprecationWarning")
