"""The judge of an evaluation's generations: copy similarity to the prompt's training images per
metric, copies by a threshold or by the lab's copy rule, alignment (lab) or CLIP score.

The lab's own copy rule and content check live in ``diffmem.lab.judge``; this module applies them,
and the similarity metrics of ``diffmem.similarity``, to every generation of a mitigation setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem.eval_sets import EvalPrompt, EvalSet
from diffmem.mitigate import MitigatedPrompt, MitigationConfig, setting_key, setting_value

if TYPE_CHECKING:
    from diffmem.evaluate import EvaluateConfig


class Judge:
    """All per-generation measurements of one evaluation set, set up once."""

    def __init__(self, model, eval_set: EvalSet, config: "EvaluateConfig"):
        from diffmem import similarity

        self.config, self.eval_set = config, eval_set
        self.sscd = similarity.SSCD(config.sscd, model.device) if config.sscd else None
        self.clip = similarity.CLIPScorer(config.clip, model.device) if config.clip else None
        self.metrics = {"tiled_l2": similarity.tiled_l2, "pixel_cosine": similarity.pixel_cosine}
        if self.sscd is not None:
            self.metrics = {"sscd": self.sscd.similarity, **self.metrics}
        self.copy_metric = config.copy_metric or ("sscd" if self.sscd else "pixel_cosine")
        if self.copy_metric not in self.metrics:
            raise ValueError(f"--copy-metric {self.copy_metric}: expected one of {', '.join(self.metrics)}")
        self._gt_clip: dict[tuple[str, str], float] = {}
        self.lab_train = self.lab_threshold = None
        if eval_set.lab_data is not None:
            from diffmem.lab.judge import TrainingImages, copy_threshold

            self.lab_train = TrainingImages.of(eval_set.lab_data)
            self.lab_threshold = copy_threshold(eval_set.lab_data, self.lab_train)

    def row(self, prompt: EvalPrompt, result: MitigatedPrompt, setting: MitigationConfig) -> dict:
        images = result.images  # (G, 3, H, W)
        row = {"method": setting.method, "setting": setting_key(setting), "value": setting_value(setting),
               "position": result.position, "prompt": prompt.caption, "modified_prompt": result.modified_prompt,
               "source": prompt.key, "num_generations": len(images), "initial_d": result.initial_d,
               "final_d": result.final_d, "initial_loss": result.initial_loss, "final_loss": result.final_loss,
               "target_unit": setting.target_unit, "iterations": result.iterations, "unet_rows": result.unet_rows,
               "seconds": result.seconds, **result.info}
        best = {}
        if len(prompt.training):
            for name, fn in self.metrics.items():
                r = fn(images, prompt.training)
                row[name] = {**r.summary(), "top3_mean": r.top_mean(3)}  # over the prompt's generations
                best[name] = r
        if self.config.copy_threshold is not None and self.copy_metric in best:
            r = best[self.copy_metric]
            copies = r.best > self.config.copy_threshold if r.higher_is_better else r.best < self.config.copy_threshold
            row["copies_by_threshold"] = int(copies.sum())
        if self.lab_train is not None:
            from diffmem.lab.judge import content_correct, judge_copies

            arr = images.numpy()
            row["copies"] = int(judge_copies(arr, [prompt.caption] * len(arr), self.lab_train, self.lab_threshold).is_copy.sum())
            row["aligned"] = int(content_correct(arr, [prompt.colour] * len(arr), [prompt.shape] * len(arr)).sum())
        elif "copies_by_threshold" in row:
            row["copies"] = row["copies_by_threshold"]
        if self.clip is not None:
            row["clip_score"] = float(self.clip.score(images, [prompt.caption] * len(images)).mean())
            if len(prompt.training):  # the training image against its own caption (the original's gt_clip_score)
                row["gt_clip_score"] = self.gt_clip_score(prompt)
        return row

    def gt_clip_score(self, prompt: EvalPrompt) -> float:
        """Mean CLIP score of the prompt's training image(s) against its caption, computed once per prompt."""
        key = (prompt.key, prompt.caption)
        if key not in self._gt_clip:
            self._gt_clip[key] = float(self.clip.score(prompt.training, [prompt.caption] * len(prompt.training)).mean())
        return self._gt_clip[key]
