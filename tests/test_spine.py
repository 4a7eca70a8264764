"""One model interface and one tracked pass: the same number from every verb, on every prediction type."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffmem.explain import ExplainConfig, prompt_scores, token_significance
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.prompts import PromptRecord
from diffmem.sampling import SamplingConfig, sample_prompts, window_scores

torch.set_num_threads(1)
PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square", "an astronaut riding a horse"]
G, STEPS, SEED = 2, 5, 3


def _detect_scores(model, tmp_path, prompts=PROMPTS, batch_size=16):
    from diffmem.detect import run_detection
    from diffmem.files import read_rows

    records = [PromptRecord(i, p) for i, p in enumerate(prompts)]
    cfg = SamplingConfig(num_inference_steps=STEPS, num_generations=G, seed=SEED, track_steps=1, batch_size=batch_size)
    out = run_detection(model, records, tmp_path / "det.jsonl", cfg, progress=False)
    return np.array([r["score"] for r in read_rows(out)])


def test_first_step_d_is_the_same_from_every_verb(tiny_sd, tmp_path):
    """detect, explain (scores and gradients), mitigate, evaluate's calibration and the tracked pass
    give the prompt at position i the same first-step d (1e-6)."""
    from diffmem.evaluate import calibrate_target_loss

    detect = _detect_scores(tiny_sd, tmp_path)
    (tmp_path / "b2").mkdir()
    assert len(set(detect.round(6))) == len(PROMPTS)  # different prompts, different d: the check is not vacuous
    sampling = SamplingConfig(num_inference_steps=STEPS, num_generations=G, seed=SEED)
    explain = ExplainConfig(steps=(0, 1), generations=G, seed=SEED, num_inference_steps=STEPS)
    verbs = {
        "pass": window_scores(tiny_sd, PROMPTS, sampling, (0, 1)),
        "explain.prompt_scores": np.array(prompt_scores(tiny_sd, PROMPTS, explain)),
        "explain.token_significance": np.array([token_significance(tiny_sd, p, explain, position=i).score
                                                for i, p in enumerate(PROMPTS)]),
        "mitigate": np.array([m.initial_d for m in mitigate_unit(tiny_sd, PROMPTS, [0, 1, 2], MitigationConfig("none"),
                                                                 sampling, decode=False)]),
        "detect, batch 2": _detect_scores(tiny_sd, tmp_path / "b2", batch_size=2),
    }
    for name, d in verbs.items():
        np.testing.assert_allclose(d, detect, rtol=0, atol=1e-6, err_msg=name)
    median = calibrate_target_loss(tiny_sd, PROMPTS, sampling, percentiles=(50,), unit="mean")[50.0]
    assert median == pytest.approx(float(np.median(detect)), abs=1e-6)


def test_audit_scores_explanations_and_serve_threshold_agree(tiny_sd, tmp_path):
    """An audit row's score equals its explanation score; serve and audit calibrated on the same
    reference prompts give the same threshold."""
    from diffmem.audit import AuditConfig, run_audit
    from diffmem.prompts import PromptSet
    from diffmem.web.server import calibrate_threshold

    reference = ["a photo of a dog", "a small house", "green grass", "a bowl of fruit", "a city street at night"]
    config = AuditConfig(fpr=0.5, sampling=SamplingConfig(num_generations=G, num_inference_steps=STEPS, seed=SEED,
                                                          batch_size=8),
                         mitigation=MitigationConfig(target_loss=1e6))  # no optimization: fast
    audited = PromptSet([PromptRecord(i, p) for i, p in enumerate(PROMPTS)], "test")
    ref = PromptSet([PromptRecord(i, p) for i, p in enumerate(reference)], "reference")
    result = run_audit(tiny_sd, audited, ref, config, tmp_path, progress=False)
    flagged = [r for r in result.rows if r.flagged]
    assert flagged, "choose prompts so that the audit flags some"
    for r in flagged:
        assert r.explanation_score == pytest.approx(r.score, abs=1e-6), r.prompt
    served = calibrate_threshold(tiny_sd, reference, ExplainConfig(generations=G, seed=SEED, num_inference_steps=STEPS),
                                 fpr=0.5)
    assert served.value == pytest.approx(result.threshold["value"], abs=1e-6)


def test_lab_serve_and_audit_calibrate_on_the_same_reference_prompts():
    """On the shipped lab, serve's default threshold is the audit's: same prompts, seeds and settings."""
    from diffmem.adapters import load_model
    from diffmem.audit import AuditConfig, calibrate
    from diffmem.lab.prompts import lab_audit_prompts
    from diffmem.web.server import lab_reference_threshold

    lab = load_model("lab")
    _, reference = lab_audit_prompts(lab.training_data())
    config = AuditConfig()
    scores = window_scores(lab, [r.prompt for r in reference.records], config.sampling, (0, 1),
                           positions=[r.position for r in reference.records])
    audit = calibrate(config, scores.tolist(), reference.source)
    served = lab_reference_threshold(lab, ExplainConfig(batch_size=64))
    assert served.value == pytest.approx(audit["value"], abs=1e-6)
    assert served.num_reference == len(reference.records)


# -- v-prediction ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_v(tiny_v_folder):
    from diffmem.adapters import load_model

    return load_model(str(tiny_v_folder))


def test_v_prediction_d_is_the_noise_difference(tiny_v, tiny_v_folder):
    """d from diffmem equals ||eps_c - eps_u|| with eps = sqrt(a) v + sqrt(1 - a) x_t computed here from
    the raw velocities, and differs from the seed's raw-output norm ||v_c - v_u|| by sqrt(a)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    assert tiny_v.prediction_type == "v_prediction"
    unet = UNet2DConditionModel.from_pretrained(tiny_v_folder / "unet")
    sched = DDIMScheduler.from_pretrained(tiny_v_folder / "scheduler")
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    a = sched.alphas_cumprod[t].double()
    res = sample_prompts(tiny_v, PROMPTS[:2], SamplingConfig(num_inference_steps=STEPS, num_generations=G, seed=SEED,
                                                              track_steps=1), decode=False)
    for i, (prompt, r) in enumerate(zip(PROMPTS, res)):
        x = torch.randn((G, *tiny_v.latent_shape), generator=torch.Generator("cpu").manual_seed(SEED + i))
        x = x * sched.init_noise_sigma
        with torch.no_grad():
            v_c = unet(x, t, encoder_hidden_states=tiny_v.encode_prompts([prompt]).embeddings.expand(G, -1, -1)).sample
            v_u = unet(x, t, encoder_hidden_states=tiny_v.encode_prompts([""]).embeddings.expand(G, -1, -1)).sample
        eps = lambda v: a.sqrt() * v.double() + (1 - a).sqrt() * x.double()
        d = (eps(v_c) - eps(v_u)).flatten(1).norm(dim=1)
        torch.testing.assert_close(r.text_noise_norm[:, 0].double(), d, rtol=1e-5, atol=1e-7)
        raw = (v_c - v_u).flatten(1).norm(dim=1).double()
        torch.testing.assert_close(d, a.sqrt() * raw, rtol=1e-5, atol=1e-7)
        assert (raw > 5 * d).all()  # at the first step sqrt(a) ~ 0.08: raw outputs are another scale


