"""Build script: the package itself is pure Python; csrc/ holds the optional C++/CUDA extension.

The extension is built here with torch's cpp_extension when torch is importable at build time
(`pip install --no-build-isolation -e .`); without it the package installs and runs on the
pure-torch paths.
"""
from setuptools import setup

setup()
