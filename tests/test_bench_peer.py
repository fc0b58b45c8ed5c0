"""The peer benchmark's judgement (bench/peer_compare.py), on the runs it recorded on an H100 on 2026-12-07
(docs/evidence/issue21-h100-2026-12-07/peer-summary.json): which pairs it calls comparable, the medians and
ratios it reports, and that a workload mismatch is called out. Its pure parts need neither torch nor a GPU;
the GPU runs themselves are in docs/benchmarks.md."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from tests.helpers import ROOT

EVIDENCE = ROOT / "docs/evidence/issue21-h100-2026-12-07/peer-summary.json"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_compare", ROOT / "bench/peer_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recorded():
    return json.loads(EVIDENCE.read_text())


def test_recorded_pairs_match_and_the_skipped_run_is_not_compared(peer, recorded):
    checks = peer.pair_checks(recorded["runs"])
    assert [c["ok"] for c in checks] == [True, True, True, None]
    assert checks[0]["tokens_per_step"][0] == checks[0]["tokens_per_step"][1]
    assert "not compared" in checks[3]["text"] and "unsloth-d0-2 skipped" in checks[3]["text"]
    assert checks == recorded["checks"]  # what the GPU call wrote is what the code says


def test_medians_and_ratios_are_the_reported_ones(peer, recorded):
    rows = {row["key"]: row for row in peer.by_setting(recorded["runs"])}
    assert rows["d01"]["job"]["runs"] == 2 and rows["d01"]["unsloth"]["runs"] == 2
    assert rows["d01"]["ratio"]["tokens_per_s"] == pytest.approx(14023 / 15128, abs=1e-3)  # README: 0.93x
    assert rows["d0"]["ratio"]["tokens_per_s"] == pytest.approx(15715 / 17361, abs=1e-3)
    assert rows["d01"]["job"]["peak_gib"] == pytest.approx(66.3, abs=0.05)
    assert rows["d01"]["unsloth"]["peak_gib"] == pytest.approx(50.4, abs=0.05)
    text = peer.render_summary(recorded["meta"], recorded["runs"], peer.pair_checks(recorded["runs"]),
                               list(rows.values()))
    assert "dropout 0.1: 0.927" in text and "dropout 0: 0.905" in text


def test_a_different_workload_is_called_out(peer, recorded):
    runs = copy.deepcopy(recorded["runs"])
    unsloth = next(r for r in runs if r["name"] == "unsloth-d01-1")
    unsloth["result"]["tokens_per_step"] += 512  # e.g. packed differently
    unsloth["result"]["losses"][0] += 0.01  # or other data
    check = peer.pair_checks(runs)[0]
    assert check["ok"] is False and check["tokens_same"] is False and check["loss_same"] is False
    assert "DIFFER by +512.0" in check["text"] and "DIFFER by +0.0100" in check["text"]
    # the Unsloth side takes the job run's plan for its batch, so tokens per step can match
    job = next(r for r in runs if r["name"] == "job-d01-1")
    assert peer.unsloth_batch(job["result"]) == {"micro_batch": 5, "packing_length": 2048, "gc": "off"}
