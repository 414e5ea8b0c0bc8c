"""Lets `pytest bench --benchmark-only` collect the bench_*.py suites (the project's
python_files pattern only matches test_*.py). Files named on the command line are collected
by pytest itself, so they are left alone here to avoid collecting them twice."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
