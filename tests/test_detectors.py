"""The detector interface: a detector is one file plus its registration; detect runs every requested
detector in the same pass, one field per method; roc reads any of them in the detector's direction."""

import itertools
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

    def recorder(self, model, config, prompts):
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


# -- the field's detectors, each against an independent computation of its formula ---------------

ALL = ["wen", "ren-le", "ren-ae", "bright-ending", "membench", "jeon-fd", "jeon", "carlini"]
CFG = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=16, seed=5)
THREE = ["a red square", "a blue circle on a mat", "two green birds"]


@pytest.fixture(scope="module")
def all_fields(tiny_sd):
    """Every detector in one pass over three prompts (G = 2, one unit), and each prompt alone."""
    dets = [detectors.get_detector(n) for n in ALL]
    together = detect_unit(tiny_sd, dets, THREE, [0, 1, 2], CFG)[1]
    alone = [detect_unit(tiny_sd, dets, [p], [i], CFG)[1][0] for i, p in enumerate(THREE)]
    return {n: [f[k] for f in together] for k, n in enumerate(ALL)}, {n: [f[k] for f in alone] for k, n in enumerate(ALL)}


def test_one_pass_keeps_prompts_and_generations_apart(all_fields):
    together, alone = all_fields
    for name in ALL:
        for j in range(3):
            for key, value in together[name][j].items():
                np.testing.assert_allclose(value, alone[name][j][key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key} {j}")


def _trajectory(model, prompt, position, layers=None):
    """The prompt's own pass, recorded independently: every step's full attention maps and delta eps."""
    from diffmem.attention import CrossAttentionRecorder
    from diffmem.sampling import sample_unit

    class Delta:
        def __init__(self):
            self.delta = []

        def on_step(self, step):
            self.delta.append((step.eps_cond - step.eps_uncond).double())

    delta = Delta()
    with CrossAttentionRecorder(model, layers) as rec:
        sample = sample_unit(model, [prompt], [position], CFG, decode=True, recorders=[rec, delta])[0]
    return rec, delta.delta, sample


def _end_index(model, prompt):
    ids = model.tokenizer(prompt, padding="max_length", max_length=model.max_tokens, truncation=True).input_ids
    return ids.index(model.tokenizer.eos_token_id, 1)


def test_layer_roles_on_an_sd1_layout():
    from diffusers import UNet2DConditionModel

    from diffmem.attention import down_cross_attention_blocks
    from diffmem.detectors.ren import le_layer

    unet = UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8)  # SD 1.x's block layout
    model = type("M", (), {"unet": unet, "name": "sd1-layout"})()
    groups = down_cross_attention_blocks(model)
    assert [g[0].split(".attentions")[0] for g in groups] == ["down_blocks.0", "down_blocks.1", "down_blocks.2"]
    assert le_layer(model).startswith("down_blocks.1.attentions.1.")  # Ren et al.'s layer 3
    assert [n.split(".transformer")[0] for n in groups[0]] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1"]


def _ren_expected(model, prompt, position, end):
    """(LE, AE) of the prompt under CFG from its own recorded pass, the end token at `end`."""
    from diffmem.detectors.ren import le_layer

    rec, _, _ = _trajectory(model, prompt, position)
    a0 = rec.maps[0][le_layer(model)].double().mean(2).mean(1)  # (G, T): queries, then heads
    le = -(a0 * a0.log()).sum(-1)
    avg = {k: torch.stack([m.double().mean(2).mean(1) for m in rec.maps[k].values()]).mean(0) for k in rec.maps}
    ent = lambda a: -(a * a.log()).sum(-1)
    last = [1, 2, 3]  # fewer than 10 steps: all but the first
    e = torch.stack([ent(avg[k]) for k in last]).mean(0)
    e_end = torch.stack([ent(avg[k][:, end:]) for k in last]).mean(0) - ent(avg[0][:, end:])
    return float(le.mean()), float((e + e_end).mean())


def _bright_ending_expected(model, prompt, position, end):
    """Bright Ending of the prompt under CFG from its own recorded pass, the end token at `end`."""
    from diffmem.attention import down_cross_attention_blocks

    layers = down_cross_attention_blocks(model)[0]
    rec, delta, _ = _trajectory(model, prompt, position, layers)
    probs = torch.stack([rec.maps[3][l].double().mean(1) for l in layers]).mean(0)  # (G, HW, T)
    side = int(probs.shape[1] ** 0.5)
    mask = probs[:, :, end].view(-1, 1, side, side)
    mask = torch.nn.functional.interpolate(mask, size=delta[0].shape[-2:], mode="nearest")
    be = torch.stack([(d * mask).flatten(1).norm(dim=1) / mask.flatten(1).mean(1) for d in delta]).mean(0)
    return float(be.mean())


