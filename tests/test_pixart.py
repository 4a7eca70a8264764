"""PixArt-alpha/Sigma behind the one model interface: the family read from model_index.json, sampling
equal to diffusers' PixArt pipelines (T5 mask, learned-variance split), Wen's d on the noise channels
against a named null, and the methods that cannot run on a transformer refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.model import Conditioning
from diffmem.sampling import SamplingConfig, Step, predict_branches, sample_prompts, schedule

torch.set_num_threads(1)
PROMPTS = ["A red cat on a mat", "the velvet harbor: a blue square"]
G = 2


@pytest.fixture(scope="module")
def pixart_folder(tiny_pixart_folder):
    return tiny_pixart_folder


@pytest.fixture(scope="module")
def pixart(pixart_folder):
    from diffmem.adapters import load_model

    return load_model(str(pixart_folder))


def _pipeline(model, cls_name: str = "PixArtAlphaPipeline"):
    """The diffusers pipeline on the adapter's own (frozen) components, sampling with its DDIM scheduler."""
    import diffusers
    from diffusers import DDIMScheduler

    pipe = getattr(diffusers, cls_name)(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                                        transformer=model.denoiser,
                                        scheduler=DDIMScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pixart_folder_loads_as_the_pixart_family(pixart, pixart_folder, tmp_path):
    from diffmem.adapters import load_model, resolve_model_path
    from diffmem.model import DiffusionModel

    assert isinstance(pixart, DiffusionModel)
    assert resolve_model_path(str(pixart_folder)) == ("pixart", pixart_folder)
    assert pixart.family == "pixart" and pixart.prediction_type == "epsilon" and pixart.sampler_prediction == "epsilon"
    assert pixart.latent_shape == (4, 8, 8) and pixart.image_size == 16 and pixart.max_tokens == 120
    assert pixart.default_guidance_scale == 4.5 and pixart.frozen_token_positions == ()
    assert pixart.scheduler.config.clip_sample is False  # DPM-Solver's config read as DDIM, no clipping of latents
    cond = pixart.encode_prompts(PROMPTS)
    assert cond.embeddings.shape == (2, 120, 32) and cond.mask.shape == (2, 120)
    assert cond.mask.sum(1).tolist() == [len(p) + 1 for p in PROMPTS]  # ByT5: one id per byte, then </s>
    assert pixart.null.name == "empty-prompt" and pixart.empty_conditioning().mask.sum().item() == 1
    assert pixart.identity()["null_conditioning"] == "empty-prompt"
    tokens = pixart.tokens("a cat")
    assert [t.text for t in tokens[:6]] == ["a", " ", "c", "a", "t", "</s>"] and tokens[5].special
    assert pixart.count_tokens("a cat") == 6
    # save() writes a transformer that --unet loads
    pixart.save(tmp_path / "ft")
    again = load_model(str(pixart_folder), unet=str(tmp_path / "ft" / "transformer"))
    assert again.family == "pixart" and len(again.folders) == 2


@pytest.mark.parametrize("pipeline", ["PixArtAlphaPipeline", "PixArtSigmaPipeline"])
def test_latents_equal_the_pixart_pipeline(pixart_folder, tmp_path, pipeline):
    """The tracked pass reproduces the pipeline's latents (its T5 mask, its learned-variance split),
    for PixArt-alpha (120 tokens) and -Sigma (300 tokens)."""
    from diffmem.adapters import load_model

    folder = pixart_folder
    if pipeline != "PixArtAlphaPipeline":  # the same weights under the other pipeline's name
        import shutil

        folder = tmp_path / "sigma"
        shutil.copytree(pixart_folder, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    model = load_model(str(folder))
    assert model.max_tokens == {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}[pipeline]
    pipe = _pipeline(model, pipeline)
    cfg = SamplingConfig(num_inference_steps=4, guidance_scale=4.5, num_generations=G, seed=11, batch_size=2 * G)
    ours = sample_prompts(model, PROMPTS, cfg, decode=True)
    for i, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, num_inference_steps=4, guidance_scale=4.5, num_images_per_prompt=G, height=16, width=16,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent",
                   use_resolution_binning=False, max_sequence_length=model.max_tokens).images
        assert ref.shape == ours[i].latents.shape
        assert (ref - ours[i].latents).abs().max().item() <= 1e-5
    images = pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=4.5, num_images_per_prompt=G, height=16, width=16,
                  generator=torch.Generator("cpu").manual_seed(11), output_type="pt", use_resolution_binning=False,
                  max_sequence_length=model.max_tokens).images
    assert (images - ours[0].images).abs().max().item() <= 1e-5
    assert not torch.allclose(ours[0].latents, ours[1].latents)  # different prompts: not vacuous


