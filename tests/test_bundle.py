"""The one labels.txt reader and writer (stages/common/bundle.py): names come back verbatim."""

from __future__ import annotations

import pytest

from stages.common.bundle import read_labels, write_labels


def test_names_round_trip_verbatim_with_spaces_and_unicode(tmp_path):
    names = ["cat", " leading blank", "trailing blank ", "two words", "Ölfleck 🐱"]
    path = write_labels(tmp_path, names)
    assert path == tmp_path / "labels.txt"
    assert path.read_bytes() == "".join(n + "\n" for n in names).encode("utf-8")
    assert read_labels(tmp_path) == names
    assert read_labels(path) == names


def test_blank_lines_and_crlf_name_no_class(tmp_path):
    (tmp_path / "labels.txt").write_bytes(b"a\r\nb c\r\n\r\n")
    assert read_labels(tmp_path) == ["a", "b c"]


@pytest.mark.parametrize("bad", ["two\nlines", "carriage\rreturn", "line\u2028separator", ""])
def test_a_name_that_would_not_come_back_as_one_line_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="one name a line"):
        write_labels(tmp_path / "labels.txt", ["ok", bad])
    assert not (tmp_path / "labels.txt").exists()
