"""The compiled glue of engine/wasm.py; everything else is in pyproject.toml.

Optional: without a C compiler the install goes on and wasmgate uses its ctypes path.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wasmgate.engine._glue", ["src/wasmgate/engine/_glue.pyx"], optional=True)])
