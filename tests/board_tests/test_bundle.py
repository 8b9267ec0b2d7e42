"""The model bundle as code (stages/common/bundle.py): the one labels.txt reader and writer (names come back
verbatim), the check that a folder holds what a stage needs, the copy of the files that travel forward."""

from __future__ import annotations

import pytest

from engine.contract.stage import StageError
from stages.common.bundle import check_bundle, copy_forward, read_io, read_labels, write_labels


def test_names_round_trip_verbatim_with_spaces_and_unicode(tmp_path):
    names = ["cat", " leading blank", "trailing blank ", "two words", "Ölfleck 🐱"]
    path = write_labels(tmp_path, names)
    assert path == tmp_path / "labels.txt"
    assert path.read_bytes() == "".join(n + "\n" for n in names).encode("utf-8")
    assert read_labels(tmp_path) == names
    assert read_labels(path) == names


def test_blank_lines_and_crlf_name_no_class(tmp_path):
    (tmp_path / "labels.txt").write_bytes(b"a\r\nb c\r\n\r\n")  # by hand on purpose: what write_labels never writes
    assert read_labels(tmp_path) == ["a", "b c"]


@pytest.mark.parametrize("bad", ["two\nlines", "carriage\rreturn", "line\u2028separator", ""])
def test_a_name_that_would_not_come_back_as_one_line_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="one name a line"):
        write_labels(tmp_path / "labels.txt", ["ok", bad])
    assert not (tmp_path / "labels.txt").exists()


def _bundle(folder, io=True):
    folder.mkdir()
    (folder / "preprocess.json").write_bytes(b'{"input_size": [32, 32]}\n')
    write_labels(folder, ["a", "b"])
    if io:
        (folder / "io.json").write_text('{"input": "in0", "output": "out0"}\n')
    return folder


def test_copy_forward_copies_the_bundle_files_byte_for_byte(tmp_path):
    src = _bundle(tmp_path / "src")
    out = (tmp_path / "out")
    out.mkdir()
    assert copy_forward(src, out) == ["preprocess.json", "labels.txt"]
    assert not (out / "io.json").exists()
    assert copy_forward(src, out, io=True) == ["preprocess.json", "labels.txt", "io.json"]
    for f in ("preprocess.json", "labels.txt", "io.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    (src / "labels.txt").unlink()
    with pytest.raises(FileNotFoundError):
        copy_forward(src, tmp_path)
    assert copy_forward(src, tmp_path, missing_ok=True) == ["preprocess.json"]


def test_check_bundle_names_the_input_and_the_missing_file_in_one_line(tmp_path):
    src = _bundle(tmp_path / "src", io=False)
    check_bundle(src, input="model", hint="expected an export_onnx output")  # preprocess.json + labels.txt
    with pytest.raises(StageError) as e:
        check_bundle(src, ("preprocess.json", "io.json"), input="onnx", hint="expected an export_onnx output")
    assert str(e.value) == f"input onnx: {src / 'io.json'} is missing (expected an export_onnx output)"


def test_read_io(tmp_path):
    src = _bundle(tmp_path / "src")
    assert read_io(src) == {"input": "in0", "output": "out0"}
    assert read_io(tmp_path) == {}
    (src / "io.json").write_text("{not json")
    with pytest.raises(StageError, match=r"io.json is not valid JSON .*line 1.*re-run the stage that wrote it"):
        read_io(src)
