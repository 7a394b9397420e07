"""`alias`: a module's own name for a shared fixture of the conftest files.

    pipeline = alias("pipeline", "lora_pipeline")     # in a test module: tests ask for `pipeline`
"""
import pytest


def alias(name: str, target: str):
    @pytest.fixture(name=name)
    def _alias(request):
        return request.getfixturevalue(target)
    return _alias