def test_ren_le_and_ae(tiny_sd, all_fields):
    together, _ = all_fields
    for j, prompt in enumerate(THREE):
        le, ae = _ren_expected(tiny_sd, prompt, j, _end_index(tiny_sd, prompt))
        assert together["ren-le"][j]["ren-le"] == pytest.approx(le, rel=1e-6)
        assert together["ren-ae"][j]["ren-ae"] == pytest.approx(ae, rel=1e-6)


def test_bright_ending(tiny_sd, all_fields):
    together, _ = all_fields
    for j, prompt in enumerate(THREE):
        be = _bright_ending_expected(tiny_sd, prompt, j, _end_index(tiny_sd, prompt))
        assert together["bright-ending"][j]["bright-ending"] == pytest.approx(be, rel=1e-6)


def test_end_token_by_position_when_the_pad_is_a_prompt_token(tiny_sd2):
    """SD 2.x pads with "!": a "!" of the prompt has the pad's id, yet the end token is where the
    prompt's tokens end (the official ``len(tokenizer.encode(p)) - 1``), for the token list, the
    end-token lookup, Ren's AE and Bright Ending's mask."""
    from diffmem.detectors.common import end_token_index

    tok, prompt = tiny_sd2.tokenizer, "wow! a red cat!"
    ids = tok(prompt).input_ids
    assert tok.pad_token_id == tok.convert_tokens_to_ids("!") and tok.pad_token_id in ids[1:-1]  # the case at stake
    end = len(tok(prompt, truncation=True, max_length=tiny_sd2.max_tokens).input_ids) - 1
    assert [j for j, t in enumerate(tiny_sd2.tokens(prompt)) if t.special] == [0, *range(end, tiny_sd2.max_tokens)]
    assert end_token_index(tiny_sd2, prompt) == end
    ae, be = detect_unit(tiny_sd2, [detectors.get_detector("ren-ae"), detectors.get_detector("bright-ending")],
                         [prompt], [0], CFG)[1][0]
    assert ae["ren-ae"] == pytest.approx(_ren_expected(tiny_sd2, prompt, 0, end)[1], rel=1e-6)
    assert be["bright-ending"] == pytest.approx(_bright_ending_expected(tiny_sd2, prompt, 0, end), rel=1e-6)


def test_membench_and_jeon_fd(tiny_sd, all_fields):
    together, _ = all_fields
    t0 = schedule(tiny_sd, CFG.num_inference_steps)[0]
    for j, prompt in enumerate(THREE):
        x = initial_noise(tiny_sd, 2, CFG.seed + j)
        cond = tiny_sd.encode_prompts([prompt]).embeddings.expand(2, -1, -1)
        unc = tiny_sd.empty_conditioning().embeddings.expand(2, -1, -1)
        eps = lambda x, t, e: tiny_sd.unet(x, t, encoder_hidden_states=e).sample
        with torch.no_grad():
            d999 = eps(x, 999, cond) - eps(x, 999, unc)
            delta = eps(x, t0, cond) - eps(x, t0, unc)
            v = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            moved = eps(x + v, t0, cond) - eps(x + v, t0, unc)
        assert together["membench"][j]["membench"] == pytest.approx(float(d999.pow(2).flatten(1).sum(1).mean()), rel=1e-5)
        assert together["jeon-fd"][j]["jeon-fd"] == pytest.approx(float((moved - delta).flatten(1).norm(dim=1).mean()),
                                                                   rel=1e-4)


def test_carlini(tiny_sd, all_fields):
    together, _ = all_fields
    for j, prompt in enumerate(THREE):
        _, _, sample = _trajectory(tiny_sd, prompt, j)
        a, b = sample.images.double()
        side = a.shape[-1] // 4
        tiles = lambda x: [x[:, r * side:(r + 1) * side, c * side:(c + 1) * side] for r in range(4) for c in range(4)]
        d = max(float((ta - tb).pow(2).mean().sqrt()) for ta, tb in zip(tiles(a), tiles(b)))
        assert together["carlini"][j]["carlini"] == pytest.approx(d, rel=1e-6)  # one pair: its median is itself


