"""Lets `pytest bench --benchmark-only` collect the bench_*.py suites (the project's
python_files pattern only matches test_*.py). Files named on the command line are collected
by pytest itself, so they are left alone here to avoid collecting them twice."""
import os

import pytest

from oes_fast.allocator import keep_freed_memory

# OES_BENCH_KEEP_FREED_MEMORY=1: the whole run with glibc keeping freed memory (what the oes-fast
# command does), for every benchmark alike (bench_search_step.py names it in its groups)
KEEP_FREED_MEMORY = os.environ.get("OES_BENCH_KEEP_FREED_MEMORY") == "1" and keep_freed_memory()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["oes_keep_freed_memory"] = bool(KEEP_FREED_MEMORY)  # read by bench/report.py


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
