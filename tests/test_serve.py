"""``diffmem explain`` / ``diffmem serve``: the CLI records, the JSON API, and the page in a real headless browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from diffmem.cli.main import main
from diffmem.explain import ExplainConfig, prompt_scores
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.sampling import SamplingConfig
from diffmem.web.server import ExplainApp, Threshold, lab_reference_threshold, mitigation_hook, png_data_url, start_server

torch.set_num_threads(1)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- diffmem explain --------------------------------------------------------------------------

def test_explain_cli_writes_table_png_and_json(tiny_sd_folder, tmp_path, capsys):
    out, png = tmp_path / "ex.json", tmp_path / "ex.png"
    rc = main(["explain", "--model", str(tiny_sd_folder), "--device", "cpu", "--prompt", "a red cat",
               "--num-generations", "2", "--json", str(out), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prompt: a red cat" in printed and "█" in printed and "words (sum of their tokens)" in printed
    rec = json.loads(out.read_text())  # one prompt: the file is one JSON object
    assert [t["token"] for t in rec["tokens"][:10]] == ["<|startoftext|>", "a", "r", "e", "d", "c", "a", "t",
                                                         "<|endoftext|>", "<|endoftext|>"]
    assert set(rec["tokens"][0]) >= {"token", "score", "special"} and rec["tokens"][0]["special"]
    assert [w["word"] for w in rec["words"]] == ["a", "red", "cat"]
    assert rec["words"][1]["score"] == pytest.approx(sum(t["score"] for t in rec["tokens"][2:5]))
    assert rec["model"] == str(tiny_sd_folder) and rec["settings"]["generations"] == 2 and "diffmem_version" in rec
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_cli_many_prompts(tiny_sd_folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"caption": "a red cat", "id": 7}\n{"caption": "blue sky"}\n')
    out = tmp_path / "ex.jsonl"
    rc = main(["explain", "--model", str(tiny_sd_folder), "--device", "cpu", "--prompts", str(prompts),
               "--num-generations", "1", "--end-step", "2", "--json", str(out), "--png", str(tmp_path / "bars.png")])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red cat", "blue sky"] and rows[0]["source"] == {"id": 7}
    assert rows[1]["settings"]["steps"] == [0, 2] and len(rows[1]["text_noise_norm"][0]) == 2
    assert (tmp_path / "bars_00000.png").exists() and (tmp_path / "bars_00001.png").exists()


def test_explain_cli_refuses_bad_window(tiny_sd_folder, capsys):
    rc = main(["explain", "--model", str(tiny_sd_folder), "--prompt", "a cat", "--start-step", "2", "--end-step", "1"])
    assert rc == 2 and "step window" in capsys.readouterr().err


# -- the JSON API -----------------------------------------------------------------------------

def test_api_analyze_info_and_errors(tiny_sd):
    config = ExplainConfig(generations=2)
    score = prompt_scores(tiny_sd, ["a red cat"], generations=2)[0]
    app = ExplainApp(tiny_sd, Threshold(score * 0.999, "test"), config, image_steps=2)
    server, url = start_server(app)
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, info = _get(url + "api/info")
        assert status == 200 and info["threshold"]["value"] == pytest.approx(score * 0.999)
        assert info["mitigation_available"] is False
        status, res = _post(url + "api/analyze", {"prompt": "a red cat"})
        assert status == 200
        assert res["score"] == pytest.approx(score, rel=1e-4) and res["verdict"] == "memorized" and res["memorized"]
        assert [t["token"] for t in res["tokens"][1:4]] == ["a", "r", "e"]
        assert len(res["images"]) == 2 and all(i.startswith("data:image/png;base64,") for i in res["images"])
        app.threshold = Threshold(score * 1.001, "test")
        assert _post(url + "api/analyze", {"prompt": "a red cat"})[1]["verdict"] == "not memorized"
        assert _post(url + "api/analyze", {"prompt": "  "})[0] == 400
        assert _post(url + "api/analyze", {"text": "a"})[0] == 400
        assert _post(url + "api/mitigate", {"prompt": "a red cat"})[0] == 501
        app.mitigate = lambda model, prompt, cfg: {"images": [], "note": f"mitigated {prompt}"}  # the hook
        status, res = _post(url + "api/mitigate", {"prompt": "a cat"})
        assert status == 200 and res.pop("elapsed_s") >= 0
        assert res == {"prompt": "a cat", "images": [], "note": "mitigated a cat"}
        app.mitigate = mitigation_hook(MitigationConfig("embedding-opt", target_loss=0.0, max_iters=2), app.image_steps)
        assert _get(url + "api/info")[1]["mitigation_available"] is True
        status, res = _post(url + "api/mitigate", {"prompt": "a red cat"})
        assert status == 200 and res["method"] == "embedding-opt" and res["iterations"] == 2
        assert len(res["images"]) == 2 and all(i.startswith("data:image/png;base64,") for i in res["images"])
        assert res["final_score"] < res["initial_score"]
        assert res["mitigated_score"] is None and "verdict" not in res  # 2-step images, a 50-step score schedule
        app.mitigate = lambda model, prompt, cfg: {"images": [], "mitigated_score": score}
        res = _post(url + "api/mitigate", {"prompt": "a red cat"})[1]  # the threshold is score * 1.001 here
        assert (res["verdict"], res["memorized"], res["threshold"]) == ("not memorized", False, app.threshold.value)
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        assert 'id="prompt"' in page and 'id="verdict"' in page and "/api/analyze" in page
        assert "http://" not in page and "https://" not in page  # no CDN, nothing from outside
    finally:
        server.shutdown()
        server.server_close()


# -- the mitigation behind the page's button -------------------------------------------------

def test_mitigation_hook_is_mitigate_unit_sampled_like_the_page(tiny_sd):
    config = ExplainConfig(generations=2, num_inference_steps=3, seed=5)
    mitigation = MitigationConfig("embedding-opt", target_loss=0.0, max_iters=3)  # unreachable: every iteration
    res = mitigation_hook(mitigation, image_steps=3)(tiny_sd, "a red cat", config)
    (m,) = mitigate_unit(tiny_sd, ["a red cat"], [0], mitigation, SamplingConfig(3, num_generations=2, seed=5))
    assert res["images"] == [png_data_url(img) for img in m.images] and len(res["images"]) == 2
    assert (res["initial_score"], res["final_score"], res["iterations"]) == (m.initial_d, m.final_d, 3)
    assert res["final_score"] < res["initial_score"]
    assert res["method"] == "embedding-opt" and res["target_loss"] == 0.0 and res["repeat_num"] is None
    assert res["modified_prompt"] == "a red cat"
    # The page's score: before mitigation it is the first-step d the optimizer starts from; after, its final d.
    page_score = prompt_scores(tiny_sd, ["a red cat"], generations=2, seed=5, num_inference_steps=3)[0]
    assert res["initial_score"] == pytest.approx(page_score, rel=1e-4)
    assert res["mitigated_score"] == pytest.approx(res["final_score"], rel=1e-4)


def test_mitigation_hook_augmentation_without_images_and_other_schedules(tiny_sd):
    config = ExplainConfig(generations=2, num_inference_steps=3)
    hook = mitigation_hook(MitigationConfig("rand-numb-add", repeat_num=2), image_steps=None)
    res = hook(tiny_sd, "a red cat", config)
    assert res["images"] == [] and res["iterations"] == 0 and res["target_loss"] is None and res["repeat_num"] == 2
    assert len(res["modified_prompt"].split(" ")) == 5
    assert res["mitigated_score"] == pytest.approx(res["final_score"], rel=1e-4)
    res = mitigation_hook(MitigationConfig("none"), image_steps=2)(tiny_sd, "a red cat", config)
    assert len(res["images"]) == 2 and res["initial_score"] == res["final_score"]
    assert res["mitigated_score"] is None  # images on 2 steps, the score on a 3-step schedule: not comparable


@pytest.mark.parametrize("argv, message", [
    (["--mitigation-lr", "0"], "--mitigation-lr 0.0: must be > 0"),
    (["--mitigation-max-iters", "0"], "--mitigation-max-iters 0: must be >= 1"),
    (["--target-loss", "-1"], "--target-loss -1.0: must be >= 0"),
    (["--repeat-num", "2"], "--repeat-num has no effect with --mitigation embedding-opt"),
    (["--mitigation", "rand-word-add", "--target-loss", "1"], "--target-loss has no effect with --mitigation rand-word-add"),
    (["--mitigation", "none", "--repeat-num", "2"], "--repeat-num has no effect with --mitigation none"),
    (["--mitigation", "rand-numb-add", "--repeat-num", "0"], "--repeat-num 0: must be >= 1"),
])
def test_serve_cli_checks_mitigation_options_before_loading(argv, message, tmp_path, capsys):
    rc = main(["serve", "--model", str(tmp_path / "absent"), "--threshold", "1", *argv])  # no model to load
    assert rc == 2 and message in capsys.readouterr().err


def test_serve_cli_needs_a_threshold_for_non_lab_models(tiny_sd_folder, capsys):
    rc = main(["serve", "--model", str(tiny_sd_folder), "--device", "cpu"])
    assert rc == 2 and "--threshold" in capsys.readouterr().err


def test_serve_cli_starts_on_loopback(tiny_sd_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffmem.cli.main", "serve", "--model", str(tiny_sd_folder),
                             "--device", "cpu", "--threshold", "1.5", "--port", "0", "--no-images"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("serving on "):
                url = line.split()[2]
                break
        assert url and url.startswith("http://127.0.0.1:")
        status, info = _get(url + "api/info")
        assert status == 200 and info["threshold"] == {"value": 1.5, "source": "given with --threshold",
                                                       "fpr": None, "num_reference": None, "median": None}
        assert info["mitigation_available"] is True  # embedding-opt by default
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- the page in a real headless browser ------------------------------------------------------

def _launch_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is absent ({CHROMIUM}); CI installs it: apt-get install -y chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the python package playwright is not installed (pip install playwright; never `playwright install`)")
    pw = sync_playwright().start()
    profile = tmp_path / "chromium-profile"  # a new, empty user-data-dir
    context = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                    args=CHROMIUM_ARGS)
    return pw, context


@pytest.mark.slow
def test_page_in_headless_chromium(fast_lab, tmp_path):
    """Type a memorized lab prompt: verdict and highlighted trigger token; generate with mitigation: its images and,
    at the default target (the novel prompts' median), the other verdict; edit to a novel one: the other verdict."""
    from diffmem.lab.build import lab_data_for

    config = ExplainConfig()
    threshold = lab_reference_threshold(fast_lab, config)
    data = lab_data_for(fast_lab)
    memorized = data.prompt_set("memorized")
    scores = prompt_scores(fast_lab, [p.caption for p in memorized])
    strongest = memorized[max(range(len(memorized)), key=scores.__getitem__)]
    assert max(scores) >= threshold.value, "the fast lab's most memorized prompt is not detected"
    novel = data.prompt_set("novel")[0].caption  # one of the calibration prompts: below the threshold by construction

    app = ExplainApp(fast_lab, threshold, config, image_steps=50)
    app.mitigate = mitigation_hook(MitigationConfig("embedding-opt", target_loss=threshold.median), app.image_steps)
    server, url = start_server(app)
    pw, context = _launch_chromium(tmp_path)
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.includes('threshold')")

        page.fill("#prompt", strongest.caption)
        page.wait_for_function("document.getElementById('verdict').textContent === 'memorized'", timeout=120_000)
        top = page.locator("#tokens .token.top")
        assert top.count() == 1 and top.inner_text() in strongest.title_words
        assert top.get_attribute("data-rank") == "1"
        assert page.locator("#images img").count() == 4
        assert page.evaluate("[...document.querySelectorAll('#images img')].every(i => i.naturalWidth === 16)")

        assert page.locator("#mitigate").is_enabled()
        page.click("#mitigate")
        page.wait_for_function("document.querySelectorAll('#mitigated-images img').length === 4", timeout=120_000)
        summary = page.inner_text("#mitigation-summary")
        assert summary.startswith("embedding-opt · first-step d ") and "iteration" in summary
        assert page.inner_text("#mitigation-summary .badge") == "not memorized", summary
        assert page.evaluate("[...document.querySelectorAll('#mitigated-images img')]"
                             ".every(i => i.naturalWidth === 16)")

        page.fill("#prompt", novel)  # editing the prompt updates the view
        page.wait_for_function("document.getElementById('verdict').textContent === 'not memorized'", timeout=120_000)
        assert page.locator("#tokens .token").count() == sum(not t.special for t in fast_lab.tokens(novel))
        assert float(page.inner_text("#score")) < threshold.value
        assert page.locator("#mitigated-images img").count() == 0  # mitigated images belong to the previous prompt
    finally:
        context.close()
        pw.stop()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_fast_lab_top_token_is_a_trigger_word(fast_lab):
    from diffmem.explain import token_significance
    from diffmem.lab.build import lab_data_for

    for pair in lab_data_for(fast_lab).prompt_set("memorized"):
        ex = token_significance(fast_lab, pair.caption)
        assert ex.ranked_tokens()[0].token in pair.title_words, pair.caption
        assert ex.ranked_words()[0].word in pair.title_words, pair.caption


# -- the lab measurement behind the "done" figures -------------------------------------

def test_remove_word_tidies_spaces():
    from diffmem.lab.attribution import remove_word

    p = "the wages cobalt: a green circle"
    assert remove_word(p, 4, 9) == "the cobalt: a green circle"
    assert remove_word(p, 10, 16) == "the wages: a green circle"
    assert remove_word(p, 10, 16, "pencil") == "the wages pencil: a green circle"


@pytest.mark.slow
def test_attribution_benchmark_on_the_fast_lab(fast_lab):
    from diffmem.lab.attribution import attribution_benchmark, format_results

    (result,) = attribution_benchmark(fast_lab, [(0, 1)], num_calibration=16, num_ordinary=8, progress=False)
    mem = {s.name: s for s in result.sets}["memorized"]
    print(format_results([result]))
    assert mem.top1_token_is_title == 1.0 and mem.top1_word_is_title == 1.0
    assert mem.flagged > 0 and mem.flagged_cleared_by_deletion >= 0.5
    assert {s.name for s in result.sets} == {"memorized", "non-memorized", "novel"}


def test_info_answers_while_long_analyses_run(tiny_sd):
    """Analyses run one at a time (they share the model); the page's info stays available meanwhile."""
    import threading
    import time

    app = ExplainApp(tiny_sd, Threshold(1.0, "test"), ExplainConfig(generations=4), image_steps=400)
    server, url = start_server(app)
    try:
        results = []
        workers = [threading.Thread(target=lambda: results.append(_post(url + "api/analyze", {"prompt": f"a cat {i}"})))
                   for i in range(2)]
        for w in workers:
            w.start()
        deadline = time.time() + 30
        while not app._lock.locked() and time.time() < deadline:
            time.sleep(0.01)
        assert app._lock.locked()  # an analysis is running
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + "api/info", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["threshold"]["value"] == 1.0
        assert time.perf_counter() - t0 < 2.0 and app._lock.locked()  # answered before the analysis ended
        for w in workers:
            w.join(120)
        assert [status for status, _ in results] == [200, 200]
    finally:
        server.shutdown()
