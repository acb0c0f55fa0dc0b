"""Package list for setuptools: every package under seqtopk/ (found, never listed by hand), plus the
top-level patches/ folder installed as seqtopk.patches. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["seqtopk", "seqtopk.*"]) + ["seqtopk.patches"])
