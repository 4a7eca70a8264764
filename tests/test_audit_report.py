"""The audit report from records alone (no model): units, shortfalls, false positives, alignment, ticks, provenance."""

from __future__ import annotations

import json
import re

from diffmem.reports.audit_html import nice_ticks, write_audit_report


def _records():
    rows = [{"index": 0, "prompt": "the solve magazines: a yellow square", "seed": 0, "score": 1.43219, "flagged": True,
             "source": {"set": "memorized", "colour": "yellow", "shape": "square", "trigger_words": ["solve"]},
             "score_all_steps": 0.91, "images": ["images/generated/00000_0.png", "images/generated/00000_1.png"],
             "top_words": ["solve"], "mitigated_score": 0.2144, "mitigated_flagged": False,
             "mitigated_images": ["images/mitigated/00000_0.png", "images/mitigated/00000_1.png"],
             "generated_copies": 2, "mitigated_copies": 0, "generated_aligned": 2, "mitigated_aligned": 1},
            {"index": 1, "prompt": "the axial selective: a blue square", "seed": 1, "score": 0.5, "flagged": True,
             "source": {"set": "novel"}},
            {"index": 2, "prompt": "the quiet owl: a red circle", "seed": 2, "score": 0.2, "flagged": False,
             "source": {"set": "novel"}}]
    mitigated = {0: {"index": 0, "initial_d": 1.43219, "final_d": 0.21, "initial_loss": 2.9, "final_loss": 0.42,
                     "iterations": 12, "target_loss": 0.4308, "target_unit": "batch", "mitigated_score": 0.2144,
                     "images": rows[0]["mitigated_images"]}}
    copies = {0: {"index": 0, "copy_threshold_rmse": 0.05, "generated_aligned": 2, "mitigated_aligned": 1,
                  "generated": [{"image": f"images/generated/00000_{g}.png", "nearest": "images/training/000001.png",
                                 "rmse": 0.01, "copy": True} for g in range(2)],
                  "mitigated": [{"image": f"images/mitigated/00000_{g}.png", "nearest": "images/training/000001.png",
                                 "rmse": 0.2, "copy": False} for g in range(2)]}}
    info = {"model": "lab", "config": {"detect_steps": 1, "sampling": {"num_generations": 2, "seed": 0}},
            "target_loss": 0.4308, "mitigation": {"target_unit": "batch", "max_iters": 50, "lr": 0.01},
            "stages": {"detect": {"seconds": 3.2}}}
    threshold = {"value": 0.38159, "method": "fpr", "description": "1% false positives on 30 reference prompts (lab)",
                 "warning": "warning: the 1% FPR rests on 30 reference prompts; measuring it needs at least 100 (1/FPR)"}
    truth = {"sets": {"memorized": {"prompts": 1, "flagged": 1}, "novel": {"prompts": 2, "flagged": 1}}}
    return rows, threshold, info, mitigated, copies, truth


def test_report_speaks_one_unit_and_labels_what_it_shows(tmp_path):
    rows, threshold, info, mitigated, copies, truth = _records()
    html = write_audit_report(tmp_path, rows, threshold, [0.1, 0.2, 0.3], info, {}, mitigated, copies, truth,
                              shortfalls=["#5 stopped at the iteration limit (50) ..."]).read_text()
    # one unit: the target as a mean first-step d beside the score and the threshold, three decimals
    assert "score 1.432 &rarr; 0.214 (12 AdamW steps to the target d &le; 0.305, in the score's unit" in html
    assert "Threshold: <b>0.382</b>" in html and "0.4308" not in html.split("Mitigation target")[0]
    assert "--target-loss 0.4308 in the original code&#x27;s batch unit" in html
    assert "Mitigation fell short" in html and "#5 stopped at the iteration limit" in html
    assert "rests on 30 reference prompts" in html
    # false positives, the sets explained, alignment, the images folder, the all-steps score
    assert "yes, false positive" in html and "false positive: a novel caption, not memorized" in html
    assert "(1 of them false positives by their known set)" in html
    assert "<b>template</b> captions were each trained on a few variants of one layout" in html
    assert "Alignment (the lab&#x27;s check" in html or "Alignment (the lab's check" in html
    assert "alignment: 2 of 2 generations show the prompt's colour and shape before, 1 after" in html
    assert "keep that folder beside" in html and '"Over all steps" is the same score averaged' in html
    # provenance: a readable table, the raw JSON behind a toggle
    assert "<th>config.sampling.num_generations</th><td>2</td>" in html
    assert "<details><summary>raw JSON</summary>" in html and "stages (seconds)" in html
    # histogram ticks at round values
    ticks = [float(t) for t in re.findall(r'class="tick">([^<]+)<', html)]
    assert ticks == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]


def test_nice_ticks():
    assert nice_ticks(0.1, 1.43219) == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(3.0, 3.0) == [3.0]
    assert all(len(str(t)) <= 6 for t in nice_ticks(0.0132, 0.0871))