def test_settings_a_detector_cannot_run_under_are_refused(tiny_sd_folder, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a dog\n")
    base = ["detect", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / "p.txt"), "--no-progress",
            "--num-inference-steps", "3"]
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--method", "wen,ren-ae", "--track-steps", "1"]) == 2
    assert "ren-ae needs the whole trajectory" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b.jsonl"), "--method", "carlini", "--num-generations", "1"]) == 2
    assert "carlini needs at least 2 generations" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c.jsonl"), "--method", "ren-le,membench,jeon-fd", "--track-steps", "1",
                 "--num-generations", "2"]) == 0
    row = read_rows(tmp_path / "c.jsonl")[0]
    assert row["score"] == row["ren-le"] and {"membench", "jeon-fd"} <= set(row)


def test_jeon_hessian_score_equals_a_float64_finite_difference(tiny_sd):
    """The JVP of the detector against a central finite difference of the same product in float64."""
    import copy

    from diffmem.detectors.jeon import hessian_score

    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, track_steps=1, seed=2)
    (fields,) = detect_unit(tiny_sd, [detectors.get_detector("jeon")], ["a red cat on a mat"], [0], cfg)[1]
    unet64 = copy.deepcopy(tiny_sd.unet).double()
    t = schedule(tiny_sd, 4)[0]
    x = initial_noise(tiny_sd, 2, 2).double()
    cond = tiny_sd.encode_prompts(["a red cat on a mat"]).embeddings.double().expand(2, -1, -1)
    unc = tiny_sd.empty_conditioning().embeddings.double().expand(2, -1, -1)
    sigma = float((1 - tiny_sd.scheduler.alphas_cumprod[int(t)].double()).sqrt())
    delta = lambda x: (unet64(x, t, encoder_hidden_states=cond).sample - unet64(x, t, encoder_hidden_states=unc).sample)
    with torch.no_grad():
        v = -delta(x) / sigma
        h = 1e-4
        fd = (delta(x + h * v) - delta(x - h * v)) / (2 * h)
    expected = (fd / sigma).flatten(1).norm(dim=1)
    np.testing.assert_allclose(fields[0]["jeon_per_generation"], expected.numpy(), rtol=1e-3)
    assert fields[0]["jeon"] > 0


def test_bench_detect_writes_the_table(tiny_sd_folder, tmp_path, capsys):
    """bench detect on a tiny model: every detector at the settings it is defined for, metrics that
    equal roc's on the same rows, costs, ROC figures."""
    from diffmem.metrics import roc_metrics

    (tmp_path / "m.txt").write_text("a red square\na blue circle\nthe owl\n")
    (tmp_path / "n.txt").write_text("a green bird\na cat\ntwo dogs\na house\n")
    out = tmp_path / "bench"
    assert main(["bench", "detect", "--model", str(tiny_sd_folder), "--memorized", str(tmp_path / "m.txt"),
                 "--non-memorized", str(tmp_path / "n.txt"), "--generations", "1,2", "--num-inference-steps", "3",
                 "--bootstrap", "10", "--out", str(out), "--no-progress"]) == 0
    table = json.loads((out / "table.json").read_text())
    got = {(r["method"], r["steps"], r["generations"]) for r in table["rows"]}
    assert ("carlini", "all", 2) in got and ("carlini", "all", 1) not in got  # needs two generations
    assert ("ren-le", "first", 1) in got and ("ren-le", "all", 1) not in got  # taken at the first step only
    assert ("ren-ae", "first", 1) not in got and ("wen", "first", 1) in got and ("wen", "all", 1) in got
    row = next(r for r in table["rows"] if (r["method"], r["steps"], r["generations"]) == ("wen", "first", 2))
    pos = [r["wen"] for r in read_rows(out / "runs" / "g2-first" / "memorized.jsonl")]
    neg = [r["wen"] for r in read_rows(out / "runs" / "g2-first" / "non-memorized.jsonl")]
    assert row["auc"] == pytest.approx(roc_metrics(pos, neg).auc)
    assert row["tpr_at_1fpr_closest"] == roc_metrics(pos, neg).tpr_at_1fpr_closest  # both rules, as roc reads them
    assert "| TPR@1%FPR [95% CI] | TPR@1%FPR closest point [95% CI] |" in (out / "table.md").read_text()
    assert row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1] and row["unet_rows_per_prompt"] == 4
    carlini = next(r for r in table["rows"] if r["method"] == "carlini")
    assert carlini["higher_is_memorized"] is False and carlini["unet_rows_per_prompt"] == 2 * 2 * 3
    assert (out / "table.md").read_text().startswith("| method |") and len(list((out / "roc").glob("*.png"))) == len(got)
    # without the cost columns (large models): the same metrics
    assert main(["bench", "detect", "--model", str(tiny_sd_folder), "--memorized", str(tmp_path / "m.txt"),
                 "--non-memorized", str(tmp_path / "n.txt"), "--generations", "2", "--steps", "first",
                 "--methods", "wen", "--num-inference-steps", "3", "--bootstrap", "10", "--timing-prompts", "0",
                 "--out", str(tmp_path / "b2"), "--no-progress"]) == 0
    (fast,) = json.loads((tmp_path / "b2" / "table.json").read_text())["rows"]
    assert fast["unet_rows_per_prompt"] is None and fast["auc"] == row["auc"]


