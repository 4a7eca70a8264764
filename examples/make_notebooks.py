"""Write the example notebooks from the cells below and execute them, storing their outputs.

    python examples/make_notebooks.py                 # all four
    python examples/make_notebooks.py detect explain  # some of them
    python examples/make_notebooks.py --no-execute    # write without outputs

The lab notebooks read the model from DIFFMEM_LAB_MODEL (default: the built-in lab model);
stable_diffusion.ipynb reads DIFFMEM_SD_MODEL (default: a tiny random SD folder built offline).
Edit the notebooks here, not in Jupyter, so that the stored versions stay reproducible.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

EXAMPLES = Path(__file__).parent

LAB_SETUP = '''\
import os, tempfile
from pathlib import Path
from IPython.display import Image

from diffmem.adapters import load_model
from diffmem.lab.build import lab_data_for
from diffmem.lab.prompts import prompt_rows

MODEL = os.environ.get("DIFFMEM_LAB_MODEL", "lab")  # "lab": the built-in lab model, shipped with diffmem
FIGURES = Path(tempfile.mkdtemp())  # diffmem.reports writes PNG files; the notebook shows them inline

model = load_model(MODEL)
data = lab_data_for(model)  # the lab's prompt sets, with ground truth
print(MODEL, "| memorized captions:", len(data.memorized), "| novel captions:", len(data.novel))'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def detect_cells():
    return [
        md('''
# Detecting memorization

Wen et al. (ICLR 2024, sec. 3) detect memorization from the magnitude of the text-conditional noise
prediction, `d_t = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2`: a prompt that makes the model
reproduce a training image pulls the prediction far from the unconditional one, from the first
step on. This notebook runs on diffmem's built-in memorization lab (no download): a small
text-to-image model trained on captions whose ground truth is known: a few duplicated many times
(*memorized*), the rest seen a few times.
'''),
        code(LAB_SETUP),
        md('''
## 1. d per step for a memorized and a novel prompt (Wen et al., fig. 1)

Four generations of each prompt from the same four starting noises, 50 DDIM steps with
classifier-free guidance; `d` is recorded at every step while sampling (the images are the same as
without tracking). Wen et al. find `d` of memorized prompts larger from the first steps on; the
scores printed below are computed on this model.
'''),
        code('''
from diffmem.metrics import prompt_score
from diffmem.reports import plots
from diffmem.sampling import SamplingConfig, sample_prompts

memorized, novel = prompt_rows(data, "memorized"), prompt_rows(data, "novel", 100)
pair = {f"{row['set']}: {row['caption']}": row["caption"] for row in (memorized[0], novel[0])}
samples = {label: sample_prompts(model, [prompt], SamplingConfig(num_inference_steps=50, num_generations=4))[0]
           for label, prompt in pair.items()}  # each prompt alone, so both start from the same x_T
for label, s in samples.items():
    print(f"score (mean d over steps and generations) {prompt_score(s.text_noise_norm):.3f}   {label}")
Image(filename=plots.text_noise_norm_figure({k: s.text_noise_norm for k, s in samples.items()},
                                            {k: s.images for k, s in samples.items()}, FIGURES / "fig1.png"))
'''),
        md('''
## 2. Detection over the lab's prompt sets

First-step detection (`track_steps=1`: one UNet call per prompt), 4 generations per prompt, on all
memorized captions against 100 prompts of each of three controls: *non-memorized* training
captions (seen about 6 times in training), *novel* captions (unseen, same template) and
*out-of-style* captions (unseen, another template). The same run on the command line is `diffmem detect
--track-steps 1` followed by `diffmem roc`.
'''),
        code('''
config = SamplingConfig(num_generations=4, track_steps=1, batch_size=128)
sets = {"memorized": memorized, "non-memorized": prompt_rows(data, "non-memorized", 100), "novel": novel,
        "out-of-style": prompt_rows(data, "out-of-style", 100)}
d = {name: [s.text_noise_norm for s in sample_prompts(model, [r["caption"] for r in rows], config, decode=False)]
     for name, rows in sets.items()}  # per prompt: (generations, steps)
scores = {(name, g): [prompt_score(x, generations=g) for x in d[name]] for name in sets for g in (1, 4)}
'''),
        md('''
AUC, accuracy and TPR at 1% FPR (the paper's Table 1 columns), memorized against each control, with
1 and 4 generations per prompt:
'''),
        code('''
import pandas as pd
from diffmem.metrics import roc_metrics

rocs = {(control, g): roc_metrics(scores["memorized", g], scores[control, g])
        for control in ("non-memorized", "novel", "out-of-style") for g in (1, 4)}
pd.DataFrame([{"control": c, "generations": g, **r.summary()} for (c, g), r in rocs.items()]).round(3)
'''),
        md('''
ROC curve and score distributions against the novel captions (4 generations). The dashed line on
the right is the threshold that keeps the false-positive rate under 1%.
'''),
        code('''
Image(filename=plots.roc_figure(rocs["novel", 4], scores["memorized", 4], scores["novel", 4],
                                FIGURES / "roc_novel.png", title="memorized vs novel, first step, 4 generations",
                                negative_label="novel"))
'''),
        md('''
The same against non-memorized training captions: they were trained on too, only not duplicated.
'''),
        code('''
Image(filename=plots.roc_figure(rocs["non-memorized", 4], scores["memorized", 4], scores["non-memorized", 4],
                                FIGURES / "roc_non_memorized.png",
                                title="memorized vs non-memorized, first step, 4 generations"))
'''),
    ]


def explain_cells():
    return [
        md('''
# Explaining memorization: which words trigger it

Wen et al. (sec. 4) score each token by how much the detection metric changes when its embedding
changes: `s_j = ||d score / d e_j||_2`, the gradient of the first-step `d` with respect to the
j-th token embedding. On the lab, each memorized caption is a unique two-word *title* plus a
description (`the solve magazines: a yellow square`); the title words are what makes the caption
unique, so they are the ground-truth trigger words.
'''),
        code(LAB_SETUP),
        md('''
## 1. Token significance of a memorized caption

The caption explained is the memorized one with the highest detection score (first step, 4
generations), the one the detector flags most strongly.
'''),
        code('''
from diffmem.explain import prompt_scores, token_significance
from diffmem.reports.explain import significance_figure, significance_table

memorized = prompt_rows(data, "memorized")
scores = prompt_scores(model, [r["caption"] for r in memorized], steps=(0, 1), generations=4)
j = max(range(len(scores)), key=scores.__getitem__)  # position j starts from seed + j, as in detect
row = memorized[j]
explanation = token_significance(model, row["caption"], steps=(0, 1), generations=4, position=j)
print(significance_table(explanation))
print("ground-truth trigger words:", row["trigger_words"])
Image(filename=significance_figure(explanation, FIGURES / "significance.png"))
'''),
        md('''
## 2. Edit the trigger word

Replace the most significant of the caption's trigger words with a title word of an unseen caption,
and compare the score and the generations. The decision threshold is calibrated on 200 novel
captions with the same settings, at a false-positive rate under 1%.
'''),
        code('''
from diffmem.metrics import threshold_at_fpr

normal_scores = prompt_scores(model, [r["caption"] for r in prompt_rows(data, "novel", 200)], generations=4)
threshold = threshold_at_fpr(normal_scores, fpr=0.01)
trigger = max((w for w in explanation.words if w.word in row["trigger_words"]), key=lambda w: w.score)
rank = [w.word for w in explanation.ranked_words()].index(trigger.word) + 1
edited_prompt = row["caption"][:trigger.start] + data.novel[0].title_words[0] + row["caption"][trigger.end:]
edited = token_significance(model, edited_prompt, steps=(0, 1), generations=4, position=j)  # same x_T
print(f"edited word: {trigger.word!r} (rank {rank} of {len(explanation.words)} words); threshold {threshold:.3f}")
for ex in (explanation, edited):
    print(f"score {ex.score:.3f}  {'flagged' if ex.score >= threshold else 'not flagged':<11}  {ex.prompt}")
Image(filename=significance_figure(edited, FIGURES / "significance_edited.png"))
'''),
        md('''
Generations of both captions from the same four starting noises (50 DDIM steps), each row next to
the memorized caption's training image (left), with the best pixel cosine similarity of each
generation to it (1 = identical):
'''),
        code('''
from diffmem.eval_sets import lab_eval_set
from diffmem.reports.plots import comparison_grid
from diffmem.sampling import SamplingConfig, sample_prompts
from diffmem.similarity import pixel_cosine

training = lab_eval_set(data, "memorized").prompts[memorized.index(row)].training  # (M, 3, H, W)
images = [sample_prompts(model, [ex.prompt], SamplingConfig(num_inference_steps=50, num_generations=4))[0].images
          for ex in (explanation, edited)]
for ex, im in zip((explanation, edited), images):
    print(f"pixel cosine to the training image: {pixel_cosine(im, training).best.round(3)}  {ex.prompt}")
Image(filename=comparison_grid([training, training], images, FIGURES / "edit.png", tile=96))
'''),
    ]


def mitigate_cells():
    return [
        md('''
# Mitigating memorization at inference

Wen et al. (sec. 5.1) optimize the prompt embedding before sampling: a few AdamW steps that bring
the first-step `d` down to a target, the level of ordinary prompts. The baseline of Somepalli et
al. (2023) inserts random words into the prompt. Both are compared on the memorized lab caption
with the highest detection score, next to its training image, with copy similarity and prompt
alignment (does the image still show the described object?).
'''),
        code(LAB_SETUP),
        code('''
from diffmem.eval_sets import lab_eval_set
from diffmem.evaluate import EvaluateConfig, calibrate_target_loss
from diffmem.explain import prompt_scores
from diffmem.judge import Judge
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.sampling import SamplingConfig

eval_set = lab_eval_set(data, "memorized")  # captions with training image(s), described colour and shape
scores = prompt_scores(model, [p.caption for p in eval_set.prompts], steps=(0, 1), generations=4)
j = max(range(len(scores)), key=scores.__getitem__)  # the most strongly flagged; it starts from seed + j
target = eval_set.prompts[j]
sampling = SamplingConfig(num_inference_steps=50, num_generations=4)
target_loss = calibrate_target_loss(model, [r["caption"] for r in prompt_rows(data, "novel", 100)], sampling)[50.0]
print(f"{target.caption!r}: target loss {target_loss:.3f} (median first-step loss of 100 novel captions, the original unit)")
'''),
        md('''
## Before and after

One row per method: no mitigation, embedding optimization, random-word addition (4 words). The
training image is on the left; each method samples from the same four starting noises.
'''),
        code('''
from diffmem.reports.plots import comparison_grid

methods = {"no mitigation": MitigationConfig(method="none"),
           "embedding optimization": MitigationConfig(method="embedding-opt", target_loss=target_loss),
           "random-word addition": MitigationConfig(method="rand-word-add", repeat_num=4)}
results = {name: mitigate_unit(model, [target.caption], [j], m, sampling)[0] for name, m in methods.items()}
print("rows, top to bottom:", ", ".join(results))
Image(filename=comparison_grid([target.training] * len(results), [r.images for r in results.values()],
                               FIGURES / "mitigation.png", tile=96))
'''),
        md('''
Per method: the prompt sampled, first-step `d` before and after, AdamW steps, the best similarity of
each generation to the training image (pixel cosine: higher is more similar; tiled L2, Carlini et
al. 2023: lower is more similar; mean over the 4 generations), how many generations the lab's judge
counts as copies, and how many show the described object (alignment).
'''),
        code('''
import pandas as pd

judge = Judge(model, eval_set, EvaluateConfig(sampling=sampling))
rows = [{**judge.row(target, r, methods[name]), "method": name} for name, r in results.items()]
table = pd.json_normalize(rows).set_index("method")
columns = ["modified_prompt", "initial_d", "final_d", "iterations", "pixel_cosine.mean", "tiled_l2.mean", "copies",
           "aligned"]
table[columns].round(3)
'''),
    ]


def stable_diffusion_cells():
    return [
        md('''
# The same calls on Stable Diffusion

Every function of the lab notebooks takes any model behind diffmem's one model interface: a
diffusers Stable Diffusion 1.x/2.x folder, or a hub id already in the local Hugging Face cache
(diffmem never downloads). Without settings this notebook builds a tiny **random-weight** SD
folder offline (that is how the test suite runs it), so its numbers and pictures mean nothing;
point it at real weights to reproduce the paper.

## Getting the weights, the SSCD checkpoint and the prompt sets

- **Stable Diffusion v1.4** (the paper's model): on a machine with internet, `hf download
  CompVis/stable-diffusion-v1-4` (or `huggingface-cli download ...`), then set
  `DIFFMEM_SD_MODEL=CompVis/stable-diffusion-v1-4` (or the downloaded folder). SD 2.0 works the same
  (`stabilityai/stable-diffusion-2`).
- **SSCD** copy-detection checkpoint (Pizzi et al. 2022), used for copy similarity:
  `sscd_disc_large.torchscript.pt` from the README of
  [facebookresearch/sscd-copy-detection](https://github.com/facebookresearch/sscd-copy-detection);
  set `DIFFMEM_SSCD=/path/to/sscd_disc_large.torchscript.pt`.
- **Prompt sets** (set `DIFFMEM_SD_DATA` to the folder that holds them; without it the notebook
  uses two prompts of each kind written in it):
  - `sdv1_500_memorized.jsonl`: 500 prompts memorized by SD v1.4 (Webster 2023), with the LAION
    `index` and `url` of each training image: `examples/sdv1_500_memorized.jsonl` in the official
    repository of Wen et al., [YuxinWenRick/diffusion_memorization](https://github.com/YuxinWenRick/diffusion_memorization);
  - `sd1_nonmemorized_500.txt`, `sd2_memorized_219.txt`, `sd2_nonmemorized_500.txt`: Jeon et al.
    (ICML 2025), [Dongjae0324/sharpness_memorization_diffusion](https://github.com/Dongjae0324/sharpness_memorization_diffusion),
    `prompts/sd1_nmem.txt`, `prompts/sd2_mem.txt`, `prompts/sd2_nmem.txt`, renamed.
- **Training images** for similarity (optional): download each row's `url` to
  `gt_images/<index>/0.png` beside the `.jsonl` and set `DIFFMEM_SD_GROUND_TRUTH` to the `.jsonl`
  (or to a folder of `image + .txt caption` pairs).

On a GPU set `DIFFMEM_DEVICE=cuda`, and `DIFFMEM_SD_NUM_PROMPTS=500` for the full benchmark.
'''),
        code('''
import os, tempfile
from pathlib import Path
from IPython.display import Image

from diffmem.adapters import load_model
from diffmem.prompts import read_prompts
from diffmem.testing import make_tiny_sd_folder

MODEL = os.environ.get("DIFFMEM_SD_MODEL")
FIGURES = Path(tempfile.mkdtemp())
if MODEL is None:  # a random-weight SD 1.x folder, built offline in seconds
    MODEL = str(make_tiny_sd_folder(FIGURES / "tiny-sd"))
model = load_model(MODEL, device=os.environ.get("DIFFMEM_DEVICE", "cpu"))

DATA = Path(os.environ["DIFFMEM_SD_DATA"]) if "DIFFMEM_SD_DATA" in os.environ else None
N = int(os.environ.get("DIFFMEM_SD_NUM_PROMPTS", "8"))
if DATA is not None and (DATA / "sdv1_500_memorized.jsonl").is_file():
    memorized = [r.prompt for r in read_prompts(DATA / "sdv1_500_memorized.jsonl", end=N)]
    normal = [r.prompt for r in read_prompts(DATA / "sd1_nonmemorized_500.txt", end=N)]
else:  # two prompts of each kind, so that the notebook runs anywhere
    memorized = ["The No Limits Business Woman Podcast", "Mothers influence on her young hippo"]
    normal = ["a watercolor painting of a lighthouse at dawn", "a red bicycle leaning against a brick wall"]
print(model.name, "|", len(memorized), "memorized and", len(normal), "normal prompts")
'''),
        md('''
## 1. d per step (Wen et al., fig. 1)
'''),
        code('''
from diffmem.metrics import prompt_score
from diffmem.reports import plots
from diffmem.sampling import SamplingConfig, sample_prompts

pair = {"memorized: " + memorized[0]: memorized[0], "normal: " + normal[0]: normal[0]}
samples = {label: sample_prompts(model, [prompt], SamplingConfig(num_inference_steps=50, num_generations=4))[0]
           for label, prompt in pair.items()}
for label, s in samples.items():
    print(f"score {prompt_score(s.text_noise_norm):.3f}   {label}")
Image(filename=plots.text_noise_norm_figure({k: s.text_noise_norm for k, s in samples.items()},
                                            {k: s.images for k, s in samples.items()}, FIGURES / "fig1.png"))
'''),
        md('''
## 2. First-step detection, ROC
'''),
        code('''
from diffmem.metrics import roc_metrics

config = SamplingConfig(num_generations=4, track_steps=1, batch_size=32)
scores = {name: [prompt_score(s.text_noise_norm) for s in sample_prompts(model, prompts, config, decode=False)]
          for name, prompts in {"memorized": memorized, "normal": normal}.items()}
roc = roc_metrics(scores["memorized"], scores["normal"])
print(roc.summary())
Image(filename=plots.roc_figure(roc, scores["memorized"], scores["normal"], FIGURES / "roc.png",
                                title="memorized vs normal, first step, 4 generations", negative_label="normal"))
'''),
        md('''
## 3. Token significance
'''),
        code('''
from diffmem.explain import token_significance
from diffmem.reports.explain import significance_figure, significance_table

explanation = token_significance(model, memorized[0], steps=(0, 1), generations=4)
print(significance_table(explanation, top=10))
Image(filename=significance_figure(explanation, FIGURES / "significance.png"))
'''),
        md('''
## 4. Mitigation

Embedding optimization stops at a target loss, here the median first-step `d` of the normal
prompts (`calibrate_target_loss`; the seed used 3 on SD v1.4). Rows: no mitigation, embedding
optimization, random-word addition; the first column is the training image when
`DIFFMEM_SD_GROUND_TRUTH` is set, blank otherwise.
'''),
        code('''
from diffmem.eval_sets import EvalPrompt, EvalSet, load_eval_set
from diffmem.evaluate import EvaluateConfig, calibrate_target_loss
from diffmem.judge import Judge
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.reports.plots import comparison_grid
import pandas as pd
import torch

sampling = SamplingConfig(num_inference_steps=50, num_generations=4)
if "DIFFMEM_SD_GROUND_TRUTH" in os.environ:
    eval_set = load_eval_set(model, os.environ["DIFFMEM_SD_GROUND_TRUTH"], limit=1)
else:
    size = model.image_size
    eval_set = EvalSet("no training images", [EvalPrompt(memorized[0], torch.zeros(0, 3, size, size))])
target = eval_set.prompts[0]
target_loss = calibrate_target_loss(model, normal, sampling)[50.0]  # median first-step loss of the normal prompts (the original unit)
methods = {"no mitigation": MitigationConfig(method="none"),
           "embedding optimization": MitigationConfig(method="embedding-opt", target_loss=target_loss),
           "random-word addition": MitigationConfig(method="rand-word-add", repeat_num=4)}
results = {name: mitigate_unit(model, [target.caption], [0], m, sampling)[0] for name, m in methods.items()}
judge = Judge(model, eval_set, EvaluateConfig(sampling=sampling, sscd=os.environ.get("DIFFMEM_SSCD")))
rows = [{**judge.row(target, r, methods[name]), "method": name} for name, r in results.items()]
display(pd.json_normalize(rows).set_index("method"))
Image(filename=comparison_grid([target.training] * len(results), [r.images for r in results.values()],
                               FIGURES / "mitigation.png", tile=96))
'''),
    ]


NOTEBOOKS = {"detect": detect_cells, "explain": explain_cells, "mitigate": mitigate_cells,
             "stable_diffusion": stable_diffusion_cells}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(NOTEBOOKS)} (default: all)")
    parser.add_argument("--no-execute", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(NOTEBOOKS)
    if unknown:
        parser.error(f"unknown notebook(s) {', '.join(sorted(unknown))}; expected any of {', '.join(NOTEBOOKS)}")
    for name in args.names or NOTEBOOKS:
        nb = build(name)
        start = time.time()
        if not args.no_execute:
            execute(nb)
        nbformat.write(nb, EXAMPLES / f"{name}.ipynb")
        print(f"{name}.ipynb written{'' if args.no_execute else f', executed in {time.time() - start:.0f} s'}")


if __name__ == "__main__":
    main()
