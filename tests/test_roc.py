"""ROC metrics and `diffmem roc` agree with scikit-learn and the official notebook's definitions."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffmem.cli.main import main
from diffmem.metrics import prompt_score, roc_metrics, threshold_at_fpr


def write_detection(path, arrays):
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "index": i, "text_noise_norm": a.tolist(),
                                        "score": float(a.mean())}) + "\n" for i, a in enumerate(arrays)))


def test_roc_metrics_match_sklearn_and_notebook_definitions():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(2, 1, 300), rng.normal(0, 1, 700)
    r = roc_metrics(pos, neg)
    assert r.auc == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(700)], np.r_[pos, neg]))
    assert r.acc == pytest.approx(np.max(1 - (r.fpr + (1 - r.tpr)) / 2))
    # TPR@1%FPR: the last ROC point with FPR < 1%, and its threshold flags exactly that TPR
    assert (neg >= r.threshold_at_1fpr).mean() < 0.01
    assert (pos >= r.threshold_at_1fpr).mean() == pytest.approx(r.tpr_at_1fpr)


def test_perfect_separation():
    r = roc_metrics([5, 6, 7], [1, 2, 3])
    assert r.auc == 1.0 and r.tpr_at_1fpr == 1.0 and r.acc == 1.0


def test_threshold_at_fpr_keeps_false_positives_below_rate():
    normal = np.arange(1000, dtype=float)
    t = threshold_at_fpr(normal, 0.01)
    assert (normal >= t).sum() == 9  # strictly fewer than 1% of 1000
    assert threshold_at_fpr([1.0, 2.0], 0.01) > 2.0  # fewer than 100 scores: nothing may be flagged


def test_prompt_score_windows():
    a = np.arange(12, dtype=float).reshape(3, 4)  # 3 generations, 4 steps
    assert prompt_score(a) == a.mean()
    assert prompt_score(a, slice(0, 1)) == a[:, 0].mean()
    assert prompt_score(a, slice(1, 3), generations=2) == a[:2, 1:3].mean()
    with pytest.raises(ValueError, match="empty score window"):
        prompt_score(a, slice(5, 6))


def test_roc_cli_recomputes_scores_over_a_window(tmp_path, capsys):
    rng = np.random.default_rng(1)
    mem = [rng.normal(3, 1, (4, 10)) + np.r_[np.ones(1) * 5, np.zeros(9)] for _ in range(50)]
    non = [rng.normal(3, 1, (4, 10)) for _ in range(80)]
    write_detection(tmp_path / "m.jsonl", mem)
    write_detection(tmp_path / "n.jsonl", non)
    js = tmp_path / "roc.json"
    assert main(["roc", "--memorized", str(tmp_path / "m.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl"),
                 "--steps", "0:1", "--generations", "1", "--json", str(js)]) == 0
    summary = json.loads(js.read_text())
    assert set(summary) >= {"auc", "acc", "tpr_at_1fpr", "threshold_at_1fpr", "n_memorized", "n_non_memorized"}
    expected = roc_auc_score(np.r_[np.ones(50), np.zeros(80)], [a[0, 0] for a in mem] + [a[0, 0] for a in non])
    assert summary["auc"] == pytest.approx(expected)
    assert summary["n_memorized"] == 50 and summary["n_non_memorized"] == 80
    assert (tmp_path / "roc.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "AUC" in out and f"closest-point rule of Ren, Jeon and Asthana: {summary['tpr_at_1fpr_closest']:.4f}" in out
    assert "tpr_at_1fpr_closest" in summary


def test_roc_cli_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"prompt": "x"}\n')
    write_detection(tmp_path / "n.jsonl", [np.ones((1, 2))])
    assert main(["roc", "--memorized", str(tmp_path / "m.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl")]) == 2
    assert "m.jsonl:1: method wen: no text_noise_norm" in capsys.readouterr().err
    assert main(["roc", "--memorized", str(tmp_path / "n.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl"),
                 "--steps", "x:y"]) == 2


def test_tpr_at_1fpr_by_the_closest_point_rule_worked_by_hand():
    """219 negatives scored 1..219 (1% is 2.19 false positives); 6 positives above them all, 2 between
    the two highest negatives, 2 between the second and third. The ROC passes (1/219, 0.6), (1/219, 0.8),
    (2/219, 0.8), (2/219, 1.0), (3/219, 1.0). Strict: the last point with FPR < 1% is (2/219, 1.0).
    Closest: 2/219 = 0.91% is the FPR nearest 1%, and the first point there is (2/219, 0.8)."""
    neg = np.arange(1, 220, dtype=float)
    pos = np.r_[[1000.0] * 6, [218.5] * 2, [217.5] * 2]
    r = roc_metrics(pos, neg)
    assert r.tpr_at_1fpr == 1.0 and r.threshold_at_1fpr == 217.5
    assert r.tpr_at_1fpr_closest == pytest.approx(0.8) and r.fpr_at_1fpr_closest == pytest.approx(2 / 219)
    assert {"tpr_at_1fpr_closest", "fpr_at_1fpr_closest"} <= set(r.summary())


def test_closest_point_rule_reads_the_origin_with_fewer_than_50_negatives():
    """With 40 negatives the curve's FPRs are 0, 2.5%, ...: 0 is nearest 1%, and its first point is the
    curve's origin, so even a perfect separation reads TPR 0 by that rule (1 by the strict one)."""
    r = roc_metrics(np.arange(50, 60, dtype=float), np.arange(40, dtype=float))
    assert r.auc == 1.0 and r.tpr_at_1fpr == 1.0
    assert r.tpr_at_1fpr_closest == 0.0 and r.fpr_at_1fpr_closest == 0.0


def test_tpr_rules_are_named():
    from diffmem.metrics import roc_point_at_fpr

    with pytest.raises(ValueError, match="TPR rule 'nearest': expected one of strict, closest"):
        roc_point_at_fpr(np.array([0.0, 1.0]), 0.01, "nearest")
