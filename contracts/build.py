"""Compile USDC.vy into USDC.json (ABI + deployment bytecode), offline, with vyper from PyPI.

Run: `make contracts` (or `.venv/bin/python contracts/build.py`). The artifact is committed so the server
never needs a compiler at run time; `--check` fails if the committed artifact is stale.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import vyper
from vyper.compiler import compile_code

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "USDC.vy"
ARTIFACT = HERE / "USDC.json"


def build() -> dict:
    source = SOURCE.read_text()
    out = compile_code(source, output_formats=["abi", "bytecode"])
    return {
        "contract": "USDC",
        "compiler": f"vyper {vyper.__version__}",
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
    }


def main() -> None:
    artifact = build()
    text = json.dumps(artifact, indent=1, sort_keys=True) + "\n"
    if "--check" in sys.argv[1:]:
        if not ARTIFACT.exists() or json.loads(ARTIFACT.read_text())["bytecode"] != artifact["bytecode"]:
            sys.exit("contracts/USDC.json is stale: run `make contracts`")
        return
    ARTIFACT.write_text(text)
    print(f"wrote {ARTIFACT.relative_to(HERE.parent)} ({artifact['compiler']})")


if __name__ == "__main__":
    main()