def test_asthana_on_sd_uses_the_published_weights(tiny_sd):
    """M = 1 * norm + 2 * cos on an SD 1.x-type (epsilon) model; cos from a second call at timesteps[-3]."""
    cfg = SamplingConfig(num_inference_steps=5, num_generations=2, batch_size=8, track_steps=1, seed=4)
    (f,) = detect_unit(tiny_sd, [detectors.get_detector("asthana")], ["a red cat"], [0], cfg)[1][0]
    ts = schedule(tiny_sd, 5)
    x = initial_noise(tiny_sd, 2, 4)
    cond = tiny_sd.encode_prompts(["a red cat"]).embeddings.expand(2, -1, -1)
    unc = tiny_sd.empty_conditioning().embeddings.expand(2, -1, -1)
    eps = lambda t, e: tiny_sd.unet(x, t, encoder_hidden_states=e).sample.double()
    with torch.no_grad():
        norm = (eps(ts[0], cond) - eps(ts[0], unc)).flatten(1).norm(dim=1)
        u, c = eps(ts[-3], unc), eps(ts[-3], cond)
        d = c - u
        cos = ((u * d).sum(1) / (u.norm(dim=1) * d.norm(dim=1))).flatten(1).mean(1)
    assert f["asthana_weights"] == [1.0, 2.0]
    np.testing.assert_allclose(f["asthana_per_generation"], (norm + 2 * cos).numpy(), rtol=1e-5)
    given = detectors.get_detector("asthana", asthana_weights=(2.0, 1.0))
    (g,) = detect_unit(tiny_sd, [given], ["a red cat"], [0], cfg)[1][0]
    np.testing.assert_allclose(g["asthana_per_generation"], (2 * norm + cos).numpy(), rtol=1e-5)


def test_asthana_weights_derived_from_the_labs_reference_prompts():
    """No published weights for the lab: g2 = std(norm) / std(cos) over its reference prompts."""
    from diffmem.adapters import load_model
    from diffmem.lab.prompts import own_reference_prompts

    lab = load_model("lab")
    cfg = SamplingConfig(num_inference_steps=50, num_generations=1, batch_size=64, track_steps=1)
    det = detectors.get_detector("asthana")
    g1, g2 = det.resolve_weights(lab, cfg)
    reference = own_reference_prompts(lab)
    (fields,) = zip(*detect_unit(lab, [detectors.get_detector("asthana", asthana_weights=(1.0, 0.0))],
                                 reference[:64], list(range(64)), cfg)[1])
    norms = torch.tensor([v for f in fields for v in f["asthana_norm"]], dtype=torch.float64)
    coss = torch.tensor([v for f in fields for v in f["asthana_cos"]], dtype=torch.float64)
    assert g1 == 1.0 and g2 > 0
    # on the first 64 reference prompts the ratio of spreads is close to the one over all of them
    assert g2 == pytest.approx(float(norms.std() / coss.std()), rel=0.5)


def test_ssim_and_ms_ssim_equal_torchmetrics():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from diffmem.similarity import ms_ssim, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 4, 64, 64, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(6, 4, 64, 64, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ms_ssim(a, b), tm_ms_ssim(a, b, reduction="none", kernel_size=11, betas=(0.33, 0.33, 0.33)),
                               rtol=1e-7, atol=1e-7)
    c, d = a[:, :3, :16, :16], b[:, :3, :16, :16]
    torch.testing.assert_close(ssim(c, d, sigma=1.0), tm_ssim(c, d, reduction="none", sigma=1.0), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="over 40 pixels"):
        ms_ssim(c, d)


