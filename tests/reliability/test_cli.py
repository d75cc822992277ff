"""The ``nvlm`` command fails with ONE line on stderr (``nvlm: error: ...``), exit status 2 and no traceback; with
``--debug`` the exception propagates with its traceback. Ctrl-C: ``nvlm: interrupted``, status 130."""

import re

import pytest

from nvlm import cli


def one_line_error(capsys) -> str:
    """The error line; asserts that it is the only line after any progress-bar output and has no traceback."""
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = err.rstrip("\n").split("\n")
    errors = [line for line in lines if line.startswith("nvlm:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and err.endswith("\n")
    return errors[0]


@pytest.fixture
def bad_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"<html>404 Not Found</html>")
    return path


def cases(checkpoint, tmp_path, bad_image):
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    return [
        (["chat", "hi", "--model", str(tmp_path / "nowhere")], r"checkpoint folder '.*nowhere' does not exist"),
        (["chat", "hi", "--model", str(empty)], r"'.*empty' is not an NVLM checkpoint folder: it has no config.json"),
        (["chat", "What is it?", "--model", str(checkpoint), "--image", str(bad_image)],
         r"'.*photo.jpg' is not an image file Pillow can read"),
        (["chat", "What is it?", "--model", str(checkpoint), "--image", str(tmp_path / "missing.png")],
         r"image file '.*missing.png' does not exist"),
        (["chat", "<image> and <image>?", "--model", str(checkpoint), "--image", str(bad_image.parent / "ok.png")],
         r"2 <image> placeholder\(s\) but 1 image"),
        (["chat", "   ", "--model", str(checkpoint)], "nothing to process: no images and an empty text"),
        (["quantize", "--model", str(checkpoint), "--out", str(existing), "--quant", "int8"],
         r"save_pretrained: '.*exists' already exists \(pass overwrite=True to replace it\)"),
        (["quantize", "--model", str(checkpoint), "--out", str(tmp_path / "q"), "--group-size", "100"],
         r"argument 'group_size' must be one of \(32, 64, 128\), got 100"),
        (["plan", "--model", "nvlm-z-9000"], r"plan: argument 'model' 'nvlm-z-9000' is neither a preset"),
    ]


def test_errors_are_one_line_with_status_2(checkpoint, tmp_path, bad_image, capsys):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(bad_image.parent / "ok.png")
    for argv, match in cases(checkpoint, tmp_path, bad_image):
        assert cli.main(argv) == 2, argv
        line = one_line_error(capsys)
        assert line.startswith("nvlm: error: "), line
        assert re.search(match, line), (argv, line)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"      # the refused --out was not touched
    assert not (tmp_path / "q").exists()


def test_debug_shows_the_exception(checkpoint, tmp_path, bad_image):
    with pytest.raises(ValueError, match="is not an image file Pillow can read"):
        cli.main(["--debug", "chat", "What?", "--model", str(checkpoint), "--image", str(bad_image)])
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["--debug", "chat", "hi", "--model", str(tmp_path / "nowhere")])


def test_multi_line_and_empty_messages_still_print_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("first line\n  second line\n\tthird")

    monkeypatch.setattr(cli, "cmd_plan", boom)
    assert cli.main(["plan"]) == 2
    assert one_line_error(capsys) == "nvlm: error: first line second line third"

    def silent(args):
        raise KeyError()

    monkeypatch.setattr(cli, "cmd_plan", silent)
    assert cli.main(["plan"]) == 2
    assert one_line_error(capsys) == "nvlm: error: KeyError"


def test_ctrl_c(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_plan", interrupted)
    assert cli.main(["plan"]) == 130
    assert one_line_error(capsys) == "nvlm: interrupted"


def test_usage_errors_exit_2_without_traceback(capsys):
    """argparse's own errors (unknown command, missing option) exit with status 2 and usage, no traceback."""
    for argv in (["fly"], ["chat", "hi"], ["plan", "--quant", "int3"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("usage: nvlm")
        assert re.search(r"^nvlm( \w+)?: error: ", err, re.M), err
