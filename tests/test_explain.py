"""Token significance (Wen et al. sec. 4): the gradient is taken through the conditional branch."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmem.explain import (prompt_scores, significance_from_grad, text_noise_norm_grad, token_char_starts,
                             token_significance, word_scores)
from diffmem.model import Token
from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts

torch.set_num_threads(1)


# -- analytic fakes ---------------------------------------------------------------------------

def tanh_reader(T=6, D=5, shape=(2, 3, 3), reads=(2,), seed=0):
    """eps(x, t, e) = x + tanh(L e): a denoiser whose prompt response depends only on tokens `reads`."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    L = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(T, dtype=torch.float64)
    mask[list(reads)] = 1
    L = L * mask[None, :, None]

    def denoise(x, t, e):
        return x + torch.tanh(torch.einsum("ntd,btd->bn", L, e)).reshape(len(x), *shape)
    return denoise, L


def test_tokens_the_denoiser_ignores_get_zero_significance():
    denoise, _ = tanh_reader(reads=(2, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    cond, uncond = (torch.randn(1, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    d, grad = text_noise_norm_grad(denoise, x, torch.tensor(10), cond, uncond)
    s = significance_from_grad(grad)
    assert grad.shape == cond.shape and d.shape == (3,)
    assert (s[[0, 1, 3, 5]] == 0).all() and (s[[2, 4]] > 1e-3).all()


def test_analytic_gradient_of_the_fake():
    """d = ||tanh(L e_c) - tanh(L e_u)||, so grad_c = L^T (diag(1 - tanh^2(L e_c)) r / ||r||)."""
    denoise, L = tanh_reader(reads=(1, 2, 3))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    cond, uncond = (torch.randn(1, 6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    d, grad = text_noise_norm_grad(denoise, x, torch.tensor(0), cond, uncond)
    a_c, a_u = torch.tanh(torch.einsum("ntd,td->n", L, cond[0])), torch.tanh(torch.einsum("ntd,td->n", L, uncond[0]))
    r = a_c - a_u
    expected = torch.einsum("ntd,n->td", L, (1 - a_c ** 2) * r / r.norm())
    torch.testing.assert_close(d, r.norm().reshape(1))
    torch.testing.assert_close(grad[0], expected)


def test_a_denoiser_that_ignores_the_prompt_gives_zero():
    def denoise(x, t, e):
        return 0.5 * x
    x = torch.randn(2, 3, 4, 4)
    cond, uncond = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    d, grad = text_noise_norm_grad(denoise, x, torch.tensor(1), cond, uncond)
    assert (d == 0).all() and (grad == 0).all()  # no NaN from the norm at zero


# -- the order proof on a real (tiny, random) UNet --------------------------------------------

@pytest.fixture(scope="module")
def unet64(tiny_sd):
    """The tiny SD model in float64, for finite differences; the session fixture stays untouched."""
    unet = copy.deepcopy(tiny_sd.unet).double()
    return lambda x, t, e: unet(x, t, encoder_hidden_states=e, return_dict=False)[0]


@pytest.fixture(scope="module")
def sd_inputs(tiny_sd):
    cond = tiny_sd.encode_prompts(["a red cat on a mat"]).embeddings.double()  # (1, 77, 32)
    uncond = tiny_sd.empty_conditioning().embeddings.double()
    tiny_sd.scheduler.set_timesteps(50)
    t = tiny_sd.scheduler.timesteps[0]
    x = initial_noise(tiny_sd, 3, seed=0).double()
    return x, t, cond, uncond


def test_conditional_and_unconditional_are_distinguishable(tiny_sd, unet64, sd_inputs):
    x, t, cond, uncond = sd_inputs
    assert (cond - uncond).abs().max() > 0.1
    d, _ = text_noise_norm_grad(unet64, x, t, cond, uncond)
    assert (d > 1e-4).all()


def official_get_text_cond_grad(denoise, x, t, cond, uncond):
    """The official notebook's token gradient at one target step, written from its description:
    diffusers' embedding batch [empty x G, prompt x G] is what it differentiates; it feeds the UNet
    [its last row (the prompt) x G, a detached copy of its first row (empty) x G], names the halves
    of chunk(2) (uncond, text) in that order, takes the norm of their difference over the whole
    batch, and averages each token's gradient norm over the 2G rows. Returns (T,) and the step's
    official guided noise eps_c + w (eps_u - eps_c) as a function of w."""
    G = len(x)
    prompt_embeds = torch.cat([uncond.expand(G, -1, -1), cond.expand(G, -1, -1)]).clone().requires_grad_(True)
    single = prompt_embeds[[0]].clone().detach().requires_grad_(True)
    dummy = prompt_embeds[[-1]].clone()
    noise_pred = denoise(torch.cat([x, x]), t, torch.cat([dummy.repeat(G, 1, 1), single.repeat(G, 1, 1)]))
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # in fact (prompt, empty)
    noise_pred_text = noise_pred_text - noise_pred_uncond
    loss = torch.norm(noise_pred_text, p=2).mean()
    (grads,) = torch.autograd.grad(loss, [prompt_embeds])
    guided = lambda w: (noise_pred_uncond + w * noise_pred_text).detach()
    return grads.norm(p=2, dim=-1).mean(dim=0).detach(), guided


def test_official_gradient_is_half_of_ours_with_one_generation(unet64, sd_inputs):
    """It differentiates the conditional embedding too (not the empty one): with G = 1 at the first
    step its significance is exactly 0.5 x ours per token, the same ranking."""
    x, t, cond, uncond = sd_inputs
    _, grad = text_noise_norm_grad(unet64, x[:1], t, cond, uncond)
    official, _ = official_get_text_cond_grad(unet64, x[:1], t, cond, uncond)
    ours = grad[0].norm(dim=-1)  # s_j in float64
    assert ours.max() > 1e-6
    torch.testing.assert_close(official, 0.5 * ours, rtol=1e-10, atol=1e-14)


def test_official_replica_on_the_pass_matches_the_description(tiny_sd):
    """official_token_significance (the pass at guidance 1 - w, its recorder) equals the official
    computation written out by hand: two target steps, G = 2, latents advanced with the official
    reversed guidance between them."""
    from diffmem.explain import ExplainConfig, official_token_significance

    config = ExplainConfig(steps=(0, 2), generations=2, seed=5, num_inference_steps=10)
    replica = torch.tensor(official_token_significance(tiny_sd, "a red cat on a mat", config, position=1))
    unet = lambda x, t, e: tiny_sd.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    cond = tiny_sd.encode_prompts(["a red cat on a mat"]).embeddings
    uncond = tiny_sd.empty_conditioning().embeddings
    w = config.sampling().guidance(tiny_sd)
    tiny_sd.scheduler.set_timesteps(10)
    latents, per_step = initial_noise(tiny_sd, 2, seed=6), []
    for t in tiny_sd.scheduler.timesteps[:2]:
        s, guided = official_get_text_cond_grad(unet, tiny_sd.scheduler.scale_model_input(latents, t), t, cond, uncond)
        per_step.append(s)
        latents = tiny_sd.scheduler.step(guided(w), t, latents, return_dict=False)[0]
    torch.testing.assert_close(replica, torch.stack(per_step).mean(0), rtol=1e-4, atol=1e-7)
    # and with one generation at the first step it is half of token_significance's
    one = ExplainConfig(steps=(0, 1), generations=1, seed=5, num_inference_steps=10)
    ours = torch.tensor([tok.score for tok in token_significance(tiny_sd, "a red cat on a mat", one).tokens])
    torch.testing.assert_close(torch.tensor(official_token_significance(tiny_sd, "a red cat on a mat", one)),
                               0.5 * ours, rtol=1e-4, atol=1e-7)


def _metric(denoise, x, t, cond, uncond):
    with torch.no_grad():
        eps_u, eps_c = denoise(torch.cat([x, x]), t, torch.cat([uncond.expand(len(x), -1, -1),
                                                               cond.expand(len(x), -1, -1)])).chunk(2)
        return (eps_c - eps_u).flatten(1).norm(dim=1).mean()


def test_gradient_equals_finite_differences_per_token(tiny_sd, unet64, sd_inputs):
    """For each token j: (d(e + h u_j) - d(e - h u_j)) / 2h = <grad_j, u_j> for a direction u_j at j alone."""
    x, t, cond, uncond = sd_inputs
    _, grad = text_noise_norm_grad(unet64, x, t, cond, uncond)
    n_text = sum(not tok.special for tok in tiny_sd.tokens("a red cat on a mat"))
    positions = list(range(0, n_text + 4))  # start token, every character, end token, padding
    gen = torch.Generator().manual_seed(3)
    h = 1e-5
    for j in positions:
        for u_j in (grad[0, j] / grad[0, j].norm(), torch.randn(cond.shape[-1], generator=gen, dtype=torch.float64)):
            u = torch.zeros_like(cond)
            u[0, j] = u_j
            fd = (_metric(unet64, x, t, cond + h * u, uncond) - _metric(unet64, x, t, cond - h * u, uncond)) / (2 * h)
            assert fd.item() == pytest.approx((grad * u).sum().item(), rel=1e-5, abs=1e-9), f"token {j}"
        # along grad_j the change per unit step is the significance itself
        s_j = significance_from_grad(grad)[j]
        u = torch.zeros_like(cond)
        u[0, j] = grad[0, j] / grad[0, j].norm()
        fd = (_metric(unet64, x, t, cond + h * u, uncond) - _metric(unet64, x, t, cond - h * u, uncond)) / (2 * h)
        assert fd.item() == pytest.approx(s_j.item(), rel=1e-5)


# -- on a model ------------------------------------------------------------------------------

def test_token_significance_on_tiny_sd(tiny_sd):
    prompt = "a red cat, on a mat"
    ex = token_significance(tiny_sd, prompt, steps=(0, 1), generations=2, seed=5)
    assert [t.token for t in ex.tokens] == [t.text for t in tiny_sd.tokens(prompt)]
    assert len(ex.tokens) == tiny_sd.max_tokens
    assert [t.special for t in ex.tokens[:3]] == [True, False, False] and ex.tokens[-1].special
    assert all(t.score >= 0 for t in ex.tokens) and max(t.score for t in ex.tokens) > 0
    assert [w.word for w in ex.words] == ["a", "red", "cat", ",", "on", "a", "mat"]
    # character-level CLIP BPE: "red" is three tokens, and its word score is their sum
    red = [t for t in ex.tokens if t.word == 1]
    assert [t.token for t in red] == ["r", "e", "d"]
    assert ex.words[1].score == pytest.approx(sum(t.score for t in red))
    assert all(t.word is None for t in ex.tokens if t.special)
    assert len(ex.text_noise_norm) == 2 and len(ex.text_noise_norm[0]) == 1
    rec = ex.to_json()
    assert rec["tokens"][1] == {"token": "a", "score": ex.tokens[1].score, "special": False,
                                "token_id": ex.tokens[1].token_id, "word": 0}
    assert rec["words"][2]["word"] == "cat" and rec["model"] == tiny_sd.name and rec["settings"]["seed"] == 5


@pytest.mark.parametrize("steps", [(0, 1), (0, 3), (2, 4)])
def test_score_matches_tracked_sampling(tiny_sd, steps):
    """The window's x_t come from the same tracked pass as detection, under the same seed rule
    (position i starts from seed + i), so the scores agree."""
    prompts = ["a red cat", "a blue dog"]
    ex = [token_significance(tiny_sd, p, steps=steps, generations=2, seed=7, position=i) for i, p in enumerate(prompts)]
    fast = prompt_scores(tiny_sd, prompts, steps=steps, generations=2, seed=7)
    tracked = sample_prompts(tiny_sd, prompts, SamplingConfig(num_generations=2, seed=7, track_steps=steps[1]),
                             decode=False)
    for e, f, tr in zip(ex, fast, tracked):
        d = tr.text_noise_norm[:, steps[0]:steps[1]]  # (G, S)
        torch.testing.assert_close(torch.tensor(e.text_noise_norm), d, rtol=1e-6, atol=1e-6)
        assert e.score == pytest.approx(f, abs=1e-6) and f == pytest.approx(float(d.double().mean()), abs=1e-6)
        assert e.provenance["seed"] == 7 + e.provenance["position"]
    assert ex[0].score != ex[1].score


def test_bad_window_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="step window"):
        token_significance(tiny_sd, "a cat", steps=(3, 3))
    with pytest.raises(ValueError, match="num_inference_steps"):
        token_significance(tiny_sd, "a cat", steps=(0, 60))


# -- words ------------------------------------------------------------------------------------

def _toks(texts):
    return [Token(t, i, t.startswith("[")) for i, t in enumerate(texts)]


def test_wordpiece_subwords_sum_into_words():
    prompt = "The zephyr unbelievably: a red circle"
    toks = _toks(["[CLS]", "the", "ze", "##phy", "##r", "un", "##bel", "##ie", "##va", "##bly", ":", "a", "red",
                  "circle", "[SEP]", "[PAD]"])
    scores = [float(i) for i in range(len(toks))]
    words, token_word = word_scores(prompt, toks, scores)
    assert [w.word for w in words] == ["The", "zephyr", "unbelievably", ":", "a", "red", "circle"]
    assert [w.score for w in words] == [1.0, 2 + 3 + 4, 5 + 6 + 7 + 8 + 9, 10.0, 11.0, 12.0, 13.0]
    assert token_word == [None, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 4, 5, 6, None, None]
    assert prompt[words[2].start:words[2].end] == "unbelievably"


def test_accents_and_byte_pieces_stay_in_their_word():
    prompt = "héllo wörld"
    toks = _toks(["[CLS]", "h", "\ufffd", "\ufffd", "l", "l", "o", "w", "\ufffd", "\ufffd", "r", "l", "d", "[SEP]"])
    starts = token_char_starts(prompt, toks)
    assert starts == [None, 0, 1, 1, 2, 3, 4, 6, 7, 7, 8, 9, 10, None]
    words, _ = word_scores(prompt, toks, [1.0] * len(toks))
    assert [(w.word, w.score) for w in words] == [("héllo", 6.0), ("wörld", 6.0)]
    # an uncased WordPiece tokenizer strips the accents
    words, _ = word_scores("Héllo", _toks(["[CLS]", "hello", "[SEP]"]), [0.0, 2.0, 0.0])
    assert words[0].score == 2.0


def test_words_past_the_token_limit_are_marked_unread():
    """A word no token reaches (cut off by the encoder's limit) is read=False and left out of the
    ranking; every word up to the last one reached is read."""
    from diffmem.explain import Explanation, word_scores
    from diffmem.model import Token

    prompt = "red cat sits quietly"
    tokens = [Token("[CLS]", 101, True), Token("red", 1, False), Token("cat", 2, False), Token("[SEP]", 102, True)]
    words, token_word = word_scores(prompt, tokens, [0.0, 0.5, 0.25, 0.0])
    assert [w.read for w in words] == [True, True, False, False] and token_word == [None, 0, 1, None]
    e = Explanation(prompt, 1.0, [], words, [], None, False)
    assert [w.word for w in e.ranked_words()] == ["red", "cat"]