def _ms_ssim_as_torchmetrics_1_3(a, b, betas=(0.33, 0.33, 0.33), sigma=1.5):
    """MS-SSIM as torchmetrics 1.3.2 (the version NeMo's requirements.txt pins) computes it, written
    in numpy from its definition: per scale, reflect padding by the window's half side, a separable
    Gaussian filter (window int(3.5 sigma + 0.5) * 2 + 1), k1 = 0.01, k2 = 0.03 on the batch's data
    range, variances clipped at 0, both the SSIM and the CS map averaged without the padded border;
    CS of every scale but the last, SSIM of the last, each clipped at 0, raised to its beta and
    multiplied; 2x2 average pooling between scales."""
    a, b = a.double().numpy(), b.double().numpy()
    k = int(3.5 * sigma + 0.5) * 2 + 1
    pad = k // 2
    g = np.exp(-((np.arange(k) - pad) ** 2) / (2 * sigma ** 2))
    g /= g.sum()

    def blur(img):
        H, W = img.shape[-2:]
        padded = np.pad(img, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        rows = sum(g[i] * padded[..., i:i + H, :] for i in range(k))
        return sum(g[j] * rows[..., :, j:j + W] for j in range(k))

    def inner_mean(m):
        return np.maximum(m[..., pad:-pad, pad:-pad].reshape(len(m), -1).mean(1), 0)

    terms = []
    for _ in betas:
        data_range = max(np.ptp(a), np.ptp(b))
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = np.maximum(blur(a * a) - mu_a ** 2, 0), np.maximum(blur(b * b) - mu_b ** 2, 0)
        cov = blur(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        sim = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs
        terms.append(inner_mean(cs))
        last = inner_mean(sim)
        N, C, H, W = a.shape
        a = a.reshape(N, C, H // 2, 2, W // 2, 2).mean((3, 5))
        b = b.reshape(N, C, H // 2, 2, W // 2, 2).mean((3, 5))
    terms[-1] = last
    return np.prod([t ** beta for t, beta in zip(terms, betas)], axis=0)


def test_nemo_ssim_uses_the_ms_ssim_of_nemos_torchmetrics_by_default():
    """NeMo's 0.428 was set under torchmetrics 1.3.2, which averaged the last scale's SSIM map without
    its border; torchmetrics >= 1.5 averages the whole map. nemo-ssim follows 1.3.2 unless told."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    from diffmem.detectors.nemo import max_pairwise_similarity, paired_similarity
    from diffmem.similarity import ms_ssim

    g = torch.Generator().manual_seed(1)
    smooth = lambda n: torch.nn.functional.avg_pool2d(torch.rand(n, 4, 72, 72, generator=g, dtype=torch.float64),
                                                      9, stride=1)  # (n, 4, 64, 64), correlated like z
    a = smooth(5)
    b = (a + 0.5 * smooth(5)) / 1.5
    expected = _ms_ssim_as_torchmetrics_1_3(a, b)
    np.testing.assert_allclose(ms_ssim(a, b, crop_ssim_map=True).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(paired_similarity(a, b).numpy(), expected, rtol=1e-9)  # the default: NeMo's
    current = tm_ms_ssim(a, b, reduction="none", kernel_size=11, betas=(0.33, 0.33, 0.33))
    torch.testing.assert_close(paired_similarity(a, b, "torchmetrics"), current, rtol=1e-7, atol=1e-7)
    assert (paired_similarity(a, b) - current).abs().max() > 1e-3  # the two conventions differ here
    z = torch.cat([a[:3], b[:1]])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert max_pairwise_similarity(z) == pytest.approx(
        float(_ms_ssim_as_torchmetrics_1_3(z[[i for i, _ in pairs]], z[[j for _, j in pairs]]).max()), rel=1e-9)
    assert detectors.get_detector("nemo-ssim").ssim_convention == "nemo"
    assert detectors.get_detector("nemo-ssim", ssim_convention="torchmetrics").ssim_convention == "torchmetrics"
    with pytest.raises(ValueError, match="ssim_convention"):
        detectors.get_detector("nemo-ssim", ssim_convention="skimage")


def test_nemo_ssim_is_the_largest_pairwise_similarity_of_scaled_predictions(tiny_sd):
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    cfg = SamplingConfig(num_inference_steps=5, num_generations=3, batch_size=8, track_steps=1, seed=6)
    (f,) = detect_unit(tiny_sd, [detectors.get_detector("nemo-ssim")], ["a red cat"], [0], cfg)[1][0]
    t = schedule(tiny_sd, 5)[1]
    x = initial_noise(tiny_sd, 3, 6)
    with torch.no_grad():
        eps = tiny_sd.unet(x, t, encoder_hidden_states=tiny_sd.encode_prompts(["a red cat"]).embeddings.expand(3, -1, -1)).sample
    z = (eps - x).double()
    z = (z - z.amin((2, 3), keepdim=True)) / (z.amax((2, 3), keepdim=True) - z.amin((2, 3), keepdim=True))
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = max(float(tm_ssim(z[[i]], z[[j]], sigma=1.0, data_range=max(float(z[[i, j]].max() - z[[i, j]].min()), 0)))
                   for i, j in pairs)
    # our data range is taken over the batch of all pairs, as NeMo's call does; here every channel spans [0, 1]
    assert f["nemo-ssim"] == pytest.approx(expected, rel=1e-6)


def test_every_detector_on_a_v_prediction_model(tiny_v_folder, tmp_path):
    """On a velocity model every detector reads the noise (the spine's conversion), finite values."""
    import math

    folder = tiny_v_folder
    (tmp_path / "p.txt").write_text("a red square\nthe owl\n")
    out = tmp_path / "d.jsonl"
    names = sorted(set(detectors.DETECTORS) - {"flux-guidance"})  # FLUX.1-dev only
    assert main(["detect", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--method", ",".join(names), "--reference-prompts", str(tmp_path / "p.txt"), *FAST]) == 0
    for row in read_rows(out):
        assert all(math.isfinite(row[n]) for n in names)
        assert row["asthana_weights"] == [1.0, 0.1]  # SD 2.x's published weights


def _channel_cosines_by_hand(u, w):
    """(G,) the cosine of u and w over the channels at each pixel, averaged over the pixels, by a loop."""
    G, C, H, W = u.shape
    out = []
    for g in range(G):
        total = 0.0
        for i in range(H):
            for j in range(W):
                a, b = u[g, :, i, j].tolist(), w[g, :, i, j].tolist()
                dot = sum(p * q for p, q in zip(a, b))
                total += dot / (sum(p * p for p in a) ** 0.5 * sum(q * q for q in b) ** 0.5)
        out.append(total / (H * W))
    return np.array(out)


def test_asthana_on_v_prediction_takes_the_official_velocity_space(tiny_sd2, tmp_path, tiny_sd2_folder):
    """On a v-prediction model, as the official SD 2 code (``pipe.py``, ``sd_ver == 2``): the cosine on
    the second call's raw velocities, cos(v_u, v_c - v_u), and the norm sqrt(a) ||v_c - v_u|| / sigma^2
    at t_1; with ``asthana_space="noise"`` both on the noise eps = sqrt(a) v + sigma x."""
    cfg = SamplingConfig(num_inference_steps=5, num_generations=2, batch_size=8, track_steps=1, seed=4)
    model, prompt = tiny_sd2, "a red cat"
    ts = schedule(model, 5)
    x = initial_noise(model, 2, 4)
    cond = model.encode_prompts([prompt]).embeddings.expand(2, -1, -1)
    unc = model.empty_conditioning().embeddings.expand(2, -1, -1)
    # the raw UNet outputs of one CFG call (x_T twice, unconditional rows first), float32, as theirs
    cfg_call = lambda t: model.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([unc, cond])).sample.chunk(2)
    a1, a2 = (float(model.scheduler.alphas_cumprod[int(t)]) for t in (ts[0], ts[-3]))
    with torch.no_grad():
        v_u1, v_c1 = cfg_call(ts[0])
        dv1 = (v_c1 - v_u1).double()
        v_u, v_c = cfg_call(ts[-3])
    norm = (a1 ** 0.5 * dv1 / (1 - a1)).flatten(1).norm(dim=1).numpy()  # official: (beta v - x) / beta_prod**2
    cos = _channel_cosines_by_hand(v_u.double(), (v_c - v_u).double())
    (f,) = detect_unit(model, [detectors.get_detector("asthana")], [prompt], [0], cfg)[1][0]
    assert f["asthana_weights"] == [1.0, 0.1] and f["asthana_space"] == "official"
    np.testing.assert_allclose(f["asthana_norm"], norm, rtol=1e-5)
    np.testing.assert_allclose(f["asthana_cos"], cos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["asthana_per_generation"], norm + 0.1 * cos, rtol=1e-5)
    # the noise-space choice: the same two terms on eps = sqrt(a) v + sigma x
    eps = lambda out, a: a ** 0.5 * out + (1 - a) ** 0.5 * x
    noise_norm = (a1 ** 0.5 * dv1).flatten(1).norm(dim=1).numpy()
    noise_cos = _channel_cosines_by_hand(eps(v_u, a2).double(), (eps(v_c, a2) - eps(v_u, a2)).double())
    (g,) = detect_unit(model, [detectors.get_detector("asthana", asthana_space="noise")], [prompt], [0], cfg)[1][0]
    assert g["asthana_space"] == "noise"
    np.testing.assert_allclose(g["asthana_norm"], noise_norm, rtol=1e-5)
    np.testing.assert_allclose(g["asthana_cos"], noise_cos, rtol=1e-5, atol=1e-6)  # float32 conversion rounding
    assert not np.allclose(noise_cos, cos, rtol=1e-3)  # the two spaces do differ here
    # and from the command line, recorded in the run's settings
    (tmp_path / "p.txt").write_text(prompt + "\n")
    out = tmp_path / "n.jsonl"
    assert main(["detect", "--model", str(tiny_sd2_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--method", "asthana", "--asthana-space", "noise", "--num-inference-steps", "5",
                 "--num-generations", "2", "--seed", "4", "--track-steps", "1", "--no-progress"]) == 0
    (row,) = read_rows(out)
    np.testing.assert_allclose(row["asthana_cos"], g["asthana_cos"], rtol=1e-6)
    assert json.loads((tmp_path / "n.meta.json").read_text())["settings"]["asthana_space"] == "noise"
    with pytest.raises(ValueError, match="--asthana-space 'velocity': expected one of official, noise"):
        detectors.get_detector("asthana", asthana_space="velocity")
    # and in bench detect, whose memorized prompt 0 starts from --seed
    (tmp_path / "n.txt").write_text("a green bird\n")
    assert main(["bench", "detect", "--model", str(tiny_sd2_folder), "--memorized", str(tmp_path / "p.txt"),
                 "--non-memorized", str(tmp_path / "n.txt"), "--methods", "asthana", "--asthana-space", "noise",
                 "--generations", "2", "--steps", "first", "--num-inference-steps", "5", "--seed", "4",
                 "--bootstrap", "2", "--timing-prompts", "0", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    (bench_row,) = read_rows(tmp_path / "b" / "runs" / "g2-first" / "memorized.jsonl")
    assert bench_row["asthana_space"] == "noise"
    np.testing.assert_allclose(bench_row["asthana_cos"], g["asthana_cos"], rtol=1e-6)


# -- detectors combine in any order ---------------------------------------------------------------

NAMES = sorted(set(detectors.DETECTORS) - {"flux-guidance"})  # every detector the tiny SD runs
REFERENCE = ["a blue car", "two ships at sea", "an old oak tree"]  # broken-memories' calibration
# 3 steps: asthana's second call is at timesteps[-3]; G = 3 on one prompt: an odd number of pass rows,
# as in `detect --method bright-ending,nemo-ssim --num-generations 3`
PAIR_CFG = SamplingConfig(num_inference_steps=3, num_generations=3, batch_size=16, seed=1)


def _pair_fields(model, names):
    return detect_unit(model, [detectors.get_detector(n, reference_prompts=REFERENCE) for n in names], ["a red cat"], [0],
                       PAIR_CFG)[1][0]


@pytest.fixture(scope="module")
def fields_alone(tiny_sd):
    return {n: _pair_fields(tiny_sd, [n])[0] for n in NAMES}


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)), ids="+".join)
def test_detectors_combine_in_any_order(tiny_sd, fields_alone, pair):
    """Each detector of a pair, in either order, gives exactly what it gives alone: the attention
    recorders capture only the pass's own UNet calls, never those other detectors make at a step."""
    for order in (pair, pair[::-1]):
        for name, got in zip(order, _pair_fields(tiny_sd, order)):
            assert got == fields_alone[name], f"{name} in --method {','.join(order)}"
