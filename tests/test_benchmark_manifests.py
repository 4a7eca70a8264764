"""Every kept benchmark result says where it came from (a MANIFEST.json: command, model identity hash,
commit, date), and the figures the README and docs/detectors.md quote equal the result files they cite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Result roots: a root's MANIFEST.json is either one record for the whole root (one result folder) or
# maps each file directly in it to its record, every folder in it then having a MANIFEST.json of its own.
ROOTS = ("lab", "lab-flow", "history/lab_cells_unblocked", "history/lab_cells", "history/lab_cells_linear", "history/lab_scaled", "history/lab_mitigation_ckpt4000")
HISTORY = RESULTS / "history"  # results of retired lab models; its MANIFEST.json maps its loose files
COMMAND_STARTS = ("diffmem", "python", "OMP_NUM_THREADS=1 python", "benchmarks/")
NOT_SHIPPED = re.compile(r"not shipped \(retired model; rebuild with `diffmem lab build --preset [a-z-]+`\)")
TRAINED_BY_COMMAND = "trained by the command ("
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # line breaks as spaces


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _records() -> list[tuple[str, Path, dict]]:
    """(name, what it describes, record) for every record of every manifest; asserts the coverage."""
    out = []
    assert sorted(p.name for p in RESULTS.iterdir()) == ["history", "lab", "lab-flow"], \
        "benchmarks/results/ holds lab/, lab-flow/ and history/"
    top = _load(HISTORY / "MANIFEST.json")
    for entry in sorted(HISTORY.iterdir()):
        if entry.is_dir():
            assert f"history/{entry.name}" in ROOTS, f"benchmarks/results/history/{entry.name}/ is not a result root this test knows"
        elif entry.name != "MANIFEST.json":
            assert entry.name in top, f"benchmarks/results/history/MANIFEST.json lacks {entry.name}"
    out += [(f"history/{name}", HISTORY / name, rec) for name, rec in top.items()]
    for root in ROOTS:
        folder = RESULTS / root
        manifest = _load(folder / "MANIFEST.json")
        if "command" in manifest:  # the root is one result folder
            out.append((root, folder, manifest))
            continue
        files = {p.name for p in folder.iterdir() if p.is_file() and p.name != "MANIFEST.json"}
        assert set(manifest) == files, f"{root}/MANIFEST.json maps {sorted(manifest)}, the folder holds {sorted(files)}"
        out += [(f"{root}/{name}", folder / name, rec) for name, rec in manifest.items()]
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            assert (sub / "MANIFEST.json").is_file(), f"{root}/{sub.name}/ has no MANIFEST.json"
            out.append((f"{root}/{sub.name}", sub, _load(sub / "MANIFEST.json")))
    return out


RECORDS = _records()


@pytest.fixture(scope="module")
def shipped_hash() -> str:
    from diffmem.adapters import load_model

    return load_model("lab").identity()["sha256_16"]


@pytest.fixture(scope="module")
def shipped_flow_hash() -> str:
    from diffmem.adapters import load_model

    return load_model("lab-flow").identity()["sha256_16"]


@pytest.mark.parametrize("name,path,record", RECORDS, ids=[r[0] for r in RECORDS])
def test_manifest_fields(name, path, record):
    command = record["command"]
    assert isinstance(command, str) and command.strip() and command.startswith(COMMAND_STARTS), (name, command)
    assert isinstance(record["model"], str) and record["model"], name
    assert isinstance(record["retired"], bool), name
    weights = record["weights_sha256_16"]
    if record["retired"]:
        assert NOT_SHIPPED.fullmatch(weights) or re.fullmatch(r"[0-9a-f]{16}", weights), (name, weights)
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", weights) or weights.startswith(TRAINED_BY_COMMAND), (name, weights)
    commit = record["diffmem_commit"]
    for c in [commit] if isinstance(commit, str) else commit or []:
        assert re.fullmatch(r"[0-9a-f]{40}", c), (name, c)
    assert record["date"] is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]), name
    assert record["machine"], name
    for part, sub in record.get("parts", {}).items():
        assert (path / part).is_dir(), f"{name}: parts names {part}, which is not a folder there"
        assert sub["command"].startswith(COMMAND_STARTS), (name, part)


def test_shipped_lab_results_name_the_shipped_model(shipped_hash, shipped_flow_hash):
    shipped = [(name, rec) for name, _, rec in RECORDS if not rec["retired"] and rec["model"] == "lab"]
    assert len(shipped) >= 5
    for name, rec in shipped:
        assert rec["weights_sha256_16"] == shipped_hash, name
    flow = [(name, rec) for name, _, rec in RECORDS if rec["model"] == "lab-flow"]
    assert len(flow) >= 4 and all(name.startswith("lab-flow/") for name, _ in flow)
    for name, rec in flow:
        assert rec["weights_sha256_16"] == shipped_flow_hash and not rec["retired"], name
    for name, path, rec in RECORDS:  # a file that records the model's identity agrees with its manifest
        for f in [path] if path.is_file() else sorted(path.rglob("*.json")):
            data = _load(f) if f.suffix == ".json" and f.name != "MANIFEST.json" else {}
            identity = data.get("model_identity") or data.get("provenance", {}).get("model_identity")
            if identity:
                assert rec["weights_sha256_16"] == identity["sha256_16"], f
    assert all(rec["retired"] for name, _, rec in RECORDS if not name.startswith(("lab/", "lab-flow/"))), \
        "results outside benchmarks/results/lab/ and lab-flow/ are of retired lab models"


def _provenance(path: Path) -> tuple[set[str], set[str]]:
    """The commits and dates the JSON files at or under `path` name."""
    commits, dates = set(), set()
    for f in [path] if path.is_file() else sorted(path.rglob("*.json")):
        if f.suffix != ".json" or f.name == "MANIFEST.json":
            continue
        data = _load(f)
        p = data.get("provenance", data) if isinstance(data, dict) else {}
        if p.get("git_commit") or p.get("git"):
            commits.add(p.get("git_commit") or p.get("git"))
        if p.get("time"):
            dates.add(p["time"][:10])
    return commits, dates


@pytest.mark.parametrize("name,path,record", RECORDS, ids=[r[0] for r in RECORDS])
def test_manifest_agrees_with_the_files_provenance(name, path, record):
    # report.md is described by report.json's provenance (it has none of its own)
    commits, dates = _provenance(path.with_suffix(".json") if path.suffix == ".md" else path)
    commit = record["diffmem_commit"]
    listed = {commit} if isinstance(commit, str) else set(commit or [])
    assert listed == commits, f"{name}: the manifest names commits {sorted(listed)}, the files {sorted(commits)}"
    assert ({record["date"]} if record["date"] else set()) == dates, f"{name}: rerun? the files say {sorted(dates)}"


# -- the README's figures against the files it cites ------------------------------------------------------------

LAB = RESULTS / "lab"
UNBLOCKED = HISTORY / "lab_cells_unblocked"  # the lab model shipped until 2026-12-06


def _gen(report: dict, name: str) -> dict:
    return next(g for g in report["generation"] if g["set"] == name)


def _detection(report: dict) -> str:
    large = report["detection_first_step_large"]
    values = {f"{r[k]:.3f}" for r in large for k in ("auc", "tpr_at_1fpr")}
    assert len(values) == 1, values
    n = {r["control"]: r["n_control"] for r in large}
    return (f"first-step detection with one generation reaches AUC and TPR@1%FPR {values.pop()} against "
            f"{n['non-memorized']} non-memorized, {n['novel']} novel and {n['out-of-style']} out-of-style")


def _copies(report: dict) -> str:
    return (f"Memorized captions are copied in {_gen(report, 'memorized')['copy_rate']:.3f} of generations, "
            f"novel ones in {_gen(report, 'novel')['copy_rate']:.3f}.")


def _explanation(explain: dict) -> str:
    first = next(w for w in explain["results"] if w["steps"] == [0, 1])
    sets = {s["name"]: s for s in first["sets"]}
    mem, ordinary = sets["memorized"], [sets["non-memorized"], sets["novel"]]
    top = round(mem["top1_word_is_title"] * mem["n"])
    titles = round(sum(s["top1_word_is_title"] * s["n"] for s in ordinary))
    return (f"at the first step a trigger word ranks first for {top} of {mem['n']} memorized captions "
            f"({mem['top1_word_is_title']:.0%}) and a title word for {titles or 'none'} of "
            f"{sum(s['n'] for s in ordinary)} ordinary ones; "
            f"deleting it brings {mem['flagged_cleared_by_deletion']:.0%} of them under the 1%-FPR threshold, "
            f"replacing it {mem['flagged_cleared_by_replacement']:.0%}.")


def _inference_mitigation(summary: dict) -> str:
    res = summary["results"]
    by_pct = {float(p): v for p, v in summary["target_loss_calibration"]["percentiles"].items()}
    opt = {p: next(r for r in res["embedding-opt"].values() if r["value"] == v) for p, v in by_pct.items()}
    none_left = [p for p in sorted(opt) if opt[p]["copy_rate"] == 0]  # the targets that leave no copy
    assert none_left == sorted(opt)[: len(none_left)] and none_left, "no copy at the lowest targets"
    align = [opt[p]["alignment_mean"] for p in none_left]
    rest = "; ".join(f"{opt[p]['copy_rate']:.3f} copies at alignment {opt[p]['alignment_mean']:.3f} at p{p:.0f}"
                     for p in sorted(opt) if p not in none_left)
    words = min(res["rand-word-add"].values(), key=lambda r: r["copy_rate"])
    return (f"takes the copy rate of memorized prompts from {res['none']['default']['copy_rate']:.3f} to "
            f"**0.000** at every target from the {none_left[0]:.0f}th to the {none_left[-1]:.0f}th percentile of "
            f"non-memorized prompts' first-step d (alignment {min(align):.3f}-{max(align):.3f}; {rest}), while adding "
            f"random words gets no lower than {words['copy_rate']:.3f} ({words['value']} words, alignment "
            f"{words['alignment_mean']:.3f})")


def _training_mitigation(_: dict) -> str:
    p85 = _load(UNBLOCKED / "train_mitigation" / "p85" / "evaluation.json")
    p80 = _load(UNBLOCKED / "train_mitigation" / "p80_unfiltered_t0-99" / "evaluation.json")
    loss = p85["filtered"]["non_memorized_loss"] / p85["unfiltered"]["non_memorized_loss"] - 1
    align = p80["filtered"]["non-memorized"]["alignment_mean"] / p80["unfiltered"]["non-memorized"]["alignment_mean"] - 1
    return (f"takes memorized copies from {p85['unfiltered']['memorized']['copy_rate']:.3f} to "
            f"{p85['filtered']['memorized']['copy_rate']:.3f} (p85 in every band; non-memorized loss **{loss:+.1%}**) "
            f"or {p80['filtered']['memorized']['copy_rate']:.3f} (p80, t < 100 unfiltered; non-memorized alignment "
            f"**{align:+.1%}**)")


def _finetune_mitigation(evaluation: dict) -> str:
    plain, bands = evaluation["plain"], evaluation["filter-bands"]
    loss = bands["non_memorized_loss"] / plain["non_memorized_loss"] - 1
    align = bands["non-memorized"]["alignment_mean"] / plain["non-memorized"]["alignment_mean"] - 1
    captions = min(r["memorized"]["copy_rate"] for name, r in evaluation.items() if name == "rand-word" or name.startswith("sp-"))
    noise = min((r["memorized"]["copy_rate"], name) for name, r in evaluation.items()
                if name.startswith("gni-") and r["non-memorized"]["alignment_mean"] >= 0.9 * plain["non-memorized"]["alignment_mean"])
    return (f"takes memorized copies from {plain['memorized']['copy_rate']:.3f} to "
            f"{bands['memorized']['copy_rate']:.3f} with non-memorized loss **{loss:+.1%}** and alignment **{align:+.1%}**. "
            f"Caption strategies (the original code's random word; Somepalli et al.'s replaced, added or repeated tokens and "
            f"several captions per image) leave copies at {captions:.3f} or more; of the scales of Gaussian noise on the "
            f"text embedding that keep alignment within 10%, std {noise[1].removeprefix('gni-')} comes closest, at {noise[0]:.3f} copies")


def _flow_headline(report: dict) -> str:
    first = [r for r in report["detection_first_step_large"] if r["steps"] == "first step"]
    values = {f"{r[k]:.3f}" for r in first for k in ("auc", "tpr_at_1fpr")}
    assert len(values) == 1, values
    n = {r["control"]: r["n_control"] for r in first}
    return (f"memorized captions are copied in {_gen(report, 'memorized')['copy_rate']:.3f} of generations, novel ones "
            f"in {_gen(report, 'novel')['copy_rate']:.3f}, and d on the velocity at sigma = 1 with one generation reaches "
            f"AUC and TPR@1%FPR {values.pop()} against {n['non-memorized']} non-memorized, {n['novel']} novel and "
            f"{n['out-of-style']} out-of-style captions")


LAB_FLOW = RESULTS / "lab-flow"

README_FIGURES = [  # (what, the file the README cites, the README's text computed from that file)
    ("detection AUC and TPR", LAB / "report.json", _detection),
    ("copy rates", LAB / "report.json", _copies),
    ("explanation percentages", LAB / "explain_lab.json", _explanation),
    ("inference mitigation", LAB / "mitigation" / "summary.json", _inference_mitigation),
    ("training mitigation", UNBLOCKED / "train_mitigation" / "band_diagnostics.json", _training_mitigation),
    ("fine-tune mitigation", LAB / "finetune" / "evaluation.json", _finetune_mitigation),
    ("flow lab", LAB_FLOW / "report.json", _flow_headline),
]


@pytest.mark.parametrize("what,source,compute", README_FIGURES, ids=[f[0] for f in README_FIGURES])
def test_readme_figures_match_their_result_files(what, source, compute):
    section = README.split("## Results on the lab model", 1)[1].split(" ## ", 1)[0]
    assert str(source.relative_to(ROOT).parent) in section, f"the README no longer cites {source}"
    expected = compute(_load(source))
    assert expected in section, f"README's {what} differ from {source.relative_to(ROOT)}: expected {expected!r}"


def test_finetune_table_in_docs_is_the_evaluation():
    """docs/mitigation.md's fine-tune table is the benchmark's table of benchmarks/results/lab/finetune/evaluation.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab_finetune_mitigation", ROOT / "benchmarks" / "lab_finetune_mitigation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    evaluation = _load(LAB / "finetune" / "evaluation.json")
    lines = bench.table_lines(evaluation)
    assert len(lines) == 2 + len(evaluation)
    doc = (ROOT / "docs" / "mitigation.md").read_text(encoding="utf-8").split("### Fine-tuning a base model", 1)[1]
    quoted = [line for line in doc.splitlines() if line.startswith("|")]
    assert quoted[: len(lines)] == lines, "docs/mitigation.md's fine-tune table differs from finetune/evaluation.json"
    assert (LAB / "finetune" / "table.md").read_text(encoding="utf-8").splitlines() == lines


