"""The compiled parts; everything else is in pyproject.toml.

* engine/_glue.pyx (Cython): the guest-call and host-function glue of engine/wasm.py.
* the request-path modules listed in wasmgate/compiled.py, compiled from their .py
  files by mypyc.

Both are optional: without a C compiler (or with WASMGATE_PURE_PYTHON=1) the install
goes on and wasmgate runs the same code as plain Python.
"""

import os
import runpy
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def mypyc_extensions() -> list[Extension]:
    if os.environ.get("WASMGATE_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    modules = runpy.run_path("src/wasmgate/compiled.py")["MODULES"]
    paths = ["src/" + m.replace(".", "/") + ".py" for m in modules]
    # Third-party packages are not installed in the isolated build environment, so their
    # types are Any here: what --strict says about Any (and the ignores written for the
    # real types) does not apply. Modules outside the compiled set are only read for types
    # (their errors are mypy's job in `make lint`, with the packages installed). A fresh
    # cache: one left by `make lint` would carry types the build cannot see.
    flags = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-ignores",
             "--no-warn-return-any", "--allow-subclassing-any", "--allow-untyped-decorators",
             "--allow-untyped-calls", "--cache-dir=build/mypyc-cache"]
    try:
        compiled = mypycify([*paths, *flags], opt_level="3")
    except BaseException as e:  # mypycify exits on a type error: say so, build plain Python
        print(f"wasmgate: mypyc compilation skipped ({e!r}); those modules run as Python", file=sys.stderr)
        return []
    for ext in compiled:
        ext.optional = True
    return compiled


class BuildExt(build_ext):
    def finalize_options(self) -> None:
        # Here, not at import: setup.py also runs just for metadata.
        self.distribution.ext_modules = [*(self.distribution.ext_modules or []), *mypyc_extensions()]
        super().finalize_options()


setup(ext_modules=[Extension("wasmgate.engine._glue", ["src/wasmgate/engine/_glue.pyx"], optional=True)],
      cmdclass={"build_ext": BuildExt})
