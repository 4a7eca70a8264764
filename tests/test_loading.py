"""Model loading: SD folders, hub ids only from the local cache, --unet swaps, dtypes, clear errors."""

import shutil

import pytest
import torch

from diffmem.adapters import load_model, resolve_dtype


def test_sd_folder_loads_with_the_interface(tiny_sd):
    from diffmem.model import DiffusionModel

    assert isinstance(tiny_sd, DiffusionModel)
    emb = tiny_sd.encode_prompts(["a cat", "a dog"]).embeddings
    assert emb.shape == (2, tiny_sd.max_tokens, 32)
    assert torch.equal(tiny_sd.empty_conditioning().embeddings, tiny_sd.encode_prompts([""]).embeddings)
    toks = tiny_sd.tokens("ab c")
    assert toks[0].special and [t.text for t in toks[1:5]] == ["a", "b", "c", "<|endoftext|>"]
    assert not any(t.special for t in toks[1:4]) and all(t.special for t in toks[4:])


def test_hub_id_missing_from_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="hf download CompVis/stable-diffusion-v1-4"):
        load_model("CompVis/stable-diffusion-v1-4")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model("./no/such/folder")


def test_hub_id_found_in_local_cache(tiny_sd_folder, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd_folder, snap)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    from huggingface_hub import snapshot_download

    try:
        snapshot_download("someone/tiny-sd", local_files_only=True, cache_dir=str(cache))
    except Exception as e:  # pragma: no cover - depends on huggingface_hub's cache checks
        pytest.skip(f"huggingface_hub does not accept a hand-made cache here: {e}")
    model = load_model("someone/tiny-sd")
    assert model.latent_shape == (4, 16, 16)


def test_missing_component_is_named(tiny_sd_folder, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae/ is missing"):
        load_model(str(broken))


def test_unet_swap(tiny_sd_folder, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(tmp_path / "finetuned")
    swapped = load_model(str(tiny_sd_folder), unet=str(tmp_path / "finetuned"))
    a = next(swapped.unet.parameters())
    b = next(tiny_sd.unet.parameters())
    torch.testing.assert_close(a, b + 0.01)
    with pytest.raises(FileNotFoundError, match="--unet"):
        load_model(str(tiny_sd_folder), unet=str(tmp_path / "nothing"))


def test_dtypes(tiny_sd_folder):
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("float64", "cpu")
    m = load_model(str(tiny_sd_folder), dtype="bfloat16")
    assert next(m.unet.parameters()).dtype == torch.bfloat16
    assert m.encode_prompts(["x"]).embeddings.dtype == torch.bfloat16


class _Evil:
    """A pickle that runs a command when unpickled with arbitrary objects allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_never_unpickled_as_objects(tiny_sd_folder, tmp_path, capsys):
    import shutil

    from diffmem.cli.main import main

    folder = tmp_path / "m"
    shutil.copytree(tiny_sd_folder, folder)
    marker = tmp_path / "ran"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": _Evil(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "p.txt").write_text("a cat\n")
    code = main(["detect", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.jsonl"),
                 "--num-inference-steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load its weights" in err and "Traceback" not in err
    assert not marker.exists()
