"""pytest-benchmark glue: ``pytest bench/ --benchmark-json out.json`` runs every ``bench/bench_<op>.py``.

Each bench module exposes ``run(quick) -> list[Row]`` (see bench/harness.py) and needs no test functions of its own:
this conftest collects ``bench_*.py`` files and gives each module one test, ``test_run``, which calls ``run`` once
under the ``benchmark`` fixture (``pedantic``, one round: the module's own :func:`bench.harness.measure` does the
repetitions) and stores the rows, machine info and measured limits in ``benchmark.extra_info`` so they land in the
``--benchmark-json`` file. ``--bench-full`` (or ``NVLM_BENCH_FULL=1``) runs the full shape set instead of quick.
"""

import os

import pytest

from bench.harness import machine_info, machine_limits


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="nvlm bench: run the full shape set (default: the --quick set)")


class _BenchModule(pytest.Module):
    """A bench_<op>.py module; a ``test_run`` is added when the module defines ``run`` and no tests itself."""

    def collect(self):
        mod = self.obj
        if callable(getattr(mod, "run", None)) and not any(n.startswith("test_") for n in vars(mod)):
            mod.test_run = _make_test(mod)
        return super().collect()


def _make_test(mod):
    def test_run(benchmark, request):
        quick = not (request.config.getoption("--bench-full") or os.environ.get("NVLM_BENCH_FULL") == "1")
        rows = benchmark.pedantic(mod.run, args=(quick,), rounds=1, iterations=1)
        rows = list(rows)
        benchmark.extra_info["rows"] = [r.to_dict() for r in rows]
        benchmark.extra_info["machine"] = machine_info()
        benchmark.extra_info["limits"] = machine_limits("cpu")
        assert rows, f"{mod.__name__}.run({quick}) returned no rows"

    test_run.__doc__ = f"Run {mod.__name__}.run(quick) and record its rows."
    return test_run


def _is_bench(file_path) -> bool:
    return file_path.suffix == ".py" and file_path.name.startswith("bench_")


def pytest_collect_file(file_path, parent):
    # bench_*.py do not match pytest's test_*.py pattern, so a directory run (``pytest bench/``) needs this hook;
    # a file named on the command line is collected by pytest itself (through pytest_pycollect_makemodule below)
    if _is_bench(file_path) and not parent.session.isinitpath(file_path):
        return _BenchModule.from_parent(parent, path=file_path)
    return None


def pytest_pycollect_makemodule(module_path, parent):
    if _is_bench(module_path):
        return _BenchModule.from_parent(parent, path=module_path)
    return None
