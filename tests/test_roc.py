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
    assert "AUC" in capsys.readouterr().out


def test_roc_cli_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"prompt": "x"}\n')
    write_detection(tmp_path / "n.jsonl", [np.ones((1, 2))])
    assert main(["roc", "--memorized", str(tmp_path / "m.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl")]) == 2
    assert "m.jsonl:1: method wen: no text_noise_norm" in capsys.readouterr().err
    assert main(["roc", "--memorized", str(tmp_path / "n.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl"),
                 "--steps", "x:y"]) == 2
