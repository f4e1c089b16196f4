import pytest


def pytest_collection_modifyitems(config, items):
    cuda_items = [i for i in items if "cuda" in i.keywords]
    if not cuda_items:
        return
    from runtime.driver import available
    ok, why = available()
    if not ok:
        skip = pytest.mark.skip(reason=f"no CUDA GPU: {why}")
        for item in cuda_items:
            item.add_marker(skip)