def test_lora_finetune_table_in_docs_is_the_evaluation():
    """docs/mitigation.md's LoRA table: the full fine-tune's base and plain rows beside the LoRA run's,
    rendered from their evaluation.json files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab_finetune_mitigation", ROOT / "benchmarks" / "lab_finetune_mitigation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full, lora = _load(LAB / "finetune" / "evaluation.json"), _load(LAB / "finetune_lora" / "evaluation.json")
    lines = bench.table_lines({"base": full["base"], "plain": full["plain"], **lora}, "plain")
    doc = (ROOT / "docs" / "mitigation.md").read_text(encoding="utf-8").split("#### The same fine-tune as a LoRA adapter", 1)[1]
    quoted = [line for line in doc.splitlines() if line.startswith("|")]
    assert quoted[: len(lines)] == lines, "docs/mitigation.md's LoRA table differs from the evaluation files"
    assert all(r["memorized"]["copy_rate"] == 0.0 for r in lora.values()) and "The adapter did not memorize" in doc
    scale = (LAB / "finetune_lora_scale" / "table.md").read_text(encoding="utf-8").split("\n\n", 1)[1]
    page = (ROOT / "docs" / "fine-tunes.md").read_text(encoding="utf-8")
    assert page.split("<!-- lora-scale-table -->\n", 1)[1].split("<!-- /lora-scale-table -->", 1)[0] == scale


def test_detector_table_matches_bench_detect():
    table = _load(LAB / "bench_detect" / "table.json")  # read fresh: a newer run may replace it
    rows = {(r["method"], r["steps"], str(r["generations"]), r["control"]): r for r in table["rows"]}
    doc = (ROOT / "docs" / "detectors.md").read_text(encoding="utf-8").split("## On the lab", 1)[1]
    doc = doc.split("### The 2026 detectors on the lab", 1)[0]  # that table is held by the test below
    quoted = [[c.strip() for c in line.strip("|").split("|")] for line in doc.splitlines()
              if line.startswith("| ") and not line.startswith("| method")]

    def cell(value, ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    seen = set()
    for method, steps, g, control, auc, tpr1, tpr3, unet_rows, seconds in quoted:
        key = (method, steps, g, control)
        assert key in rows, f"docs/detectors.md quotes {key}, which table.json lacks"
        r = rows[key]
        assert [auc, tpr1, tpr3, unet_rows, seconds] == [
            cell(r["auc"], r["auc_ci95"]), cell(r["tpr_at_1fpr"], r["tpr_at_1fpr_ci95"]),
            cell(r["tpr_at_3fpr"], r["tpr_at_3fpr_ci95"]), f"{r['unet_rows_per_prompt']:.0f}",
            f"{r['seconds_per_prompt']:.3f}"], f"docs/detectors.md's row {key} differs from table.json"
        seen.add(key)
    spot = {("wen", "first", "1", "non-memorized"), ("jeon-fd", "first", "1", "novel"),
            ("bright-ending", "all", "1", "novel"), ("ren-ae", "all", "4", "novel"), ("carlini", "all", "4", "out-of-style")}
    assert spot <= seen, f"docs/detectors.md's table lacks {sorted(spot - seen)}"


def test_readme_mitigation_comparison_figures_are_the_benchmarks():
    """The README's sentence on the field's mitigations quotes the shipped lab's results.json."""
    rows = _load(LAB / "mitigations" / "results.json")["rows"]

    def best(method: str) -> dict:  # the setting with the fewest copies, then the best alignment
        return min((r for r in rows if r["method"] == method and r["status"] == "ok"),
                   key=lambda r: (r["copy_rate"], -r["alignment"]))

    mild = best("embedding-opt")
    assert (f"embedding optimization is the one method that stops copies while keeping most of the alignment "
            f"({mild['copy_rate']:.3f} copies at alignment {mild['alignment']:.3f})") in README
    amg, cfg = best("amg"), best("delayed-cfg")
    assert (f"anti-memorization guidance ({amg['copy_rate']:.3f} copies at alignment {amg['alignment']:.3f}) and "
            f"delayed guidance ({cfg['copy_rate']:.3f} at {cfg['alignment']:.3f})") in README


