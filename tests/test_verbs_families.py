"""Every verb that loads a model runs on the transformer families' tiny folders (PixArt, SD3, FLUX.1-dev,
FLUX.1-schnell) through the command line: detect, roc, explain, mitigate, evaluate, audit, bench detect,
bench mitigate, train, and the serve page's analysis. What differs per family is tested in its own file;
here each verb only has to run and write what it promises."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.cli.main import main
from diffmem.files import read_rows

FAMILIES = ("pixart", "sd3", "flux-dev", "flux-schnell")
FAST = ["--num-inference-steps", "2", "--num-generations", "1", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffmem.testing import make_tiny_flux_folder, make_tiny_pixart_folder, make_tiny_sd3_folder

    root = tmp_path_factory.mktemp("families")
    return {"pixart": make_tiny_pixart_folder(root / "pixart"), "sd3": make_tiny_sd3_folder(root / "sd3"),
            "flux-dev": make_tiny_flux_folder(root / "flux-dev"),
            "flux-schnell": make_tiny_flux_folder(root / "flux-schnell", dev=False)}


def _pairs(folder, colours):
    folder.mkdir()
    for i, (rgb, caption) in enumerate(colours):
        Image.fromarray(np.full((40, 40, 3), rgb, np.uint8)).save(folder / f"{i:08d}.png")
        (folder / f"{i:08d}.txt").write_text(caption + "\n")
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_every_verb_runs_on_the_family(folders, family, tmp_path):
    torch.set_num_threads(1)
    model = ["--model", str(folders[family]), "--device", "cpu"]
    (tmp_path / "m.txt").write_text("a red thing\na blue thing\n")
    (tmp_path / "n.txt").write_text("a green bird\ntwo dogs\nan old oak\n")
    pairs = _pairs(tmp_path / "pairs", [((255, 0, 0), "a red thing"), ((0, 0, 255), "a blue thing")])

    # detect (both sets) and roc over the stored rows
    for name in ("m", "n"):
        assert main(["detect", *model, "--prompts", str(tmp_path / f"{name}.txt"), "--out",
                     str(tmp_path / f"{name}.jsonl"), "--track-steps", "1", *FAST]) == 0
    assert all(r["score"] > 0 for r in read_rows(tmp_path / "m.jsonl"))
    assert main(["roc", "--memorized", str(tmp_path / "m.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl"),
                 "--json", str(tmp_path / "roc.json")]) == 0
    assert 0 <= json.loads((tmp_path / "roc.json").read_text())["auc"] <= 1

    # explain: the family's token sequence, the same first-step d as detect
    assert main(["explain", *model, "--prompt", "a red thing", "--json", str(tmp_path / "e.json"), "--no-png",
                 "--num-inference-steps", "2", "--num-generations", "1"]) == 0
    explained = json.loads((tmp_path / "e.json").read_text())
    assert explained["score"] == pytest.approx(read_rows(tmp_path / "m.jsonl")[0]["score"], rel=1e-4)

    # mitigate and evaluate against the pairs' training images
    assert main(["mitigate", *model, "--prompts", str(tmp_path / "m.txt"), "--method", "embedding-opt",
                 "--target-loss", "0", "--max-iters", "1", "--out", str(tmp_path / "mit"), *FAST]) == 0
    assert [r["iterations"] for r in read_rows(tmp_path / "mit" / "results.jsonl")] == [1, 1]
    assert main(["evaluate", *model, "--dataset", str(pairs), "--mitigation", "none", "rand-word-add",
                 "--copy-threshold", "0.9", "--out", str(tmp_path / "eval"), *FAST]) == 0
    assert set(json.loads((tmp_path / "eval" / "summary.json").read_text())["results"]) == {"none", "rand-word-add"}

    # audit with a given threshold: every prompt flagged at 0, its report written
    assert main(["audit", *model, "--prompts", str(tmp_path / "m.txt"), "--threshold", "0", "--out",
                 str(tmp_path / "audit"), "--num-inference-steps", "2", "--num-generations", "1", "--no-progress"]) == 0
    assert all(r["flagged"] for r in read_rows(tmp_path / "audit" / "results.jsonl"))
    assert (tmp_path / "audit" / "index.html").is_file()

    # bench detect (Wen's detector) and bench mitigate (two methods)
    assert main(["bench", "detect", *model, "--memorized", str(tmp_path / "m.txt"), "--non-memorized",
                 str(tmp_path / "n.txt"), "--methods", "wen", "--generations", "1", "--bootstrap", "5",
                 "--num-inference-steps", "2", "--out", str(tmp_path / "bd"), "--no-progress"]) == 0
    assert {r["method"] for r in json.loads((tmp_path / "bd" / "table.json").read_text())["rows"]} == {"wen"}
    assert main(["bench", "mitigate", *model, "--dataset", str(pairs), "--methods", "rand-word-add",
                 "--copy-threshold", "0.9", "--out", str(tmp_path / "bm"), *FAST]) == 0
    rows = json.loads((tmp_path / "bm" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows if r["status"] == "ok"] == ["none", *["rand-word-add"] * 4]

    # train: the original recipe on the pairs, two steps of IET-AGC (anti-gradient control, two shards)
    assert main(["train", *model, "--dataset", str(pairs), "--non-mem-dataset", str(pairs), "--end", "2",
                 "--repeats", "2", "--non-mem-ratio", "1", "--output-dir", str(tmp_path / "ft"), "--train-batch-size",
                 "2", "--max-train-steps", "2", "--learning-rate", "1e-4", "--center-crop", "--agc-ratio", "1.25",
                 "--ensemble-shards", "2", "--ensemble-rounds", "1"]) == 0
    last = read_rows(tmp_path / "ft" / "train_log.jsonl")[-1]
    assert (last["step"], last["round"], last["copy"]) == (2, 1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_serve_page_analyses_a_prompt_on_the_family(folders, family):
    from diffmem.adapters import load_model
    from diffmem.explain import ExplainConfig
    from diffmem.web.server import ExplainApp, Threshold, start_server

    model = load_model(str(folders[family]))
    app = ExplainApp(model, Threshold(0.0, "test"), ExplainConfig(generations=1, num_inference_steps=2), image_steps=2)
    server, url = start_server(app)
    try:
        request = urllib.request.Request(url + "api/analyze", data=json.dumps({"prompt": "a red thing"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            res = json.loads(r.read())
        assert res["verdict"] == "memorized" and res["score"] > 0 and res["tokens"]
        assert len(res["images"]) == 1
    finally:
        server.shutdown()
        server.server_close()
