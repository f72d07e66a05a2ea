"""benchmarks/transfer.py: a file carried in parts comes back byte for byte, or the join names what is wrong."""

import hashlib
import json
import os

import pytest

from tests.conftest import ROOT, load_script


def _transfer():
    return load_script(ROOT / "benchmarks" / "transfer.py")


@pytest.mark.parametrize("size", [2_500_000, 2_000_000, 0])
def test_split_and_join_give_the_same_bytes(tmp_path, size):
    t = _transfer()
    data = os.urandom(size)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    assert t.main(["split", str(src), str(tmp_path / "parts"), "--part-mb", "1"]) == 0
    manifest = json.loads((tmp_path / "parts" / "model.gguf.manifest.json").read_text())
    assert [p["bytes"] for p in manifest["parts"]] == {2_500_000: [1_000_000, 1_000_000, 500_000],
                                                       2_000_000: [1_000_000, 1_000_000], 0: [0]}[size]
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    (tmp_path / "dest").mkdir()
    assert t.main(["join", str(tmp_path / "parts"), str(tmp_path / "dest")]) == 0
    assert (tmp_path / "dest" / "model.gguf").read_bytes() == data


def test_join_names_a_missing_or_damaged_part_and_never_overwrites(tmp_path, capsys):
    t = _transfer()
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(2_500_000))
    parts = tmp_path / "parts"
    t.split(src, parts, 1_000_000)
    dest = tmp_path / "dest"
    dest.mkdir()
    (parts / "w.bin.part001").rename(tmp_path / "aside")
    assert t.main(["join", str(parts), str(dest)]) == 1
    assert "w.bin.part001: part missing" in capsys.readouterr().err
    damaged = bytearray((tmp_path / "aside").read_bytes())
    damaged[10] ^= 1
    (parts / "w.bin.part001").write_bytes(bytes(damaged))
    assert t.main(["join", str(parts), str(dest)]) == 1
    assert "w.bin.part001: damaged" in capsys.readouterr().err
    assert not any(dest.iterdir())  # nothing half-written
    (tmp_path / "aside").replace(parts / "w.bin.part001")
    (dest / "w.bin").write_bytes(b"mine")
    assert t.main(["join", str(parts), str(dest)]) == 1
    assert "exists" in capsys.readouterr().err and (dest / "w.bin").read_bytes() == b"mine"
    assert t.main(["split", str(src), str(parts)]) == 1  # a folder that already holds a split
    (parts / "w.bin.manifest.json").unlink()
    before = (parts / "w.bin.part000").read_bytes()
    assert t.main(["split", str(src), str(parts)]) == 1  # parts of it, even without a manifest: not overwritten
    assert (parts / "w.bin.part000").read_bytes() == before and "already holds parts" in capsys.readouterr().err