def test_guidance_table_in_docs_is_the_sweep():
    """docs/lab.md's guidance table, row by row, from benchmarks/results/lab/guidance_sweep.json."""
    rows = json.loads((LAB / "guidance_sweep.json").read_text())["rows"]
    doc = (ROOT / "docs" / "lab.md").read_text()
    for r in rows:
        m, n = r["memorized"], r["novel"]
        line = (f"| {r['guidance_scale']} | {m['copy_rate']:.3f} | {m['content_accuracy']:.3f} | "
                f"{n['copy_rate']:.3f} | {n['content_accuracy']:.3f} |")
        assert line in doc, line


def test_lr_and_looser_target_tables_in_docs_are_the_evaluations():
    """docs/mitigation.md's lr 0.05 rows and its looser-target table, from their summary.json files."""
    doc = (ROOT / "docs" / "mitigation.md").read_text()
    lr05 = json.loads((LAB / "mitigation_lr0.05" / "summary.json").read_text())
    targets = lr05["provenance"]["config"]["target_losses"]
    for pct, (target, r) in zip(("p5", "p25", "p50", "p75", "p95"), zip(targets, lr05["results"]["embedding-opt"].values())):
        sim = r["similarity_mean"]
        assert (f"| embedding-opt | target {pct} = {target:.3f} | {r['final_d_mean']:.3f} | {r['iterations_mean']:.1f} | "
                f"{r['copy_rate']:.3f} | {r['alignment_mean']:.3f} | {sim['pixel_cosine']:.3f} | {sim['tiled_l2']:.3f} |") in doc
    high = json.loads((LAB / "mitigation_high" / "summary.json").read_text())["results"]["embedding-opt"]
    low = json.loads((LAB / "mitigation_lr0.01_high" / "summary.json").read_text())["results"]["embedding-opt"]
    cell = lambda r: f"{r['final_d_mean']:.3f} / {r['iterations_mean']:.1f} / {r['copy_rate']:.3f} / {r['alignment_mean']:.3f}"
    for a, b in zip(high.values(), low.values()):
        assert a["value"] == b["value"]
        assert f"| {a['value']:g} | {cell(a)} | {cell(b)} |" in doc, a["value"]