def test_v_prediction_sampling_equals_the_pipeline(tiny_v, tiny_v_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_v_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    cfg = SamplingConfig(num_inference_steps=6, guidance_scale=7.5, num_generations=3, seed=11, batch_size=6)
    ours = sample_prompts(tiny_v, PROMPTS[:2], cfg, decode=False)
    for i, prompt in enumerate(PROMPTS[:2]):
        ref = pipe(prompt, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=3,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
        assert (ref - ours[i].latents).abs().max().item() <= 1e-5


def test_v_prediction_training_regresses_the_velocity(tiny_v_folder, tmp_path):
    """One training step's logged loss equals MSE(unet(x_t), v) with v = sqrt(a) eps - sqrt(1 - a) x0 computed
    here from the same draws (the trainer's seeded generator), as diffusers' train_text_to_image.py does."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffmem.adapters import load_model
    from diffmem.train import ImagePairs, TrainConfig, train

    model = load_model(str(tiny_v_folder))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    captions = ["a red cat", "a blue dog", "a green frog", "a white swan"]
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_train_steps=1, train_batch_size=4, learning_rate=1e-4,
                         log_every=1, seed=0)
    train(model, ImagePairs(images, captions), config, progress=False)
    logged = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])["loss"]

    # The same draws, in the trainer's order: batch permutation, dropout, VAE sample, noise, timesteps.
    fresh = load_model(str(tiny_v_folder))
    unet = UNet2DConditionModel.from_pretrained(tiny_v_folder / "unet")
    ddpm = DDPMScheduler.from_pretrained(tiny_v_folder / "scheduler")
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    x_img = images[perm] * 2 - 1
    caps = [captions[int(i)] for i in perm]
    gen = torch.Generator().manual_seed(0)
    torch.rand(4, generator=gen)  # caption dropout draw (dropout 0)
    with torch.no_grad():
        x0 = fresh.vae.encode(x_img).latent_dist.sample(generator=gen) * fresh.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        a = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        out = unet(x_t, t, encoder_hidden_states=fresh.encode_prompts(caps).embeddings).sample
    assert logged == pytest.approx(float(((out - v) ** 2).mean()), rel=1e-4)
    assert logged != pytest.approx(float(((out - noise) ** 2).mean()), rel=1e-2)  # not the noise target


def test_unknown_prediction_type_is_refused(tiny_sd_folder, tmp_path):
    import shutil

    from diffmem.adapters import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_sd_folder, folder)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        load_model(str(folder))


# -- one place for each default -------------------------------------------------------------------

def test_cli_defaults_are_the_config_defaults():
    """A verb given no options builds exactly its config class's default: no default is written twice."""
    import importlib

    from diffmem.audit import AuditConfig
    from diffmem.cli.main import build_parser
    from diffmem.evaluate import EvaluateConfig

    parser = build_parser()
    cli = lambda verb: importlib.import_module(f"diffmem.cli.{verb}")
    args = lambda *argv: parser.parse_args(list(argv))
    assert cli("detect").config_from_args(args("detect")) == SamplingConfig()
    assert cli("explain").config_from_args(args("explain", "--prompt", "x")) == ExplainConfig()
    assert cli("explain").config_from_args(args("serve")) == ExplainConfig()
    assert cli("mitigate").config_from_args(args("mitigate", "--method", "embedding-opt", "--out", "o")) == \
        (MitigationConfig("embedding-opt"), SamplingConfig())
    assert cli("evaluate").config_from_args(args("evaluate", "--out", "o")) == EvaluateConfig()
    assert cli("audit").config_from_args(args("audit")) == AuditConfig()
    # and a given option lands where it belongs
    given = cli("audit").config_from_args(args("audit", "--seed", "4", "--lr", "0.2", "--fpr", "0.05"))
    assert (given.sampling.seed, given.mitigation.lr, given.fpr) == (4, 0.2, 0.05)


def test_model_defaults_fill_unset_mitigation_settings(tiny_sd):
    from diffmem.adapters import load_model

    lab = load_model("lab")
    assert (lab.defaults.mitigation_lr, lab.defaults.mitigation_max_iters, lab.defaults.target_loss) == (0.01, 50, None)
    assert lab.default_guidance_scale == lab.defaults.guidance_scale == 1.25
    sd = MitigationConfig().resolved(tiny_sd)
    assert (sd.lr, sd.max_iters, sd.target_loss) == (0.05, 10, 3.0)
    with pytest.raises(ValueError, match="needs a target loss"):
        MitigationConfig().resolved(lab)
    mine = MitigationConfig(lr=0.3, target_loss=0.4).resolved(lab)
    assert (mine.lr, mine.max_iters, mine.target_loss) == (0.3, 50, 0.4)


def test_lab_default_target_is_its_reference_prompts_median_first_step_d():
    from diffmem.adapters import load_model
    from diffmem.lab.prompts import own_reference_prompts
    from diffmem.mitigate import calibrated_target_loss

    lab = load_model("lab")
    sampling = SamplingConfig(batch_size=64)
    reference = own_reference_prompts(lab)
    target = calibrated_target_loss(lab, MitigationConfig(target_unit="mean"), sampling)
    assert target == pytest.approx(float(np.median(window_scores(lab, reference, sampling))), abs=1e-9)
    # in the seed's unit: the median of sqrt(sum_g d_g^2) over the reference prompts' first-step d
    res = sample_prompts(lab, reference, replace(sampling, track_steps=1), decode=False)
    batch = [float(r.text_noise_norm[:, 0].double().pow(2).sum().sqrt()) for r in res]
    assert calibrated_target_loss(lab, MitigationConfig(), sampling) == pytest.approx(float(np.median(batch)), abs=1e-9)
    assert calibrated_target_loss(lab, MitigationConfig(target_loss=0.2), sampling) is None  # given: nothing to do


def test_lab_export_given_as_dataset_is_judged_by_the_lab_copy_rule(tmp_path):
    from diffmem.adapters import load_model
    from diffmem.eval_sets import load_eval_set
    from diffmem.lab.export import export_training_data

    lab = load_model("lab")
    export_training_data(lab.training_data(), tmp_path, limit=5)
    eval_set = load_eval_set(lab, str(tmp_path / "memorized"), limit=3)
    assert eval_set.lab_data is not None
    assert all(p.colour and p.shape for p in eval_set.prompts)
    other = tmp_path / "other"
    other.mkdir()
    (other / "1.png").write_bytes((tmp_path / "memorized" / "00000001.png").read_bytes())
    (other / "1.txt").write_text("a caption the lab never saw")
    assert load_eval_set(lab, str(other)).lab_data is None


def test_provenance_names_the_model_by_its_files(tiny_sd, tiny_sd_folder, tmp_path):
    import shutil

    from diffmem.adapters import load_model
    from diffmem.provenance import provenance

    rec = provenance(tiny_sd, settings={"a": 1})
    assert rec["model_identity"]["family"] == "stable-diffusion" and rec["settings"] == {"a": 1}
    assert rec["diffmem_version"] and "time" in rec
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_folder, copy)
    assert load_model(str(copy)).identity()["sha256_16"] == tiny_sd.identity()["sha256_16"]
    cfg = copy / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert load_model(str(copy)).identity()["sha256_16"] != tiny_sd.identity()["sha256_16"]
