"""The benchmark harness (bench/harness.py) and runner (bench/run.py), driven by a toy op (a torch copy).

No assertion here depends on how fast anything is: only on call counts, arithmetic and files written.
"""

import csv
import json
import math
import sys
import time
import types

import pytest
import torch

from bench import harness, run
from bench.harness import Row, Timing, copies_to_exceed_cache, make_row, measure


def test_measure_cycles_through_args_and_orders_quantiles():
    calls = []
    args_list = [(i,) for i in range(3)]
    t = measure(lambda i: calls.append(i), args_list=args_list, warmup=2, reps=7, min_time_s=0.0)
    assert calls[:2] == [0, 1]                       # warm-up uses the first argument sets
    assert calls[2:] == [i % 3 for i in range(len(calls) - 2)]  # timed calls restart the rotation
    assert t.n == len(calls) - 2 >= 7
    assert 0 <= t.p20_ms <= t.median_ms <= t.p80_ms


def test_measure_runs_until_min_time():
    n = []
    t = measure(lambda: (n.append(1), time.sleep(0.01)), reps=1, warmup=0, min_time_s=0.05)
    # each call sleeps >= 10 ms, so 0.05 s of timed calls is reached after at most 5 calls, and not before 1
    assert 1 <= t.n == len(n) <= 5
    assert t.median_ms >= 10.0


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="args_list"):
        measure(lambda: None, args_list=[])
    with pytest.raises(ValueError, match="reps"):
        measure(lambda: None, reps=0)


def test_timing_quantiles_are_exact():
    t = harness.timing_from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n) == (3.0, 1.8, 4.2, 5)


