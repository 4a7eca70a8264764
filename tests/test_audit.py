"""``diffmem audit``: every part of the report produced, resume stage by stage, the page in headless Chromium."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from diffmem.audit import AuditConfig, run_audit
from diffmem.cli.main import main
from diffmem.prompts import PromptRecord, PromptSet
from diffmem.sampling import SamplingConfig

torch.set_num_threads(1)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPTS = ["a red cat", "blue sky over the sea", "an astronaut riding a horse", "a green apple", "old town"]
REFERENCE = ["a dog", "a house by a lake", "yellow flowers", "a car on a road", "two birds", "a bowl of soup"]
FAST = dict(sampling=SamplingConfig(num_generations=2, num_inference_steps=4, batch_size=8))  # tiny SD: seconds


class _Links(HTMLParser):
    """Every local resource an HTML page refers to, and whether the parser saw balanced main elements."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])


def broken_links(html_path: Path) -> tuple[list[str], _Links]:
    parser = _Links()
    parser.feed(html_path.read_text(encoding="utf-8"))
    broken = []
    for link in parser.links:
        url = urlparse(link)
        if url.scheme in ("http", "https"):
            broken.append(f"{link} (needs the network)")
        elif url.scheme == "data":
            continue
        elif link.startswith("#"):
            if link[1:] not in parser.ids:
                broken.append(link)
        elif not (html_path.parent / url.path).is_file():
            broken.append(link)
    return broken, parser


