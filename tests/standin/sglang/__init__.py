"""STAND-IN for SGLang, for sagecheck's tests only.

SGLang cannot be installed on the test machines (it pins its own torch and needs CUDA
kernels). This package answers ``python -m sglang.launch_server`` with the same command
line and serves the same HTTP endpoints and response shapes from the built-in model, so
that sagecheck's SGLang engine (lifecycle, client, notebooks) is tested for real. It is
put on PYTHONPATH by the tests and nowhere else.
"""

__version__ = "0.0.0-standin"
