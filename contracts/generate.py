"""Machine-readable contracts, generated from the msgspec Structs and committed.

``contracts/schemas/`` holds one JSON Schema per wire shape (:mod:`contracts.json_schema`)
and ``asyncapi.json``, an AsyncAPI 3.0 document of every subject
(:mod:`contracts.asyncapi`). ``clinic contracts`` (or ``python -m contracts.generate``)
rewrites them; a unit test fails when the committed files differ from what the code
generates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import msgspec

from contracts.asyncapi import asyncapi_document
from contracts.json_schema import Schema, json_schemas

SCHEMAS_DIR: Final = Path(__file__).parent / "schemas"
ASYNCAPI_FILE: Final = "asyncapi.json"


def _encode(document: Schema) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


def generate() -> dict[str, bytes]:
    """Every generated file's content, by its name inside the schemas folder."""
    files = {f"{name}.json": _encode(doc) for name, doc in json_schemas().items()}
    files[ASYNCAPI_FILE] = _encode(asyncapi_document())
    return files


def write_all(out_dir: Path) -> list[Path]:
    """Write every contract document into ``out_dir``; the paths of all of them.

    Files already current are left untouched. Nothing else in ``out_dir`` is deleted:
    :func:`differences` reports leftovers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in generate().items():
        path = out_dir / name
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
        paths.append(path)
    return paths


def differences(out_dir: Path = SCHEMAS_DIR) -> list[str]:
    """How ``out_dir`` differs from what the code generates (empty: up to date)."""
    files = generate()
    found = []
    for name, content in files.items():
        path = out_dir / name
        if not path.is_file():
            found.append(f"{name}: missing")
        elif path.read_bytes() != content:
            found.append(f"{name}: differs")
    present = {p.name for p in out_dir.glob("*.json")} if out_dir.is_dir() else set()
    found.extend(f"{name}: not generated any more" for name in sorted(present - set(files)))
    return found


def main(argv: list[str] | None = None) -> None:
    """``python -m contracts.generate [OUT_DIR]``: write the documents and list them."""
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else SCHEMAS_DIR
    for path in write_all(out_dir):
        print(path)


if __name__ == "__main__":
    main()