@pytest.fixture(scope="module")
def tiny_audit(tiny_sd_folder, tmp_path_factory):
    """`diffmem audit --model DIR --prompts FILE --reference-prompts FILE` on the tiny random SD folder."""
    d = tmp_path_factory.mktemp("audit")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "reference.jsonl").write_text("".join(json.dumps({"caption": p}) + "\n" for p in REFERENCE))
    out = d / "report"
    # fpr 0.2 on 6 reference prompts: the threshold sits just above the highest reference score
    argv = ["audit", "--model", str(tiny_sd_folder), "--device", "cpu", "--prompts", str(d / "prompts.txt"),
            "--reference-prompts", str(d / "reference.jsonl"), "--out", str(out), "--fpr", "0.2",
            "--num-generations", "2", "--num-inference-steps", "4", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_tiny_sd_audit_produces_every_part(tiny_audit):
    out, _ = tiny_audit
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["method"] == "fpr" and threshold["num_reference"] == len(REFERENCE)
    assert threshold["reference_fpr"] < 0.2
    for r in rows:
        assert {"prompt", "score", "flagged"} <= set(r) and r["flagged"] == (r["score"] >= threshold["value"])
    flagged = [r for r in rows if r["flagged"]]
    if not flagged:  # the random model's scores are arbitrary; keep the check meaningful below
        pytest.fail("no prompt flagged on the tiny model; the flagged-prompt parts would go untested")
    for r in flagged:
        assert r["top_words"] and all(w in r["prompt"] for w in r["top_words"])
        assert isinstance(r["mitigated_score"], float)
        assert len(r["images"]) == 2 and len(r["mitigated_images"]) == 2
        for img in r["images"] + r["mitigated_images"]:
            assert (out / img).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        if not r["flagged"]:
            assert "top_words" not in r and "mitigated_score" not in r

    html = (out / "index.html").read_text()
    broken, parser = broken_links(out / "index.html")
    assert broken == []
    assert "<svg" in html and "threshold" in html  # the score distribution with the threshold line
    assert 'id="prompts"' in html and html.count("<tr") >= len(rows)  # the table, one row per prompt
    assert all(f'id="p{r["index"]}"' in html for r in flagged)  # a card per flagged prompt
    assert 'class="bar' in html  # token bars
    assert str(Path(json.loads((out / "audit.json").read_text())["model"])) in html  # provenance
    assert "20% false positives on 6 reference prompts" in html  # the report states how the threshold was set
    assert "2 generations (Wen et al." in html  # the score's definition names the audit's own number of generations
    assert sum(link.startswith("images/mitigated/") for link in parser.links) == 2 * len(flagged)


def test_audit_resumes_finished_stages(tiny_audit, tiny_sd, capsys):
    out, argv = tiny_audit
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"detect", "calibrate", "track", "explain", "mitigate", "copies", "report"}
    mtimes = lambda: {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    before = (out / "mitigate.jsonl").read_text(), mtimes()
    assert main(argv[:-1]) == 0  # the same audit, progress shown
    printed = capsys.readouterr().out
    for name in ("detect", "calibrate", "track", "explain", "mitigate", "copies"):
        assert f"{name}: " in printed and "(done, resumed)" in printed.split(f"] {name}: ")[1].splitlines()[0]
    assert (out / "mitigate.jsonl").read_text() == before[0]
    assert mtimes() == before[1]  # no image rewritten


def test_audit_resumes_an_interrupted_stage(tiny_sd, tmp_path):
    """Interrupted during mitigation: a re-run keeps the finished stages and the prompts already mitigated."""
    prompts = PromptSet([PromptRecord(i, p) for i, p in enumerate(PROMPTS)], "test")
    config = AuditConfig(threshold=-1.0, **FAST)  # every prompt flagged; batch 8 = 2 prompts per mitigation unit
    first = run_audit(tiny_sd, prompts, None, config, tmp_path, progress=False)
    assert first.stages_run == ["detect", "calibrate", "track", "explain", "mitigate", "copies", "report"]
    assert first.threshold["method"] == "given" and all(r.flagged for r in first.rows)
    # Pretend the run stopped after the first mitigation unit.
    stages = json.loads((tmp_path / "stages.json").read_text())
    for name in ("mitigate", "copies", "report"):
        stages.pop(name)
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    lines = (tmp_path / "mitigate.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "mitigate.jsonl").write_text("".join(lines[:2]) + lines[2][:10])  # and a torn last line
    second = run_audit(tiny_sd, prompts, None, config, tmp_path, progress=False)
    assert second.stages_resumed == ["detect", "calibrate", "track", "explain"]
    assert second.stages_run == ["mitigate", "copies", "report"]
    again = [json.loads(line) for line in (tmp_path / "mitigate.jsonl").read_text().splitlines()]
    assert [r["index"] for r in again] == [0, 1, 2, 3, 4]  # the two kept, the three redone
    assert [r.mitigated_score for r in second.rows] == pytest.approx([r.mitigated_score for r in first.rows])


def test_audit_refuses_another_audit_in_the_same_folder(tiny_sd, tmp_path):
    prompts = PromptSet([PromptRecord(0, "a red cat")], "test")
    run_audit(tiny_sd, prompts, None, AuditConfig(threshold=1e9, **FAST), tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds another audit"):
        run_audit(tiny_sd, prompts, None, AuditConfig(threshold=0.5, **FAST), tmp_path, progress=False)


def test_audit_needs_a_threshold_source(tiny_sd_folder, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cat\n")
    rc = main(["audit", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--reference-prompts" in capsys.readouterr().err
    rc = main(["audit", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--prompts is required" in capsys.readouterr().err


def test_report_in_headless_chromium(tiny_audit, tmp_path):
    """The report renders offline: no console errors, no failed requests, the table sorts, a screenshot is taken."""
    if not CHROMIUM.exists():
        print(f"skipped: Chromium is absent ({CHROMIUM})")
        pytest.skip(f"Chromium is absent ({CHROMIUM})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the python package playwright is not installed")
    out, _ = tiny_audit
    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto((out / "index.html").resolve().as_uri(), wait_until="load")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            # every image decoded (naturalWidth > 0)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            # sorting by score: ascending after one click, descending after two
            scores = lambda: [float(x) for x in page.eval_on_selector_all(
                "#prompts tbody tr td:nth-child(3)", "tds => tds.map(t => t.dataset.v)")]
            page.click("#prompts th:nth-child(3)")
            assert scores() == sorted(scores())
            page.click("#prompts th:nth-child(3)")
            assert scores() == sorted(scores(), reverse=True)
        finally:
            browser.close()
    assert errors == [] and failed == []
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_audit_flags_the_fast_labs_memorized_prompts(fast_lab_folder, tmp_path):
    """The no-argument recipe on the fast lab: its memorized prompts are flagged, explained and mitigated."""
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(fast_lab_folder), "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    mem = [r for r in rows if r["source"]["set"] in ("memorized", "template")]
    novel = [r for r in rows if r["source"]["set"] == "novel"]
    assert mem and all(r["flagged"] for r in mem)
    # 19 reference prompts make a coarse threshold; the memorized prompts still stand apart from all novel ones
    assert min(r["score"] for r in mem) > max(r["score"] for r in novel)
    assert sum(r["flagged"] for r in novel) <= 0.25 * len(novel)
    for r in mem:
        assert set(r["top_words"]) & set(r["source"]["trigger_words"])  # the trigger word is among the top words
        assert r["mitigated_score"] < r["score"]
        assert "generated_copies" in r and "mitigated_copies" in r
    html = (out / "index.html").read_text()
    assert "Ground truth" in html and "Nearest training image" in html and "own training image" in html
    assert broken_links(out / "index.html")[0] == []


def test_audit_with_a_longer_window_sets_the_mitigation_target_on_the_first_step(tiny_sd_folder, tmp_path):
    """embedding-opt stops on its first-step loss, so with --detect-steps K a calibrated target (a model
    without a default target, as the lab) is the reference prompts' median first-step loss (the
    original unit: the norm over the generations at once), not their K-step score."""
    from dataclasses import replace

    from diffmem.adapters import load_model

    model = load_model(str(tiny_sd_folder))
    model.defaults = replace(model.defaults, target_loss=None)  # calibrate, as on the lab
    prompts = PromptSet([PromptRecord(i, p) for i, p in enumerate(PROMPTS)], "test")
    reference = PromptSet([PromptRecord(i, p) for i, p in enumerate(REFERENCE)], "reference")
    config = AuditConfig(threshold=0.0, detect_steps=3, sampling=SamplingConfig(num_generations=2, num_inference_steps=4,
                                                                                batch_size=8))
    out = tmp_path / "report"
    run_audit(model, prompts, reference, config, out, progress=False)
    ref = [json.loads(l) for l in (out / "detect" / "reference.jsonl").read_text().splitlines()]
    first = [float(np.mean([g[0] for g in r["text_noise_norm"]])) for r in ref]
    first_loss = [float(np.sqrt(sum(g[0] ** 2 for g in r["text_noise_norm"]))) for r in ref]
    window = [r["score"] for r in ref]
    assert window != pytest.approx(first)  # the two scales differ on this model
    mitigated = [json.loads(l) for l in (out / "mitigate.jsonl").read_text().splitlines()]
    assert mitigated and all(m["target_loss"] == pytest.approx(float(np.median(first_loss))) for m in mitigated)


def test_audit_on_stable_diffusion_takes_the_seeds_target(tiny_sd, tmp_path):
    prompts = PromptSet([PromptRecord(0, PROMPTS[0])], "test")
    run_audit(tiny_sd, prompts, None, AuditConfig(threshold=0.0, **FAST), tmp_path, progress=False)
    mitigated = [json.loads(l) for l in (tmp_path / "mitigate.jsonl").read_text().splitlines()]
    assert [m["target_loss"] for m in mitigated] == [tiny_sd.defaults.target_loss] == [3.0]
