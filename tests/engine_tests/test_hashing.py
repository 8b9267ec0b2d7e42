"""engine.contract.hashing's content index: unchanged files are not read again, changed ones are, a symlink
pointed at another file is a change even when size and mtime agree."""

from __future__ import annotations

import json
import os
import sqlite3

from engine.contract.hashing import ContentIndex, content_digest, sha256_file, tree_digest


def _folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"A" * 100)
    (root / "sub" / "b.bin").write_bytes(b"B" * 100)
    return root


def test_unchanged_stat_is_not_read_again(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    index = ContentIndex(tmp_path / "index.sqlite")
    first = content_digest(root, index)
    assert first == tree_digest({"a.bin": sha256_file(root / "a.bin"), "sub/b.bin": sha256_file(root / "sub/b.bin")})
    index.save()
    # an unchanged stat: the index answers without reading (what makes plan fast)
    import engine.contract.hashing

    reads = []
    monkeypatch.setattr(engine.contract.hashing, "sha256_file", lambda p: reads.append(p) or sha256_file(p))
    assert content_digest(root, ContentIndex(tmp_path / "index.sqlite")) == first and reads == []
    st = os.stat(root / "a.bin")
    os.utime(root / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime is read again
    assert content_digest(root, ContentIndex(tmp_path / "index.sqlite")) == first and len(reads) == 1


def test_symlink_pointed_elsewhere_is_a_change(tmp_path):
    root = _folder(tmp_path)
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(b"1" * 50)
    two.write_bytes(b"2" * 50)
    st = os.stat(one)
    os.utime(two, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the inode tells
    (root / "link.bin").symlink_to(one)
    index = ContentIndex(tmp_path / "index.sqlite")
    before = content_digest(root, index)
    (root / "link.bin").unlink()
    (root / "link.bin").symlink_to(two)
    assert content_digest(root, index) != before


def _counting(monkeypatch) -> list[str]:
    """Records the files engine.contract.hashing reads (sha256_file), to tell a lookup from a re-hash."""
    import engine.contract.hashing

    read, real = [], engine.contract.hashing.sha256_file
    monkeypatch.setattr(engine.contract.hashing, "sha256_file", lambda p: read.append(os.path.basename(p)) or real(p))
    return read


def test_a_changed_file_costs_its_own_hash(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    for i in range(20):
        (root / f"f{i}.bin").write_bytes(b"%d" % i)
    index = ContentIndex(tmp_path / "index.sqlite")
    content_digest(root, index)
    index.save()
    read = _counting(monkeypatch)
    assert content_digest(root, ContentIndex(tmp_path / "index.sqlite")) and read == []
    (root / "f3.bin").write_bytes(b"three")
    index = ContentIndex(tmp_path / "index.sqlite")
    changed = content_digest(root, index)
    assert read == ["f3.bin"]
    assert changed == tree_digest({rel: sha256_file(root / rel)
                                   for rel in ["a.bin", "sub/b.bin"] + [f"f{i}.bin" for i in range(20)]})


def test_a_deleted_file_leaves_the_index(tmp_path):
    root = _folder(tmp_path)
    index = ContentIndex(tmp_path / "index.sqlite")
    content_digest(root, index)
    index.save()
    (root / "sub" / "b.bin").unlink()
    index = ContentIndex(tmp_path / "index.sqlite")
    assert content_digest(root, index) == tree_digest({"a.bin": sha256_file(root / "a.bin")})
    index.save()
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        paths = [p for (p,) in db.execute("SELECT path FROM files")]
    assert paths == [str(root.resolve() / "a.bin")]


def test_a_damaged_index_is_rebuilt_with_a_warning(tmp_path, capsys):
    root = _folder(tmp_path)
    index = ContentIndex(tmp_path / "index.sqlite")
    good = content_digest(root, index)
    index.save()
    data = (tmp_path / "index.sqlite").read_bytes()
    for damaged in (data[: len(data) // 3], b"not a database" * 100, b"{" + json.dumps({"a": 1}).encode()):
        (tmp_path / "index.sqlite").write_bytes(damaged)
        index = ContentIndex(tmp_path / "index.sqlite")
        assert content_digest(root, index) == good
        index.save()
        assert "content index" in capsys.readouterr().err
        # rebuilt: the next process finds every file without reading one
        assert content_digest(root, ContentIndex(tmp_path / "index.sqlite")) == good
        assert capsys.readouterr().err == ""


def test_an_index_named_json_is_kept_as_sqlite_and_the_old_file_goes(tmp_path):
    """The cache names its index content.json (the format before sqlite): the sqlite file sits beside
    it and the old JSON file is removed on the first save; another .json next to a .sqlite index stays."""
    root = _folder(tmp_path)
    (tmp_path / "content.json").write_text(json.dumps({"old": [1, 2, "x", 3, 4]}))
    index = ContentIndex(tmp_path / "content.json")
    first = content_digest(root, index)
    index.save()
    assert (tmp_path / "content.sqlite").is_file() and not (tmp_path / "content.json").exists()
    (tmp_path / "other.json").write_text("{}")
    index = ContentIndex(tmp_path / "other.sqlite")
    assert content_digest(root, index) == first
    index.save()
    assert (tmp_path / "other.json").read_text() == "{}"
