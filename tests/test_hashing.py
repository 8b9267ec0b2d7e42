"""engine.hashing's content index: unchanged files are not read again, changed ones are, a symlink
pointed at another file is a change even when size and mtime agree."""

from __future__ import annotations

import json
import os

from engine.hashing import ContentIndex, content_digest, sha256_file, tree_digest


def _folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"A" * 100)
    (root / "sub" / "b.bin").write_bytes(b"B" * 100)
    return root


def test_unchanged_stat_is_not_read_again(tmp_path):
    root = _folder(tmp_path)
    index = ContentIndex(tmp_path / "index.json")
    first = content_digest(root, index)
    assert first == tree_digest({"a.bin": sha256_file(root / "a.bin"), "sub/b.bin": sha256_file(root / "sub/b.bin")})
    index.save()
    # same size, mtime and inode, other bytes: the index answers without reading (what makes plan fast)
    st = os.stat(root / "a.bin")
    with open(root / "a.bin", "r+b") as f:
        f.write(b"Z")
    os.utime(root / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digest(root, ContentIndex(tmp_path / "index.json")) == first
    os.utime(root / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime is read again
    assert content_digest(root, ContentIndex(tmp_path / "index.json")) != first


def test_symlink_pointed_elsewhere_is_a_change(tmp_path):
    root = _folder(tmp_path)
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(b"1" * 50)
    two.write_bytes(b"2" * 50)
    st = os.stat(one)
    os.utime(two, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the inode tells
    (root / "link.bin").symlink_to(one)
    index = ContentIndex(tmp_path / "index.json")
    before = content_digest(root, index)
    (root / "link.bin").unlink()
    (root / "link.bin").symlink_to(two)
    assert content_digest(root, index) != before


def test_entries_without_inode_are_hashed_again(tmp_path):
    """An index written before entries held inode and device: its digests are not trusted."""
    root = _folder(tmp_path)
    st = os.stat(root / "a.bin")
    (tmp_path / "index.json").write_text(json.dumps({str(root.resolve() / "a.bin"): [st.st_size, st.st_mtime_ns, "0" * 64]}))
    index = ContentIndex(tmp_path / "index.json")
    assert index.sha256(root / "a.bin", key=str(root.resolve() / "a.bin")) == sha256_file(root / "a.bin")
