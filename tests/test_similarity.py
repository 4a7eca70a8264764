"""Copy-similarity metrics and CLIP score on hand-made images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmem.similarity import CLIPScorer, SSCD, pixel_cosine, resize_center_crop, tiled_l2


def solid(rgb, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


# -- pixel cosine ---------------------------------------------------------------------------------

def test_pixel_cosine_known_values():
    a = torch.rand(3, 16, 16)
    half = torch.ones(3, 16, 16)
    half[:, :8] = 0  # +1 / -1 halves in [-1, 1] space
    checker = torch.ones(3, 16, 16)
    checker[:, :, ::2] = 0  # +1 / -1 columns: orthogonal to the halves
    r = pixel_cosine(torch.stack([a, 1 - a, half]), torch.stack([checker, a]))
    np.testing.assert_allclose(r.matrix[0, 1], 1.0, atol=1e-12)
    np.testing.assert_allclose(r.matrix[1, 1], -1.0, atol=1e-12)
    np.testing.assert_allclose(r.matrix[2, 0], 0.0, atol=1e-12)
    assert r.higher_is_better and r.best_index.tolist()[:2] == [1, 0]


# -- tiled L2 (Carlini et al. 2023) ---------------------------------------------------------------

def test_tiled_l2_is_the_worst_tile():
    base = torch.full((3, 16, 16), 0.5)
    one_tile = base.clone()
    one_tile[:, 4:8, 8:12] += 0.2  # one of the 16 tiles differs by 0.2 everywhere
    everywhere = base + 0.05
    r = tiled_l2(torch.stack([base, one_tile, everywhere]), base[None])
    np.testing.assert_allclose(r.matrix[:, 0], [0.0, 0.2, 0.05], atol=1e-6)
    # a whole-image RMS would call the one-tile change 0.05 (= 0.2 / 4), as close as the uniform shift
    assert not r.higher_is_better
    np.testing.assert_allclose(tiled_l2(solid((0, 0, 0))[None], solid((1, 1, 1))[None]).best, [1.0])


def test_tiled_l2_best_match_and_resizing():
    train = torch.stack([solid((0.1, 0.2, 0.3)), solid((0.9, 0.8, 0.7))])
    gen = torch.stack([solid((0.9, 0.8, 0.7), 32), solid((0.2, 0.2, 0.3), 32)])  # twice the size
    r = tiled_l2(gen, train)
    assert r.best_index.tolist() == [1, 0]
    np.testing.assert_allclose(r.best, [0.0, math.sqrt(0.01 / 3)], atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        tiled_l2(torch.rand(1, 3, 10, 10), torch.rand(1, 3, 10, 10))


def test_summary_is_mean_max_min_of_best_matches():
    train = torch.stack([torch.zeros(3, 16, 16)])
    gen = torch.stack([torch.full((3, 16, 16), v) for v in (0.1, 0.3, 0.2)])
    s = tiled_l2(gen, train).summary()
    assert s == pytest.approx({"mean": 0.2, "max": 0.3, "min": 0.1})


def test_metrics_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        pixel_cosine(torch.rand(3, 16, 16), torch.rand(1, 3, 16, 16))


# -- SSCD with a TorchScript stand-in -------------------------------------------------------------

class MeanColour(torch.nn.Module):
    """Stand-in descriptor network: the mean of each channel (B, 3, H, W) -> (B, 3)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def sscd_standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "sscd_standin.torchscript.pt"
    torch.jit.script(MeanColour()).save(str(path))
    return path


def test_sscd_normalizes_with_mean_and_std_one_half(sscd_standin):
    sscd = SSCD(sscd_standin)
    d = sscd.descriptors(torch.stack([solid((0.75, 0.25, 0.5)), solid((1.0, 1.0, 0.0))]))
    # (x - 0.5) / 0.5: (0.5, -0.5, 0) and (1, 1, -1), then unit length
    torch.testing.assert_close(d[0], torch.tensor([1, -1, 0]) / math.sqrt(2))
    torch.testing.assert_close(d[1], torch.tensor([1, 1, -1]) / math.sqrt(3))
    r = sscd.similarity(torch.stack([solid((0.75, 0.25, 0.5))]), torch.stack([solid((1.0, 1.0, 0.0)), solid((0.8, 0.2, 0.5))]))
    np.testing.assert_allclose(r.matrix[0, 0], 0.0, atol=1e-6)
    assert r.best_index.tolist() == [1] and r.higher_is_better


def test_sscd_resizes_the_short_side_to_256_and_crops_the_centre_224(sscd_standin):
    img = torch.zeros(1, 3, 16, 32)  # a wide image: black outer quarters, white centre half
    img[..., 8:24] = 1.0
    x = resize_center_crop(img, 256, 224)
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x, torch.ones_like(x))  # the crop lies inside the white half
    d = SSCD(sscd_standin).descriptors(img)
    torch.testing.assert_close(d[0], torch.ones(3) / math.sqrt(3))


def test_sscd_needs_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        SSCD(tmp_path / "missing.pt")


# -- CLIP score with a tiny CLIP built in code ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from diffmem.testing import _write_char_clip_tokenizer

    path = tmp_path_factory.mktemp("clip") / "clip"
    _write_char_clip_tokenizer(path, 32)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(path)
    return path


def test_clip_score_is_the_cosine_of_image_and_text_features(tiny_clip):
    scorer = CLIPScorer(tiny_clip)
    images = torch.rand(3, 3, 16, 16)
    prompts = ["a red square", "a blue circle", "the green triangle"]
    s = scorer.score(images, prompts)
    m, tok = scorer.model, scorer.tokenizer
    mean, std = torch.tensor(scorer.mean).view(1, 3, 1, 1), torch.tensor(scorer.std).view(1, 3, 1, 1)
    x = (resize_center_crop(images, 32, 32, "bicubic") - mean) / std
    with torch.no_grad():
        fi = m.get_image_features(pixel_values=x)
        ft = m.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
    fi = fi if torch.is_tensor(fi) else fi.pooler_output
    ft = ft if torch.is_tensor(ft) else ft.pooler_output
    expected = torch.nn.functional.cosine_similarity(fi, ft).double().numpy()
    np.testing.assert_allclose(s, expected, atol=1e-5)
    assert np.all(np.abs(s) <= 1 + 1e-9)
    # the score pairs image i with prompt i
    np.testing.assert_allclose(scorer.score(images[[2, 0]], [prompts[2], prompts[0]]), s[[2, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, prompts[:2])


def test_clip_needs_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIPModel"):
        CLIPScorer(tmp_path)
