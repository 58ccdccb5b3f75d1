"""Evaluation helpers: table rows, gaps to Retrain, summaries, run specs, resource meter."""

from __future__ import annotations

import pytest
import torch

from serforget.common.unlearning import UnlearnConfig
from serforget.common.unlearning.evaluation import (
    EvalSets,
    add_reference_columns,
    gap_to_reference,
    markdown_table,
    parse_run,
    summarize,
)
from serforget.common.unlearning.measure import ResourceMeter
from tests.helpers.unlearning import LABELS, tone_set


def _row(method: str, **values: float) -> dict:
    base = {
        "forget_acc": 0.5,
        "remain_acc": 0.9,
        "test_ua": 0.8,
        "test_wa": 0.8,
        "mia_auc": 0.5,
        "unlearn_s": 1.0,
        "unlearn_cpu_s": 2.0,
        "peak_mem_mb": 10.0,
    }
    return {"method": method, **base, **values}


def test_gap_is_the_mean_absolute_difference_in_points():
    reference = _row("retrain")
    assert gap_to_reference(reference, reference) == 0.0
    row = _row("x", forget_acc=0.0, mia_auc=0.6)  # 50 points + 10 points over 5 metrics
    assert gap_to_reference(row, reference) == pytest.approx(12.0)


def test_reference_columns_give_speed_up_and_memory_ratio():
    reference = _row("retrain", unlearn_s=300.0, unlearn_cpu_s=600.0, peak_mem_mb=100.0)
    rows = [_row("original", unlearn_s=0.0, unlearn_cpu_s=0.0, peak_mem_mb=None), reference, _row("rl_adv_ela")]
    add_reference_columns(rows, reference)
    assert rows[2]["speedup"] == 300.0 and rows[2]["speedup_cpu"] == 300.0 and rows[2]["mem_ratio"] == 0.1
    assert rows[1]["speedup"] == 1.0 and rows[1]["gap"] == 0.0
    assert rows[0]["speedup"] is None and rows[0]["mem_ratio"] is None
    assert all(r["retrain_s"] == 300.0 for r in rows)


def test_summarize_gives_mean_and_sample_std_per_group():
    rows = [_row("a", test_ua=0.7), _row("a", test_ua=0.9), _row("b", test_ua=0.5)]
    rows[2]["gap"] = None
    summary = summarize(rows, keys=("method",), metrics=("test_ua", "gap"))
    a, b = summary
    assert a["method"] == "a" and a["n_runs"] == 2
    assert a["test_ua_mean"] == pytest.approx(0.8) and a["test_ua_std"] == pytest.approx(0.1414, abs=1e-3)
    assert b["test_ua_std"] == 0.0 and b["gap_mean"] is None
    table = markdown_table(summary, columns=(("test_ua", "Test UA %", 100.0, 1), ("gap", "Gap", 1.0, 2)))
    assert "| a | 80.0 ± 14.1 | - |" in table


def test_parse_run_specs():
    base = UnlearnConfig()
    assert parse_run("rl", base=base, target_forget_acc=None).config == base
    run = parse_run("rl_adv_ela@retrain-level", base=base, target_forget_acc=0.7)
    assert run.method == "rl_adv_ela" and run.config.stop == "retrain-level" and run.config.target_forget_acc == 0.7
    with pytest.raises(ValueError, match="needs a target"):
        parse_run("rl@retrain-level", base=base, target_forget_acc=None)
    with pytest.raises(ValueError, match="unknown method"):
        parse_run("sisa", base=base, target_forget_acc=None)
    with pytest.raises(ValueError, match="unknown stop rule"):
        parse_run("rl@never", base=base, target_forget_acc=None)


def test_eval_sets_reject_a_forget_set_that_leaks_into_remain_or_test():
    data = tone_set(2, seed=0)
    with pytest.raises(ValueError, match="also appear"):
        EvalSets(forget=data.subset([0]), remain=data, test=data.subset([1]), labels=LABELS)
    with pytest.raises(ValueError, match="empty"):
        EvalSets(forget=data.subset([0]), remain=data.subset([]), test=data.subset([1]), labels=LABELS)


def test_resource_meter_sees_a_large_allocation():
    with ResourceMeter(torch.device("cpu")) as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    assert meter.result.seconds > 0 and meter.result.cpu_seconds >= 0
    assert meter.result.peak_bytes >= 32 * 2**20
    assert meter.result.how in ("rss_sampling", "ru_maxrss")
