"""`python -m mamlib.bench` writes its two files; timings themselves are never asserted (they are machine figures)."""
import json
import time

import torch

from mamlib import bench


def test_bench_writes_table_and_json(tmp_path):
    code = bench.main(["--only", "ising", "--ising-sides", "2", "--sizes", "cpu", "--batch", "4", "--repeats", "1",
                       "--warmup", "0", "--min-seconds", "0", "--output", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    cases = [row["case"] for row in payload["rows"]]
    assert cases == ["Ising MaM-KL step", "Ising ARM step (exact log p)", "Ising ARM-MC step (one-step log p)",
                     "Ising ARM / MaM step time"]
    assert all(row["median_s"] > 0 and row["calls"] == 1 for row in payload["rows"][:3]) and payload["rows"][3]["ratio"] > 0
    assert "| Ising MaM-KL step |" in (tmp_path / "BENCH.md").read_text()


def test_bench_rejects_unknown_sizes(tmp_path, capsys):
    assert bench.main(["--sizes", "huge", "--output", str(tmp_path)]) == 2
    assert "--sizes huge is unknown" in capsys.readouterr().err


def test_timer_repeats_cheap_cases_up_to_its_time_budget():
    calls = []
    once = lambda: calls.append(1)
    assert bench.Timer(torch.device("cpu"), repeats=3, warmup=0)(once)["calls"] == 3 and len(calls) == 3  # no budget: --repeats
    # a budget that is never reached stops at max_repeats
    assert bench.Timer(torch.device("cpu"), repeats=3, warmup=0, min_seconds=1e9, max_repeats=7)(once)["calls"] == 7
    # a reached budget stops it: each call takes >= 10 ms, so 50 ms are spent after at most 5 calls
    nap = lambda: time.sleep(0.01)
    assert 1 <= bench.Timer(torch.device("cpu"), repeats=1, warmup=0, min_seconds=0.05, max_repeats=1000)(nap)["calls"] <= 5


def test_paired_timer_alternates_the_two_cases():
    calls = []
    first, second = bench.Timer(torch.device("cpu"), repeats=3, warmup=1).paired(lambda: calls.append("a"),
                                                                                  lambda: calls.append("b"))
    assert calls == ["a", "b"] * 4  # one warm-up pair, then three timed pairs, never two of a kind in a row
    assert first["calls"] == second["calls"] == 3 and first["median_s"] >= 0 and second["median_s"] >= 0
    # the time budget counts both cases: 10 ms per pair reaches 50 ms after at most 5 pairs
    nap = lambda: time.sleep(0.005)
    first, _ = bench.Timer(torch.device("cpu"), repeats=1, warmup=0, min_seconds=0.05, max_repeats=1000).paired(nap, nap)
    assert 1 <= first["calls"] <= 5

