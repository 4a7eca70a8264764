"""The detector interface: a detector is one file plus its registration; detect runs every requested
detector in the same pass, one field per method; roc reads any of them in the detector's direction."""

import json

import numpy as np
import pytest
import torch

from diffmem import detectors
from diffmem.cli.main import main
from diffmem.detect import detect_unit
from diffmem.files import read_rows
from diffmem.metrics import noise_norm
from diffmem.sampling import SamplingConfig, initial_noise, predict_branches, schedule

FAST = ["--num-inference-steps", "3", "--num-generations", "2", "--no-progress"]


class _UncondRecorder:
    def __init__(self):
        self.norms = []

    def on_step(self, step):
        self.norms.append(noise_norm(step.eps_uncond))


class UncondNorm:
    """A detector written against the interface only: the mean unconditional noise norm, with lower
    values meaning memorized (a direction roc must respect without flipping labels)."""

    name = "uncond-norm"
    higher_is_memorized = False

    def recorder(self, model, config):
        return _UncondRecorder()

    def fields(self, recorder, rows):
        return {self.name: float(torch.stack(recorder.norms, 1)[rows].double().mean())}

    def score_of(self, row, steps=None, generations=None):
        if steps is not None or generations is not None:
            raise ValueError("keeps no per-step values")
        return row[self.name]


@pytest.fixture()
def uncond_norm():
    detectors.register(UncondNorm)
    yield UncondNorm
    del detectors.DETECTORS[UncondNorm.name]


def test_registry_names_and_errors(uncond_norm):
    assert detectors.parse_methods(None) == ("wen",)
    assert detectors.parse_methods("wen, uncond-norm,wen") == ("wen", "uncond-norm")
    with pytest.raises(ValueError, match="unknown detection method 'ren'.*uncond-norm.*wen"):
        detectors.parse_methods("wen,ren")

    class Other(UncondNorm):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        detectors.register(Other)


def test_detectors_share_the_pass_and_keep_prompts_apart(tiny_sd, uncond_norm):
    """Two detectors, three prompts of G = 2 in one unit: each prompt's fields equal a computation
    from that prompt's own x_T and embedding alone."""
    config = SamplingConfig(num_inference_steps=4, track_steps=2, num_generations=2, batch_size=16, seed=3)
    prompts = ["a red square", "a blue circle", "a green triangle"]
    dets = [detectors.get_detector("wen"), detectors.get_detector("uncond-norm")]
    samples, fields = detect_unit(tiny_sd, dets, prompts, [0, 1, 2], config)
    t0 = schedule(tiny_sd, 4)[0]
    for j, prompt in enumerate(prompts):
        x = initial_noise(tiny_sd, 2, 3 + j)
        with torch.no_grad():
            e_c, e_u = predict_branches(tiny_sd, x, t0, tiny_sd.encode_prompts([prompt]).expand(2),
                                        tiny_sd.empty_conditioning().expand(2))
        wen, unc = fields[j]
        d0 = (e_c - e_u).flatten(1).norm(dim=1)
        assert np.allclose(np.array(wen["text_noise_norm"])[:, 0], d0.numpy(), atol=1e-5)
        assert wen["wen"] == pytest.approx(np.mean(wen["text_noise_norm"]))
        assert np.allclose(np.array(wen["text_noise_norm"]), samples[j].text_noise_norm.numpy(), atol=1e-6)
        # the second detector's value equals what Wen's stored arrays give independently
        assert unc["uncond-norm"] == pytest.approx(np.mean(wen["uncond_noise_norm"]), rel=1e-5)
        assert e_u.flatten(1).norm(dim=1).numpy() == pytest.approx(np.array(wen["uncond_noise_norm"])[:, 0], abs=1e-5)


def test_detect_and_roc_with_two_methods(tiny_sd_folder, tmp_path, uncond_norm, capsys):
    for name, prompts in (("a", ["a red square", "a blue circle"]), ("b", ["a green triangle", "a dog", "a cat"])):
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
        assert main(["detect", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / f"{name}.txt"),
                     "--out", str(tmp_path / f"{name}.jsonl"), "--method", "wen,uncond-norm", *FAST]) == 0
    rows = read_rows(tmp_path / "a.jsonl")
    for r in rows:
        assert r["score"] == r["wen"] and r["uncond-norm"] > 0
    meta = json.loads((tmp_path / "a.meta.json").read_text())
    assert meta["settings"]["methods"] == ["wen", "uncond-norm"]
    rows_b = read_rows(tmp_path / "b.jsonl")
    for method, sign in (("wen", 1), ("uncond-norm", -1)):
        js = tmp_path / f"roc-{method}.json"
        assert main(["roc", "--memorized", str(tmp_path / "a.jsonl"), "--non-memorized", str(tmp_path / "b.jsonl"),
                     "--method", method, "--json", str(js)]) == 0
        pos = [sign * r[method] for r in rows]
        neg = [sign * r[method] for r in rows_b]
        expected = np.mean([[p > n for n in neg] for p in pos])  # no ties with random weights
        assert json.loads(js.read_text())["auc"] == pytest.approx(expected)
    # a step window needs per-step values: a clear error naming the file, the row and the method
    assert main(["roc", "--memorized", str(tmp_path / "a.jsonl"), "--non-memorized", str(tmp_path / "b.jsonl"),
                 "--method", "uncond-norm", "--steps", "0:1"]) != 0
    assert "a.jsonl:1: method uncond-norm: keeps no per-step values" in capsys.readouterr().err


def test_unknown_method_fails_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a dog\n")
    code = main(["detect", "--model", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "o.jsonl"), "--method", "wen,nope"])
    assert code != 0 and "unknown detection method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_norm_order_is_the_originals_lp(tiny_sd_folder, tmp_path):
    """--norm-order 1: d is the L1 norm of eps_c - eps_u per generation, as the original's lp = 1."""
    from diffmem.adapters import load_model
    from diffmem.sampling import SamplingConfig, initial_noise, predict_branches, schedule

    (tmp_path / "p.txt").write_text("a red square\n")
    out = tmp_path / "l1.jsonl"
    assert main(["detect", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--norm-order", "1", "--track-steps", "1", *FAST]) == 0
    (row,) = read_rows(out)
    model = load_model(str(tiny_sd_folder))
    x = initial_noise(model, 2, 0)
    t = schedule(model, 3)[0]
    with torch.no_grad():
        e_c, e_u = predict_branches(model, x, t, model.encode_prompts(["a red square"]).expand(2),
                                    model.empty_conditioning().expand(2))
    np.testing.assert_allclose(np.array(row["text_noise_norm"])[:, 0], (e_c - e_u).flatten(1).abs().sum(1).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(np.array(row["uncond_noise_norm"])[:, 0], e_u.flatten(1).abs().sum(1).numpy(), rtol=1e-5)
    assert json.loads((tmp_path / "l1.meta.json").read_text())["settings"]["norm_order"] == 1.0
