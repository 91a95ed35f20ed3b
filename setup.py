"""Build script: the Python package, plus the optional native extension (see csrc/)."""

from setuptools import setup

setup()
