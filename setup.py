"""Install galaxalign_dist: the package metadata lives in pyproject.toml; see the Makefile for the install order."""

from setuptools import setup

setup()
