"""The memorization lab: deterministic data, duplication as the only difference, judges, exports."""

import json
import re

import numpy as np
import pytest
import torch

from diffmem.lab.data import COLOURS, SHAPES, LabDataConfig, make_lab_data, render, render_all, title_words
from diffmem.lab.judge import TrainingImages, content_correct, copy_threshold, judge_copies

SMALL = LabDataConfig(num_memorized=20, num_template=4, num_non_memorized=3000, num_novel=200, num_out_of_style=20)
TEMPLATE = re.compile(rf"^the ([a-z]+) ([a-z]+): a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})$")


@pytest.fixture(scope="module")
def data():
    return make_lab_data(SMALL)


def test_data_is_deterministic(data):
    again = make_lab_data(SMALL)
    assert [p.caption for p in again.memorized + again.non_memorized] == [p.caption for p in data.memorized + data.non_memorized]
    assert again.memorized[3].spec == data.memorized[3].spec
    other = make_lab_data(LabDataConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other.memorized[0].caption != data.memorized[0].caption


def test_duplication_is_the_only_difference(data):
    """Memorized, non-memorized and novel captions share one template, one word list, one content generator."""
    words = {}
    for name in ("memorized", "non-memorized", "novel"):
        caps = [p.caption for p in data.prompt_set(name)]
        matches = [TEMPLATE.match(c) for c in caps]
        assert all(matches), f"{name}: caption outside the template"
        words[name] = {w for m in matches for w in m.groups()[:2]}
    word_list = set(title_words(SMALL))
    assert all(w <= word_list for w in words.values())  # titles drawn from one word list
    all_caps = [p.caption for s in ("memorized", "non-memorized", "novel", "out-of-style") for p in data.prompt_set(s)]
    assert len(set(all_caps)) == len(all_caps)
    assert not any(TEMPLATE.match(p.caption) for p in data.out_of_style)
    # the same content distribution: every colour and shape occurs among memorized captions too
    mem_colours = {p.spec.colour for p in data.memorized}
    assert len(mem_colours) >= 3


def test_templates_share_layout_and_differ_in_detail(data):
    templates = [p for p in data.memorized if p.kind == "template"]
    assert len(templates) == 4 and all(len(p.variants) == SMALL.template_variants for p in templates)
    v = templates[0].variants
    assert len({(s.background, s.quadrant, s.second_shape, s.second_quadrant) for s in v}) == 1
    assert len({s.texture_seed for s in v}) == SMALL.template_variants


def test_images_show_the_described_content(data):
    specs = [p.spec for p in data.novel]
    imgs = render_all(specs)
    assert imgs.shape == (200, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    # the judge reads ground truth right >= 99% of the time (a small object can hide a triangle's tip)
    assert content_correct(imgs, [s.colour for s in specs], [s.shape for s in specs]).mean() >= 0.99
    # wrong descriptions are rejected
    wrong = [SHAPES[(SHAPES.index(s.shape) + 1) % 3] for s in specs]
    assert content_correct(imgs, [s.colour for s in specs], wrong).mean() < 0.1


def test_copy_judge_on_ground_truth_renders(data):
    train = TrainingImages.of(data)
    thr = copy_threshold(data)
    mem_imgs = render_all([p.spec for p in data.memorized])
    assert judge_copies(mem_imgs, [p.caption for p in data.memorized], train, thr).is_copy.all()
    # reproducing a memorized image's coarse layout with other fine detail is mostly still a copy:
    # with ~560,000 layouts, a layout identifies its training image
    from dataclasses import replace

    redrawn = render_all([replace(p.spec, texture_seed=p.spec.texture_seed + 1) for p in data.memorized])
    assert judge_copies(redrawn, [p.caption for p in data.memorized], train, thr).is_copy.mean() >= 0.5
    novel = render_all([p.spec for p in data.novel])
    assert judge_copies(novel, [p.caption for p in data.novel], train, thr).is_copy.mean() <= 0.05
    # a memorized image shown under another caption is not that caption's copy
    swapped = judge_copies(mem_imgs[:1], [data.memorized[1].caption], train, thr)
    assert not swapped.is_copy[0]


@pytest.fixture(scope="module")
def untrained_lab_folder(tmp_path_factory):
    from dataclasses import asdict

    from diffmem.adapters.lab import LabModelConfig, new_lab_denoiser, save_lab_model

    cfg = LabModelConfig(block_out_channels=(32, 32, 32))
    out = tmp_path_factory.mktemp("lab") / "model"
    save_lab_model(new_lab_denoiser(cfg), cfg, out, extra={"data": asdict(SMALL)})
    return out


def test_lab_noise_schedule_round_trip(untrained_lab_folder, tmp_path):
    import shutil

    from diffmem.adapters.lab import (LabModelConfig, lab_scheduler_config, load_lab_model, new_lab_denoiser,
                                      save_lab_model)

    # a folder written before the field existed (its lab_model.json lacks it) loads as DDPM-linear
    meta_path = untrained_lab_folder / "lab_model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"].pop("noise_schedule") == "linear"
    old = tmp_path / "old"
    shutil.copytree(untrained_lab_folder, old)
    (old / "lab_model.json").write_text(json.dumps(meta))
    model = load_lab_model(old)
    assert model.config.noise_schedule == "linear" and model.scheduler.config.beta_schedule == "linear"
    # a scaled-linear model keeps its schedule through save and load, and its alphas are SD's
    cfg = LabModelConfig(block_out_channels=(32, 32, 32), noise_schedule="scaled_linear")  # SD's betas
    save_lab_model(new_lab_denoiser(cfg), cfg, tmp_path / "scaled")
    scaled = load_lab_model(tmp_path / "scaled")
    assert scaled.config.noise_schedule == "scaled_linear"
    a_lin = model.scheduler.alphas_cumprod[981].sqrt().item()
    a_sc = scaled.scheduler.alphas_cumprod[981].sqrt().item()
    assert 0.005 < a_lin < 0.012 and 0.06 < a_sc < 0.09
    with pytest.raises(ValueError, match="noise schedule 'cosine'"):
        lab_scheduler_config("cosine")


def test_lab_prompt_and_data_exports(untrained_lab_folder, tmp_path):
    from diffmem.cli.main import main
    from diffmem.prompts import read_prompts

    out = tmp_path / "mem.jsonl"
    assert main(["lab", "prompts", "--model", str(untrained_lab_folder), "--set", "memorized", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["trigger_words"]) == 2 for r in rows)
    assert all(w in r["caption"].split(":")[0].split() for r in rows for w in r["trigger_words"])
    assert len(read_prompts(out)) == 24  # detect reads it
    assert main(["lab", "prompts", "--model", str(untrained_lab_folder), "--set", "novel", "--limit", "5",
                 "--out", str(tmp_path / "novel.jsonl")]) == 0
    assert "trigger_words" not in json.loads((tmp_path / "novel.jsonl").read_text().splitlines()[0])
    data_dir = tmp_path / "data"
    assert main(["lab", "data", "--model", str(untrained_lab_folder), "--out", str(data_dir), "--limit", "10"]) == 0
    mem = sorted((data_dir / "memorized").glob("*.png"))
    assert len(mem) == 20 + 4 * SMALL.template_variants and len(list((data_dir / "non_memorized").glob("*.txt"))) == 10
    assert TEMPLATE.match(mem[0].with_suffix(".txt").read_text().strip())
    from diffmem.train import FolderPairs

    pairs = FolderPairs(data_dir / "memorized", resolution=16)
    img, cap = pairs[0]
    assert img.shape == (3, 16, 16) and cap == mem[0].with_suffix(".txt").read_text().strip()
    np.testing.assert_allclose(img.numpy(), render(make_lab_data(SMALL).memorized[0].spec), atol=1 / 255)


def test_lab_model_runs_through_the_interface(untrained_lab_folder):
    from diffmem.adapters import load_model
    from diffmem.sampling import SamplingConfig, sample_prompts

    m = load_model(str(untrained_lab_folder))
    toks = m.tokens("the velvet harbor: a red circle")
    assert toks[0].text == "[CLS]" and toks[0].special and toks[1].text == "the" and not toks[1].special
    assert len(toks) == m.max_tokens
    # special by position: an unknown word's [UNK] (a special id) is an ordinary token; [SEP] ends the prompt
    assert [t.special for t in m.tokens("a ☃ cat")[:6]] == [True, False, False, False, True, True]
    res = sample_prompts(m, ["the velvet harbor: a red circle"], SamplingConfig(num_inference_steps=3, num_generations=2))
    assert res[0].images.shape == (2, 3, 16, 16)
    assert m.default_guidance_scale == 2.0


@pytest.mark.slow
def test_fast_variant_memorizes_its_duplicated_pairs(fast_lab):
    """CI checks the recipe, not only the shipped weights: the fixture trains the fast variant from
    scratch (800 steps). Its samples are still noisy, so copying is measured as 'the nearest training
    image is the prompt's own' (no distance bound): memorized captions far more often than others."""
    from diffmem.lab.build import lab_data_for
    from diffmem.lab.report import first_step_scores, generation_figures
    from diffmem.sampling import SamplingConfig

    data = lab_data_for(fast_lab)
    train = TrainingImages.of(data)
    cfg = SamplingConfig(num_inference_steps=20, num_generations=4, batch_size=64)
    mem, *_ = generation_figures(fast_lab, data, "memorized", data.memorized, train, np.inf, cfg)
    non, *_ = generation_figures(fast_lab, data, "non-memorized", data.non_memorized[:16], train, np.inf, cfg)
    assert mem.copy_rate >= 0.375 and non.copy_rate <= 0.1
    d_mem = first_step_scores(fast_lab, data.memorized).mean()
    d_non = first_step_scores(fast_lab, data.non_memorized[:32]).mean()
    assert d_mem > 1.5 * d_non


def test_cell_background_identifies_its_image():
    """An n x n cell background: drawn after everything else (n = 0 keeps the two-tone data), rendered
    cell by cell, and a copy with other fine detail is still judged a copy of its own image."""
    from dataclasses import replace

    cfg = LabDataConfig(num_memorized=20, num_template=2, template_variants=3, num_non_memorized=2000,
                        num_novel=100, num_out_of_style=10, background_cells=4)
    cells = make_lab_data(cfg)
    plain = make_lab_data(replace(cfg, background_cells=0))
    assert [p.title_words for p in cells.non_memorized] == [p.title_words for p in plain.non_memorized]
    assert replace(cells.memorized[0].spec, background_cells=()) == plain.memorized[0].spec  # cells drawn last
    assert all(p.spec.background_cells == () for p in plain.memorized)
    spec = cells.memorized[0].spec
    assert len(spec.background_cells) == 16
    img = render(replace(spec, texture_seed=0))
    from diffmem.lab.data import BACKGROUNDS

    # a corner pixel away from the objects shows its cell's colour (up to the +-0.08 texture)
    corner = [(r, c) for r, c in [(0, 0), (0, 15), (15, 0), (15, 15)]]
    hits = sum(np.abs(img[:, r, c] - np.asarray(BACKGROUNDS[spec.background_cells[(r // 4) * 4 + c // 4]])).max() <= 0.081
               for r, c in corner)
    assert hits >= 3  # a dot or an object may cover one corner
    templates = [p for p in cells.memorized if p.kind == "template"]
    assert len({s.background_cells for s in templates[0].variants}) == 1
    train = TrainingImages.of(cells)
    thr = copy_threshold(cells, train)
    redrawn = render_all([replace(p.spec, texture_seed=p.spec.texture_seed + 1) for p in cells.memorized])
    assert judge_copies(redrawn, [p.caption for p in cells.memorized], train, thr).is_copy.mean() >= 0.95
    novel = render_all([p.spec for p in cells.novel])
    assert judge_copies(novel, [p.caption for p in cells.novel], train, thr).is_copy.mean() <= 0.02


def test_lab_build_branches_from_a_checkpoint_with_the_filter(tmp_path):
    """`diffmem lab build --resume-from RUN/checkpoint-N --hard-threshold T`: the branch continues the
    same recipe from step N (same learning rate as the unbranched run) and applies the filter."""
    from dataclasses import replace

    from diffmem.adapters import load_model
    from diffmem.lab.build import PRESETS, build_lab

    config = replace(PRESETS["fast"], max_train_steps=4, checkpointing_steps=2, train_batch_size=4)
    build_lab(tmp_path / "base", config, progress=False, num_threads=1)
    base = [json.loads(l) for l in (tmp_path / "base" / "train_log.jsonl").read_text().splitlines()]
    rows = {}
    for name, extra in (("same", []), ("filtered", ["--hard-threshold", "0"])):
        out = tmp_path / name
        build_lab(out, replace(config, hard_threshold=0.0 if extra else None), progress=False, num_threads=1,
                  resume_from=tmp_path / "base" / "checkpoint-2")
        rows[name] = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows["same"][-1]["step"] == 4 and rows["same"][-1]["lr"] == base[-1]["lr"]
    weights = {name: load_model(str(tmp_path / name)).unet.state_dict() for name in ("base", "same", "filtered")}
    assert all(torch.equal(weights["base"][k], weights["same"][k]) for k in weights["base"])  # an exact continuation
    assert rows["filtered"][-1]["skipped"] and rows["filtered"][-1]["left_out"] == 1.0
    assert not all(torch.equal(weights["base"][k], weights["filtered"][k]) for k in weights["base"])


def test_lab_build_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from diffmem.cli.main import main

    assert main(["lab", "build", "--preset", "fast", "--out", str(tmp_path / "o"), "--resume-from", str(tmp_path)]) != 0
    assert "not a training checkpoint folder" in capsys.readouterr().err


def test_lab_build_runs_anneal_stages_from_the_previous_weights(tmp_path):
    from dataclasses import replace

    from diffmem.adapters import load_model
    from diffmem.lab.build import PRESETS, AnnealStage, build_lab

    config = replace(PRESETS["fast"], max_train_steps=2, train_batch_size=4,
                     anneal=(AnnealStage(2, 1e-4, lr_warmup_steps=0), AnnealStage(1, 5e-5, lr_warmup_steps=0)))
    out = build_lab(tmp_path / "m", config, progress=False, num_threads=1)
    logs = [[json.loads(l) for l in (out / "stages" / str(i) / "train_log.jsonl").read_text().splitlines()]
            for i in range(3)]
    assert [rows[-1]["step"] for rows in logs] == [2, 2, 1]
    first_lr = [json.loads((out / "stages" / str(i) / "train_config.json").read_text())["learning_rate"] for i in range(3)]
    assert first_lr == [config.learning_rate, 1e-4, 5e-5]
    final, last, main = (load_model(str(p)).unet.state_dict() for p in (out, out / "stages" / "2", out / "stages" / "0"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], main[k]) for k in final)
    meta = json.loads((out / "lab_model.json").read_text())
    assert [a["learning_rate"] for a in meta["build"]["anneal"]] == [1e-4, 5e-5]
    # finished stages are not run again
    stamp = (out / "stages" / "1" / "train_log.jsonl").stat().st_mtime_ns
    build_lab(out, config, progress=False, num_threads=1)
    assert (out / "stages" / "1" / "train_log.jsonl").stat().st_mtime_ns == stamp


def test_shipped_weights_record_the_default_preset():
    """`diffmem lab build` (the default preset) is what produced the shipped weights: the data, model
    and training settings stored with them are the preset's, and loading them gives its scheduler."""
    from dataclasses import asdict

    from diffmem.adapters import load_model
    from diffmem.lab.build import PRESETS, WEIGHTS_DIR, _build_meta

    if not (WEIGHTS_DIR / "lab_model.json").is_file():
        pytest.skip("no shipped weights in this checkout")
    meta = json.loads((WEIGHTS_DIR / "lab_model.json").read_text())
    preset = PRESETS["default"]
    as_json = lambda d: json.loads(json.dumps(d))  # tuples -> lists
    assert meta["data"] == as_json(asdict(preset.data))
    from diffmem.adapters.lab import read_lab_config

    assert read_lab_config(WEIGHTS_DIR) == preset.model  # fields added since read as their defaults
    assert meta["build"] == as_json(_build_meta(preset))
    model = load_model("lab")
    assert model.default_guidance_scale == preset.model.default_guidance_scale
    assert model.scheduler.config.beta_schedule == preset.model.noise_schedule


def test_title_words_of_new_builds_hold_no_blocked_word():
    """Labs built with block_offensive_words=N draw titles from the vocabulary without lists 1..N of the
    blocklist; each list catches words the raw vocabulary holds (it is not a list of absent words), and
    a later list keeps the earlier ones, so the data of a lab built with an earlier list do not change."""
    from dataclasses import replace

    from diffmem.lab.build import PRESETS
    from diffmem.lab.data import BLOCKLIST_VERSION, blocked_words, make_lab_data, title_vocabulary, title_words

    vocabulary = set(title_vocabulary())
    lists = [blocked_words(v) for v in range(1, BLOCKLIST_VERSION + 1)]
    for earlier, later in zip(lists, lists[1:]):
        assert earlier < later and (later - earlier) & vocabulary
    assert lists[0] & vocabulary
    for preset, version in (("base", 1), ("default", BLOCKLIST_VERSION)):
        config = PRESETS[preset].data
        assert config.block_offensive_words == version
        assert not set(title_words(config)) & blocked_words(version)
        data = make_lab_data(replace(config, num_non_memorized=2000))
        pairs = data.memorized + data.non_memorized + data.novel + data.out_of_style
        assert not {w for p in pairs for w in p.title_words} & blocked_words(version)
    with pytest.raises(ValueError, match="block_offensive_words=9"):
        blocked_words(9)


def test_shipped_lab_shows_no_blocked_word():
    """No caption of the shipped lab model, in any set a user sees (memorized and non-memorized, which
    `lab data` exports; novel and out-of-style), holds a word of the newest blocklist."""
    import re

    from diffmem.adapters import load_model
    from diffmem.lab.data import blocked_words

    data = load_model("lab").training_data()
    blocked = blocked_words()
    for name in ("memorized", "non-memorized", "novel", "out-of-style"):
        captions = [p.caption for p in data.prompt_set(name)]
        seen = {w for c in captions for w in re.findall(r"[a-z]+", c.lower())} & blocked
        assert not seen, f"the shipped lab's {name} captions hold blocked words: {sorted(seen)}"


def test_lab_notebooks_show_no_blocked_word():
    """The stored outputs of the lab's example notebooks (captions, augmented prompts, token tables)
    hold no word, or word piece, of the blocklist."""
    import json
    import re
    from pathlib import Path

    from diffmem.lab.data import blocked_words

    examples = Path(__file__).parent.parent / "examples"
    for name in ("detect", "explain", "mitigate"):
        cells = json.loads((examples / f"{name}.ipynb").read_text())["cells"]
        text = " ".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                        for c in cells for o in c.get("outputs", []))
        seen = set(re.findall(r"[a-z]+", text.lower())) & blocked_words()
        assert text and not seen, f"examples/{name}.ipynb shows blocked words: {sorted(seen)}"


def test_partial_descriptions_are_true_of_their_image(tmp_path):
    from diffmem.lab.data import QUADRANTS, LabDataConfig, make_lab_data, partial_descriptions
    from diffmem.lab.export import export_training_data

    data = make_lab_data(LabDataConfig(num_memorized=2, num_template=1, num_non_memorized=5, num_novel=1,
                                       num_out_of_style=1, num_title_words=50))
    for pair in data.non_memorized:
        texts = partial_descriptions(pair, 3)
        assert texts[0] == pair.caption and len(set(texts)) == 3
        for t in texts:
            assert t.startswith(f"the {pair.title_words[0]} {pair.title_words[1]}: a {pair.spec.colour} {pair.spec.shape}")
        assert QUADRANTS[pair.spec.quadrant] in texts[1] and pair.spec.second_shape in texts[2]
    with pytest.raises(ValueError, match="captions-per-image"):
        partial_descriptions(data.non_memorized[0], 4)
    export_training_data(data, tmp_path, captions_per_image=2)
    first = (tmp_path / "non_memorized" / "00000001.txt").read_text().splitlines()
    assert first == partial_descriptions(data.non_memorized[0], 2)
