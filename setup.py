"""Build metadata lives in pyproject.toml; this file lets older pip versions install the checkout editable."""

from setuptools import setup

setup()
