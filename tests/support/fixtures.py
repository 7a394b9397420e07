"""`alias`: a module's own name for a shared fixture of the conftest files.

    pipeline = alias("pipeline", "lora_pipeline")     # in a test module: tests ask for `pipeline`

The alias is module-scoped so that module-scoped fixtures of the module may ask for it; its targets
are session-scoped builds.
"""
import pytest


def alias(name: str, target: str):
    @pytest.fixture(name=name, scope="module")
    def _alias(request):
        return request.getfixturevalue(target)
    return _alias
