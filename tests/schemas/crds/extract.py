"""Vendor one version's openAPIV3Schema of a CRD as <group>_<version>_<kind>.json here.

Usage (see README.md): git show <tag>:<crd.yaml> | python extract.py - <version>
"""

import json
import sys
from pathlib import Path

import yaml


def main(crd_file: str, version: str) -> None:
    text = sys.stdin.read() if crd_file == "-" else Path(crd_file).read_text(encoding="utf-8")
    crd = yaml.safe_load(text)
    assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
    spec = crd["spec"]
    [entry] = [v for v in spec["versions"] if v["name"] == version]
    kind = spec["names"]["kind"].lower()
    out = Path(__file__).resolve().parent / f"{spec['group']}_{version}_{kind}.json"
    schema = entry["schema"]["openAPIV3Schema"]
    out.write_text(json.dumps(schema, indent=1) + "\n", encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
