"""Build the Cython extensions of spina_fast.

Set SPINA_CYTHON_TRACE=1 to compile with line tracing and write annotated HTML (profiling builds).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

CYTHON_REQUIRED = "3.0"

try:
    from Cython import __version__ as cython_version
    from Cython.Build import cythonize
except ImportError:
    sys.exit(
        f"spina_fast needs Cython >= {CYTHON_REQUIRED} to build its extensions "
        f"(pip install 'Cython>={CYTHON_REQUIRED}'), and a C compiler (apt-get install gcc)."
    )

if int(cython_version.split(".")[0]) < 3:
    sys.exit(f"spina_fast needs Cython >= {CYTHON_REQUIRED}, found {cython_version}.")

trace = os.environ.get("SPINA_CYTHON_TRACE") == "1"
macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
compile_args = ["-O2"]

extensions = [
    Extension(f"spina_fast.{name}", [f"spina_fast/{name}.pyx"], define_macros=macros,
              extra_compile_args=compile_args)
    for name in ("_dns", "_events", "_http", "_kafka_native", "_kv", "_raft", "_registry")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "linetrace": trace, "embedsignature": True},
        annotate=trace,
    ),
)
