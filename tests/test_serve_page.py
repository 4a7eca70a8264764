"""The serve page's newcomer features in headless Chromium, on the shipped lab model: example prompts to click,
a prompt in the address that analyses on load, the truncation notice, one colour scale with its legend."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from diffmem.explain import ExplainConfig, prompt_scores
from diffmem.web.server import ExplainApp, Threshold, lab_examples, significance_scale, start_server

torch.set_num_threads(1)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALPHA = "parseFloat(getComputedStyle(document.querySelector('#tokens .token.top')).backgroundColor.split(',')[3])"


@pytest.fixture(scope="module")
def lab():
    from diffmem.adapters import load_model

    return load_model("lab")


def test_lab_examples_are_one_of_each_set(lab):
    examples = lab_examples(lab)
    assert [e["set"] for e in examples] == ["memorized", "template", "novel"]
    data = lab.training_data()
    kinds = {p.caption: p.kind for p in data.prompt_set("memorized")}
    assert kinds[examples[0]["prompt"]] == "memorized" and kinds[examples[1]["prompt"]] == "template"
    assert examples[2]["prompt"] in {p.caption for p in data.prompt_set("novel")} and all(e["about"] for e in examples)


def test_page_examples_address_truncation_and_colour_scale(lab, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is absent ({CHROMIUM}); CI installs it: apt-get install -y chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the python package playwright is not installed (pip install playwright; never `playwright install`)")
    config = ExplainConfig(generations=1)
    examples = lab_examples(lab)
    memorized, novel = examples[0]["prompt"], examples[2]["prompt"]
    mem_score, novel_score = prompt_scores(lab, [memorized, novel], config, positions=[0, 0])
    assert novel_score < mem_score
    app = ExplainApp(lab, Threshold((mem_score + novel_score) / 2, "test"), config, image_steps=None,
                     examples=examples, colour_scale=significance_scale(lab, memorized, config))
    server, url = start_server(app)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                        headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.new_page()
            # 1. A prompt in the address is analysed on load.
            page.goto(url + "?prompt=" + quote(novel))
            page.wait_for_function("document.getElementById('verdict').textContent === 'not memorized'", timeout=120_000)
            assert page.input_value("#prompt") == novel
            assert page.inner_text("#truncation") == ""
            novel_alpha = page.evaluate(ALPHA)
            assert "one scale for every prompt" in page.inner_text("#legend-text")
            # 2. The examples: one button per set; a click analyses it and the address follows.
            buttons = page.locator("#examples button.example")
            assert [buttons.nth(i).get_attribute("data-set") for i in range(buttons.count())] == \
                ["memorized", "template", "novel"]
            page.click("#examples button[data-set=memorized]")
            page.wait_for_function("document.getElementById('verdict').textContent === 'memorized'", timeout=120_000)
            assert page.input_value("#prompt") == memorized and "prompt=" in page.url
            mem_alpha = page.evaluate(ALPHA)
            # 3. One colour scale: the novel prompt's top word is far paler than the trigger word.
            assert mem_alpha == pytest.approx(0.85, abs=0.01) and novel_alpha < 0.5 * mem_alpha
            # 4. A prompt longer than the encoder reads says so.
            page.fill("#prompt", memorized + " and" * (lab.max_tokens + 5) + " zebra")
            page.wait_for_function("document.getElementById('truncation').textContent !== ''", timeout=120_000)
            assert f"the text encoder reads only the first {lab.max_tokens}" in page.inner_text("#truncation")
            # the words it did not read are listed apart, not ranked at 0.00
            ranking = page.inner_text("#ranking")
            ranked, unread = ranking.split(" · not read (past the encoder's limit): ")
            assert "zebra" in unread.split() and "zebra" not in ranked
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            context.close()
            server.shutdown()
            server.server_close()