def test_copies_to_exceed_cache():
    assert copies_to_exceed_cache(30, cache_bytes=100) == 7       # 7 * 30 >= 2 * 100
    assert copies_to_exceed_cache(10**9, cache_bytes=100) == 1    # one copy already streams past the cache
    assert copies_to_exceed_cache(150, cache_bytes=100) == 2
    llc = harness.llc_bytes()
    assert llc >= 1 << 20
    assert copies_to_exceed_cache(llc // 4) == 8
    with pytest.raises(ValueError, match="bytes_per_copy"):
        copies_to_exceed_cache(0)


def test_parse_size():
    assert harness._parse_size("32768K") == 32 << 20
    assert harness._parse_size("300 MiB") == 300 << 20
    assert harness._parse_size("2G") == 2 << 30


def test_make_row_arithmetic(monkeypatch):
    monkeypatch.setitem(harness._LIMITS_CACHE, "cpu", {"dram_read_gbps": 20.0, "copy_gbps": 40.0,
                                                       "matmul_tflops": 0.5})
    t = Timing(median_ms=2.0, p20_ms=1.5, p80_ms=2.5)
    r = make_row("copy", (4, 8), torch.bfloat16, "cpu", t, bytes_moved=20e6, flops=1e9, limit="dram_read_gbps",
                 baselines={"eager": Timing(6.0, 5.0, 7.0), "slow": Timing(1.0, 1.0, 1.0)}, note="n")
    assert (r.shape, r.dtype, r.median_ms, r.p20_ms, r.p80_ms) == ("4x8", "bf16", 2.0, 1.5, 2.5)
    assert math.isclose(r.gbps, 10.0) and math.isclose(r.tflops, 0.5)
    assert math.isclose(r.pct_of_limit, 50.0) and r.limit_name == "dram_read_gbps" and r.limit_value == 20.0
    assert r.device == "cpu"
    assert r.speedup == {"eager": 3.0, "slow": 0.5}
    r2 = make_row("mm", "1x8192x29568", "int4", "cpu", t, flops=1e9, limit="matmul_tflops")
    assert math.isclose(r2.pct_of_limit, 100.0) and r2.gbps is None
    with pytest.raises(ValueError, match="limit"):
        make_row("x", "1", "fp32", "cpu", t, bytes_moved=1, limit="bogus")
    with pytest.raises(ValueError, match="bytes_moved"):
        make_row("x", "1", "fp32", "cpu", t, flops=1, limit="copy_gbps")


def test_remeasure_limits_keeps_the_best_measurement(monkeypatch):
    # a stored DRAM figure no machine reaches is kept; a stored copy figure no machine falls to is replaced
    monkeypatch.setitem(harness._LIMITS_CACHE, "cpu", {"dram_read_gbps": 1e12, "copy_gbps": 1e-9,
                                                       "matmul_tflops": 1e12})
    changed = harness.remeasure_limits("cpu")
    assert set(changed) == {"copy_gbps"} and changed["copy_gbps"][0] == 1e-9 < changed["copy_gbps"][1]
    now = harness.machine_limits("cpu")
    assert now["dram_read_gbps"] == 1e12 and now["matmul_tflops"] == 1e12 and now["copy_gbps"] > 1e-9


def test_rescale_to_best_limits():
    t = Timing(1.0, 1.0, 1.0)
    r1 = Row("a", "1", "fp32", "x", 1.0, 1.0, 1.0, gbps=10.0, pct_of_limit=50.0, limit_name="copy_gbps",
             limit_value=20.0, device="cpu")
    r2 = Row("a", "1", "fp32", "y", 1.0, 1.0, 1.0, gbps=10.0, pct_of_limit=25.0, limit_name="copy_gbps",
             limit_value=40.0, device="cpu")                    # measured in a subprocess at a quieter moment
    r3 = Row("b", "1", "fp32", "z", t.median_ms, 1.0, 1.0, gbps=1000.0, pct_of_limit=50.0, limit_name="copy_gbps",
             limit_value=2000.0, device="cuda:0")               # another device: not in limits, untouched
    limits = {"cpu": {"copy_gbps": 30.0}}
    harness.rescale_to_best_limits([r1, r2, r3], limits)
    assert limits["cpu"]["copy_gbps"] == 40.0
    assert (r1.pct_of_limit, r1.limit_value) == (25.0, 40.0) and (r2.pct_of_limit, r2.limit_value) == (25.0, 40.0)
    assert (r3.pct_of_limit, r3.limit_value) == (50.0, 2000.0)


def test_machine_info_has_the_fields_reports_need():
    info = harness.machine_info()
    for key in ("cpu_model", "cpu_flags", "cpu_cores", "gpu", "torch", "triton", "git_sha", "date_utc"):
        assert key in info
    assert info["torch"] == torch.__version__


def _toy_copy_module():
    """A bench module measuring torch copy against clone, rotating copies past the LLC (small ones: a test)."""
    mod = types.ModuleType("bench.bench_toy_copy")

    def run_(quick):
        n = 1 << 18                                          # 1 MiB fp32 per copy
        copies = min(copies_to_exceed_cache(4 * n), 4)       # capped: a unit test, not a measurement
        args = [(torch.empty(n), torch.randn(n)) for _ in range(copies)]
        ours = measure(lambda d, s: d.copy_(s), args_list=args, reps=5, min_time_s=0.0)
        base = measure(lambda d, s: s.clone(), args_list=args, reps=5, min_time_s=0.0)
        return [make_row("toy_copy", (n,), torch.float32, "torch", ours, bytes_moved=8 * n, limit="copy_gbps",
                         baselines={"clone": base}, note="toy")]

    mod.run = run_
    return mod


def test_run_main_writes_json_csv_png_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "OPS", ("toy_copy", "broken", "absent"))
    monkeypatch.setitem(sys.modules, "bench.bench_toy_copy", _toy_copy_module())
    broken = types.ModuleType("bench.bench_broken")
    broken.run = lambda quick: (_ for _ in ()).throw(RuntimeError("boom"))
    monkeypatch.setitem(sys.modules, "bench.bench_broken", broken)

    rc = run.main(["--quick", "--out", str(tmp_path)])
    assert rc == 1                                            # the broken module fails the run ...
    res = json.loads((tmp_path / "results.json").read_text())
    assert "boom" in res["errors"]["broken"]
    assert res["skipped"] == {"absent": "bench.bench_absent not present"}
    [row] = res["rows"]                                       # ... but the others are still written
    assert row["op"] == "toy_copy" and row["limit_name"] == "copy_gbps" and row["pct_of_limit"] > 0
    assert set(row["speedup"]) == {"clone"}
    lim = res["limits"]["cpu"]
    assert lim["dram_read_gbps"] > 0 and lim["copy_gbps"] > 0 and lim["matmul_tflops"] > 0
    assert res["machine"]["cpu_model"]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["op"] == "toy_copy" and "speedup_vs_clone" in rows[0]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| toy_copy | 262144 | fp32 | torch |" in out and "vs clone" in out


def test_run_main_rejects_unknown_op():
    with pytest.raises(SystemExit, match="--op"):
        run.main(["--op", "nonsense"])


def test_row_roundtrip():
    r = Row("op", "1", "fp32", "ref", 1.0, 1.0, 1.0)
    assert Row(**r.to_dict()) == r