def test_constrained_table_in_docs_is_the_sweep():
    """docs/mitigation.md's L2-constrained table, row by row, from its table.json."""
    doc = (ROOT / "docs" / "mitigation.md").read_text()
    for r in json.loads((LAB / "constrained_mitigation" / "table.json").read_text())["rows"]:
        assert (f"| {r['setting']} |" in doc and
                f"| {r['copy_rate']:.3f} | {r['alignment']:.3f} | {r['final_loss']:.3f} | {r['iterations']:.1f} |" in doc), r


def test_the_2026_detector_table_in_docs_is_the_benchmark():
    table = (LAB / "bench_detect_2026" / "table.md").read_text(encoding="utf-8")
    doc = (ROOT / "docs" / "detectors.md").read_text(encoding="utf-8")
    assert doc.split("<!-- bench-detect-2026 -->\n", 1)[1].split("<!-- /bench-detect-2026 -->", 1)[0] == table
    rows = _load(LAB / "bench_detect_2026" / "table.json")["rows"]
    wen = {(r["steps"], r["generations"], r["control"]): r for r in rows if r["method"] == "wen"}
    others = [r for r in rows if r["method"] != "wen"]
    better = [r for r in others if r["tpr_at_1fpr"] > wen[(r["steps"], r["generations"], r["control"])]["tpr_at_1fpr"]
              or r["auc"] > wen[(r["steps"], r["generations"], r["control"])]["auc"]]
    assert not better and "None of the 2026 detectors does better than Wen's d on the lab" in doc


