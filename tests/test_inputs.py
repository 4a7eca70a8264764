"""Inputs as users' tools write them: read, or refused with one line naming the file (and line)."""

import json

import numpy as np
import pytest
from PIL import Image

from diffmem.cli.main import main
from diffmem.files import InputFileError, image_caption_pairs, open_rgb_image, read_text_lines
from diffmem.prompts import read_prompts


def test_byte_order_marks_and_line_endings_are_read(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"caption": "a cat"}\r\n{"caption": "a dog"}\r\n')
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa cat\r\na dog\rthe owl\n")
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfcaption,id\r\na cat,1\r\na dog,2\r\n")
    assert [r.prompt for r in read_prompts(tmp_path / "p.jsonl")] == ["a cat", "a dog"]
    assert [r.prompt for r in read_prompts(tmp_path / "p.txt")] == ["a cat", "a dog", "the owl"]
    assert [r.prompt for r in read_prompts(tmp_path / "p.csv")] == ["a cat", "a dog"]


def test_text_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    (tmp_path / "p.txt").write_bytes("a cat\nthe café\n".encode("utf-8") + "un café noir\n".encode("latin-1"))
    with pytest.raises(InputFileError, match=r"p.txt:3: not UTF-8 text \(byte 0xe9 at column 7\)"):
        read_prompts(tmp_path / "p.txt")
    (tmp_path / "p.jsonl").write_bytes(b'{"caption": "ok"}\n' + '{"caption": "é"}\n'.encode("latin-1"))
    with pytest.raises(InputFileError, match="p.jsonl:2: not UTF-8"):
        read_prompts(tmp_path / "p.jsonl")


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "CMYK", "I;16"])
def test_images_in_any_mode_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8))
    if mode == "I;16":  # 16-bit grey: scaled to 8 bits, not clipped at 255
        grey = rng.integers(0, 65535, (8, 10)).astype(np.uint16)
        img, expected = Image.fromarray(grey), np.round(grey / 65535 * 255)
    else:
        img = rgb.convert(mode)
        expected = np.asarray(img.convert("RGB"), dtype=np.float64)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    out = np.asarray(open_rgb_image(path), dtype=np.float64)
    assert out.shape == (8, 10, 3)
    if mode == "I;16":
        assert np.abs(out[..., 0] - expected).max() <= 1 and out[..., 0].max() > 200
    else:
        np.testing.assert_array_equal(out, expected)


def test_unreadable_images_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputFileError, match="empty.png: empty image file"):
        open_rgb_image(tmp_path / "empty.png")
    for name in ("cut.png", "text.png"):
        with pytest.raises(InputFileError, match=f"{name}: unreadable image"):
            open_rgb_image(tmp_path / name)


def _pair(folder, stem, caption="a cat", suffix=".png"):
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), "blue").save(folder / f"{stem}{suffix}")
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption)


def test_folder_layout_problems_are_named(tmp_path):
    _pair(tmp_path / "ok", "00000001")
    _pair(tmp_path / "ok", "00000002", "a dog", ".jpg")
    assert [(p.name, c) for p, c in image_caption_pairs(tmp_path / "ok")] == [("00000001.png", "a cat"),
                                                                            ("00000002.jpg", "a dog")]
    (tmp_path / "empty").mkdir()
    cases = {"empty": "no images", "missing": "no such folder"}
    _pair(tmp_path / "bare", "1", caption=None)
    cases["bare"] = "image 1.png has no caption file 1.txt"
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "7.txt").write_text("a caption")
    cases["lonely"] = "caption 7.txt has no image"
    _pair(tmp_path / "twice", "3")
    _pair(tmp_path / "twice", "3", suffix=".jpg")
    cases["twice"] = r"more than one image \(3.jpg, 3.png\)"
    for name, message in cases.items():
        with pytest.raises(InputFileError, match=message):
            image_caption_pairs(tmp_path / name)


def test_evaluate_with_a_broken_image_is_one_line_naming_it(tiny_sd_folder, tmp_path, capsys):
    data = tmp_path / "data"
    _pair(data, "00000001")
    (data / "00000002.png").write_bytes(b"\x89PNG broken")
    (data / "00000002.txt").write_text("a dog")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_sd_folder), "--dataset", str(data), "--mitigation", "none",
                 "--num-inference-steps", "2", "--num-generations", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "00000002.png: unreadable image" in err and "Traceback" not in err
    assert [l for l in err.replace("\r", "\n").splitlines() if "error" in l.lower()] == \
        [l for l in err.splitlines() if l.startswith("diffmem evaluate: error:")]  # one line, from diffmem
