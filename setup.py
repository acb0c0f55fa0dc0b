"""Package list for setuptools: every package under seqtopk/ (found, never listed by hand), data folders
included (kernel sources, lm-eval tasks, the demo model: listed as packages so setuptools ships their files
without warnings), plus the top-level patches/ folder installed as seqtopk.patches. Everything else is in
pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["seqtopk", "seqtopk.*"], exclude=["*.__pycache__"])
      + ["seqtopk.patches"])