def test_the_dori_table_in_docs_is_the_benchmark():
    """docs/mitigations.md's DoRI table: the bench mitigate --dori rows of the shipped lab's results.json."""
    results = _load(LAB / "mitigations" / "results.json")
    lines = [line for line in (LAB / "mitigations" / "table.md").read_text(encoding="utf-8").split("Under the DoRI attack", 1)[1]
             .splitlines() if line.startswith("|")]
    doc = (ROOT / "docs" / "mitigations.md").read_text(encoding="utf-8")
    shown = doc.split("<!-- dori-table -->\n", 1)[1].split("<!-- /dori-table -->", 1)[0]
    assert shown.splitlines() == lines
    dori = {r["method"]: r for r in results["dori"]}
    assert dori["guard"]["copy_rate_dori"] == 0.0 and "`guard` survives it" in doc
    assert {"none", "nemo", "ren-attention", "guard", "broken-memories", "amg", "delayed-cfg"} <= set(dori)


def test_the_training_time_dori_figures_in_docs_are_dori_json():
    """The DoRI attack on the lab's fine-tunes, as docs/mitigation.md and docs/mitigations.md quote it."""
    table = _load(LAB / "dori.json")
    pages = [(ROOT / "docs" / page).read_text(encoding="utf-8") for page in ("mitigation.md", "mitigations.md")]
    for run in ("filter-bands", "iet-agc", "iet-agc-ensemble"):
        r = table[f"runs/ft/{run}"]
        quoted = f"{run}: {r['copy_rate_prompt']:.3f} from the captions, {r['copy_rate_dori']:.3f} under the attack"
        assert all(quoted in " ".join(page.split()) for page in pages), quoted
    assert f"{table['lab']['copy_rate_dori']:.3f}" in pages[0]
