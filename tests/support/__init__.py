"""Builders shared by the tests: tiny pipelines, pictures, recipes, random U-Nets, single files.

Plain functions, no fixtures (those live in the conftest.py files). tests/ is on sys.path
(pyproject's pytest `pythonpath`), so a test imports them as `from support.pictures import ...`.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]      # the checkout: configs/, assets/, pyproject.toml
