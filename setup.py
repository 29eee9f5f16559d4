"""Only the optional C accelerator lives here; everything else is in pyproject.toml.

``optional=True``: where no compiler is available the package still installs,
and ingestd/md5pair.py falls back to hashlib (same digests, more CPU).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ingestd._md5pair", ["ingestd/_md5pair.c"], extra_compile_args=["-O2"], optional=True
        )
    ]
)
