"""Builds the WordNet noun asset that `tljax.data.wordnet` ships: one row per noun synset, split fixed by hash.

    python -m experiments.make_wordnet_data                     # reads /usr/share/wordnet (Debian wordnet-base)
    python -m experiments.make_wordnet_data --wordnet-dir DIR --out tljax/data/assets/wordnet_nouns.jsonl.xz

Output (xz-compressed JSON lines, ~3 MB): line 1 is `{"meta": {...}}` (provenance, licence, lexnames, split rule,
column names); every further line is one synset in `data.noun` order, a JSON array in `COLUMNS` order:

    ["00001740", "noun.Tops", ["entity"], "that which is perceived ...", [], "train"]

Parsing rules (WordNet's `wndb(5WN)` data-file format, `synset_offset lex_filenum ss_type w_cnt word lex_id ...
p_cnt ... | gloss`):
  * lexname: `lex_filenum` looked up in the `lexnames` table (03 noun.Tops ... 28 noun.time). Upstream WordNet has
    a `lexnames` file in the dict folder; Debian's wordnet-base does not ship it, so the table is read from the
    `lexnames(5WN)` man page, which holds the same tab-separated lines.
  * definition: the gloss before the first `; "` (the start of the first quoted example), stripped of spaces and of
    trailing `;`. About 20 glosses glue an example with `: "` instead; those quotes stay in the definition.
  * examples: the double-quoted strings after the definition, stripped. Attributions outside the quotes
    (`"..." - Shakespeare`) are dropped; a quote left unclosed (4 glosses have an odd number of `"`) is lost.
  * split: `sha1(offset)` (the 8-digit offset string as written in data.noun), first 8 bytes as a big-endian
    integer, mod 100: < 80 train, < 90 validation, else test. One split per synset, so a synset's definition and
    its examples never land in different splits.

The output is byte-reproducible: fixed column order and separators, xz preset 1 with a CRC64 check, no
timestamps. Preset 1 gives 3.1 MB against 2.5 MB at preset 9 (gzip -9: 3.3 MB), but compresses in ~1 s instead of
~12 s on a small CPU, which keeps the test that rebuilds the asset byte for byte fast.
The WordNet 3.0 licence text is copied from the Debian copyright file to WORDNET_LICENSE beside the asset.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import pathlib
import re
import subprocess

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
DEFAULT_OUT = "tljax/data/assets/wordnet_nouns.jsonl.xz"
LEXNAMES_MAN_PAGE = "/usr/share/man/man5/lexnames.5WN.gz"
COPYRIGHT_FILE = "/usr/share/doc/wordnet-base/copyright"
COLUMNS = ("offset", "lexname", "lemmas", "definition", "examples", "split")
SPLIT_RULE = "sha1(offset) first 8 bytes big-endian mod 100: <80 train, <90 validation, else test"
_LEXNAME_LINE = re.compile(r"^(\d\d)\t\s*(\S+)\s*(\t|$)")
_QUOTED = re.compile(r'"([^"]*)"')


def split_of(offset: str) -> str:
    """The fixed split of a synset: a stable hash of its offset string, so reruns and other tools agree."""
    bucket = int.from_bytes(hashlib.sha1(offset.encode("ascii")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def parse_lexnames(text: str) -> dict[int, str]:
    """`lex_filenum -> lexname` from lines `NN<TAB>name<TAB>...` (the lexnames file, or its man page table)."""
    table = {}
    for line in text.splitlines():
        match = _LEXNAME_LINE.match(line)
        if match:
            table[int(match.group(1))] = match.group(2)
    return table


def read_lexnames(wordnet_dir: pathlib.Path) -> dict[int, str]:
    """The lexnames table: the upstream `lexnames` file if the dict folder has one, else the Debian man page."""
    upstream = wordnet_dir / "lexnames"
    if upstream.exists():
        return parse_lexnames(upstream.read_text("ascii"))
    with gzip.open(LEXNAMES_MAN_PAGE, "rt", encoding="ascii") as f:
        return parse_lexnames(f.read())


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """(definition, examples) of a gloss; see the module docstring for the rules and their known misses."""
    cut = gloss.find('; "')
    definition = gloss if cut < 0 else gloss[:cut]
    examples = [] if cut < 0 else [e.strip() for e in _QUOTED.findall(gloss[cut:])]
    return definition.strip().rstrip(";").strip(), [e for e in examples if e]


def parse_synset(line: str, lexnames: dict[int, str]) -> dict:
    """One `data.noun` line as an asset row (a dict keyed by `COLUMNS`)."""
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    offset, lex_filenum, w_cnt = parts[0], int(parts[1]), int(parts[3], 16)
    definition, examples = split_gloss(gloss)
    return {
        "offset": offset,
        "lexname": lexnames[lex_filenum],
        "lemmas": parts[4 : 4 + 2 * w_cnt : 2],
        "definition": definition,
        "examples": examples,
        "split": split_of(offset),
    }


def read_synsets(wordnet_dir: pathlib.Path, lexnames: dict[int, str]) -> list[dict]:
    """Every noun synset of `data.noun`, in file order; the licence header lines start with two spaces."""
    lines = (wordnet_dir / "data.noun").read_text("ascii").splitlines()
    return [parse_synset(line, lexnames) for line in lines if line and not line.startswith("  ")]


def debian_version(package: str = "wordnet-base") -> str:
    """The installed Debian package version, for provenance; "unknown" off Debian."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def wordnet_license(copyright_text: str) -> str:
    """The `License: WordNet3.0` paragraph of a Debian copyright file, de-indented (`.` lines become blank)."""
    lines, inside = [], False
    for line in copyright_text.splitlines():
        if line.startswith("License: WordNet3.0"):
            inside = True
        elif inside and not line.startswith(" "):
            break
        elif inside:
            lines.append("" if line.strip() == "." else line[1:].rstrip())
    if not lines:
        raise ValueError("no 'License: WordNet3.0' paragraph in the copyright file")
    return "\n".join(lines).strip() + "\n"


