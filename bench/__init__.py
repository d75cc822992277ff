"""Benchmarks: one ``bench_<op>.py`` per op plus ``bench_e2e.py``, each exposing ``run(quick) -> list[Row]``.

Run them with ``nvlm bench [--op NAME] [--quick] [--out DIR]`` / ``python -m bench.run`` (JSON, CSV, PNG, markdown)
or ``pytest bench/ --benchmark-json FILE``. The shared harness is ``bench/harness.py``; shapes are in
``bench/shapes.py``.
"""