def test_d_is_the_noise_difference_on_the_first_in_channels(pixart):
    """Wen's d on PixArt: ||eps_c - eps_u|| over the first in_channels output channels of the transformer
    (the learned variance left out), the null being T5("") with its mask."""
    cfg = SamplingConfig(num_inference_steps=4, num_generations=G, seed=5, track_steps=1)
    ours = sample_prompts(pixart, PROMPTS[:1], cfg, decode=False)[0]
    t = schedule(pixart, 4)[0]
    x = torch.randn((G, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    cond, null = pixart.encode_prompts(PROMPTS[:1]), pixart.empty_conditioning()
    with torch.no_grad():
        raw = [pixart.denoiser(x, encoder_hidden_states=c.embeddings.expand(G, -1, -1),
                               encoder_attention_mask=c.mask.expand(G, -1), timestep=t[None].expand(G),
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
               for c in (cond, null)]
    assert raw[0].shape[1] == 8  # noise and variance
    expected = (raw[0][:, :4] - raw[1][:, :4]).double().flatten(1).norm(dim=1)
    torch.testing.assert_close(ours.text_noise_norm[:, 0].double(), expected, rtol=1e-5, atol=1e-6)


def test_the_token_mask_hides_padding_from_the_transformer(pixart):
    """What sits at masked (padding) positions does not change the prediction; unmasked, it does."""
    cond = pixart.encode_prompts(PROMPTS[:1])
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = schedule(pixart, 4)[0]
    pad = cond.mask[0] == 0
    noisy = cond.embeddings.clone()
    noisy[:, pad] = torch.randn_like(noisy[:, pad])
    with torch.no_grad():
        base = pixart.predict_noise(x, t, cond)
        same = pixart.predict_noise(x, t, cond.with_embeddings(noisy))
        unmasked = pixart.predict_noise(x, t, Conditioning(noisy, mask=torch.ones_like(cond.mask)))
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    assert (unmasked - base).abs().max() > 1e-3


def test_a_user_null_is_used_and_recorded(pixart_folder, tmp_path):
    """The original PixArt's learned null caption (y_embedding) replaces T5(""): d changes, and its name
    goes with the model's identity into every output's metadata."""
    from diffmem.adapters import load_model
    from diffmem.detect import meta_path, run_detection
    from diffmem.prompts import PromptRecord

    model = load_model(str(pixart_folder))
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, seed=3, track_steps=1)
    before = sample_prompts(model, PROMPTS[:1], cfg, decode=False)[0].text_noise_norm
    y = torch.randn((model.max_tokens, 32), generator=torch.Generator().manual_seed(1))
    model.use_y_embedding(y)
    assert model.null.name == "y_embedding" and model.empty_conditioning().mask.sum().item() == model.max_tokens
    after = sample_prompts(model, PROMPTS[:1], cfg, decode=False)[0].text_noise_norm
    assert not torch.allclose(before, after)
    out = run_detection(model, [PromptRecord(0, PROMPTS[0])], tmp_path / "d.jsonl", cfg, progress=False)
    meta = json.loads(meta_path(out).read_text())
    assert meta["model_identity"]["null_conditioning"] == "y_embedding"
    with pytest.raises(ValueError, match="embeddings of shape"):
        model.use_null(Conditioning(torch.zeros(1, 7, 32), mask=torch.ones(1, 7)), "short")


def test_detect_command_runs_on_a_pixart_folder(pixart_folder, tmp_path):
    from diffmem.cli.main import main

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "det.jsonl"
    assert main(["detect", "--model", str(pixart_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--num-inference-steps", "2", "--num-generations", "1", "--track-steps", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["score"] > 0 for r in rows)
    meta = json.loads((tmp_path / "det.meta.json").read_text())
    assert meta["model_identity"]["family"] == "pixart" and meta["model_identity"]["null_conditioning"] == "empty-prompt"


@pytest.mark.parametrize("method", ["bright-ending", "ren-le"])
def test_detectors_that_read_unet_down_blocks_refuse_pixart_before_sampling(pixart_folder, tmp_path, capsys, method):
    from diffmem.cli.main import main

    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(pixart_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--method", method, "--num-inference-steps", "2", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bars
    assert len(err) == 1 and f"{method} cannot run on pixart" in err[0] and "down blocks" in err[0]
    assert not out.exists() and not (tmp_path / "d.meta.json").exists()


def test_nemo_mitigation_refuses_pixart_in_one_line(pixart):
    from diffmem.mitigations import check_model

    with pytest.raises(ValueError, match=r"^--method nemo: cannot run on pixart .*down and mid cross-attention"):
        check_model("nemo", pixart)


def test_the_pass_predicts_with_the_model_and_hands_noise_to_recorders(pixart):
    """predict_branches on PixArt: the conditional and null rows of one call, each the noise channels."""
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    t = schedule(pixart, 4)[0]
    cond = pixart.encode_prompts(PROMPTS)
    with torch.no_grad():
        e_c, e_u = predict_branches(pixart, x, t, cond, pixart.empty_conditioning().expand(2))
        torch.testing.assert_close(e_c, pixart.predict_noise(x, t, cond), rtol=1e-5, atol=1e-6)
    step = Step(0, t, x, e_c, e_u, None, cond, pixart.sampler_prediction)
    assert step.eps_cond is e_c and e_c.shape == (2, 4, 8, 8)


def test_the_null_embedding_option_reads_a_y_embedding_file(pixart_folder, tmp_path):
    """``--null-embedding FILE`` (the key of an original PixArt checkpoint) is measured against and recorded."""
    from safetensors.torch import save_file

    from diffmem.cli.main import main

    save_file({"y_embedder.y_embedding": torch.randn(120, 32, generator=torch.Generator().manual_seed(4))},
              str(tmp_path / "null.safetensors"))
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    runs = {}
    for name, extra in (("default", []), ("y", ["--null-embedding", str(tmp_path / "null.safetensors")])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["detect", "--model", str(pixart_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                     "--num-inference-steps", "2", "--num-generations", "1", "--track-steps", "1", "--no-progress",
                     *extra]) == 0
        runs[name] = (json.loads(out.read_text())["score"],
                      json.loads((tmp_path / f"{name}.meta.json").read_text())["model_identity"]["null_conditioning"])
    assert runs["default"][1] == "empty-prompt" and runs["y"][1] == "y_embedding"
    assert runs["default"][0] != runs["y"][0]


def test_every_detector_runs_in_one_pass_on_pixart_or_refuses(pixart_folder, tmp_path):
    import math

    from diffmem.cli.main import main
    from diffmem.detectors import DETECTORS
    from diffmem.files import read_rows

    refused = {"bright-ending", "ren-le", "flux-guidance"}  # a UNet's down blocks (tested above); FLUX.1-dev only
    runs = sorted(set(DETECTORS) - refused)
    (tmp_path / "p.txt").write_text("a red square\nthe owl at night\n")
    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(pixart_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--method", ",".join(runs), "--num-inference-steps", "3", "--num-generations", "2",
                 "--asthana-weights", "1,1", "--reference-prompts", str(tmp_path / "p.txt"), "--no-progress"]) == 0
    for row in read_rows(out):
        assert all(math.isfinite(row[name]) for name in runs)