def metadata(lexnames: dict[int, str], version: str) -> dict:
    """The first line of the asset: where the data comes from, under which licence, and how it was cut."""
    nouns = {n: name for n, name in sorted(lexnames.items()) if name.startswith("noun.")}
    return {
        "source": "WordNet 3.0, Princeton University (https://wordnet.princeton.edu), data.noun",
        "debian_package": f"wordnet-base {version}",
        "license": "WordNet 3.0 license (WORDNET_LICENSE beside this file); WordNet 3.0 Copyright 2006 by "
        "Princeton University. All rights reserved.",
        "lexnames": [[n, name] for n, name in nouns.items()],
        "split_rule": SPLIT_RULE,
        "columns": list(COLUMNS),
        "generator": "python -m experiments.make_wordnet_data",
    }


def encode(meta: dict, rows: list[dict]) -> bytes:
    """JSON lines with fixed separators, so the same input always gives the same bytes; rows as arrays, because
    keys repeated on 82k lines would make the file a third bigger and slower to compress."""
    lines = [json.dumps({"meta": meta}, separators=(",", ":"))]
    lines += [json.dumps([row[c] for c in COLUMNS], separators=(",", ":")) for row in rows]
    return ("\n".join(lines) + "\n").encode("ascii")


def compress(data: bytes, path: pathlib.Path) -> bytes:
    """xz (preset 1, CRC64) or gzip (level 9, mtime 0) by suffix: both fixed, so reruns are byte-identical."""
    if path.suffix == ".xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=1)
    if path.suffix == ".gz":
        return gzip.compress(data, compresslevel=9, mtime=0)
    raise ValueError(f"output must end in .xz or .gz, got {path}")


def build(wordnet_dir: pathlib.Path, out: pathlib.Path, copyright_file: pathlib.Path) -> dict:
    """Writes the asset and WORDNET_LICENSE; returns counts for the printed summary."""
    lexnames = read_lexnames(wordnet_dir)
    rows = read_synsets(wordnet_dir, lexnames)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(compress(encode(metadata(lexnames, debian_version()), rows), out))
    (out.parent / "WORDNET_LICENSE").write_text(wordnet_license(copyright_file.read_text("utf-8")))
    return {
        "synsets": len(rows),
        "empty_definitions": sum(not r["definition"] for r in rows),
        "synsets_with_examples": sum(bool(r["examples"]) for r in rows),
        "examples": sum(len(r["examples"]) for r in rows),
        "bytes": out.stat().st_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR, type=pathlib.Path)
    parser.add_argument("--out", default=DEFAULT_OUT, type=pathlib.Path)
    parser.add_argument("--copyright-file", default=COPYRIGHT_FILE, type=pathlib.Path)
    args = parser.parse_args(argv)
    print(json.dumps({"out": str(args.out), **build(args.wordnet_dir, args.out, args.copyright_file)}))


if __name__ == "__main__":
    main()
