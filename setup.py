"""The one thing pyproject.toml cannot say in stable terms: vbp's C extension, page
checksums of whole ranges (vbp/pagesums.py says why). It needs gcc, the Python headers
and Debian's libxxhash-dev (the Makefile installs them)."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("vbp._pagesums", ["vbp/_pagesums.c"], libraries=["xxhash"],
              extra_compile_args=["-O2", "-Wall", "-Werror"]),
])
