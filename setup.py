"""The one compiled part: swapper/_pump.c (a stream's relay in a thread of its own, see relay.py).

Optional: where it cannot be built (no C compiler), swapper relays every stream in Python.
"""

import sys

from setuptools import Extension, setup

ext = [] if sys.platform != "linux" else [
    Extension("swapper._pump", ["swapper/_pump.c"], optional=True, extra_compile_args=["-O2"])]
setup(ext_modules=ext)
