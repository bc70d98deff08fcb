#!/usr/bin/env python3
"""Converts Firecracker's published API description (Swagger 2.0, YAML) into the JSON file the
API conformance test reads (test/api/firecracker-api.json), once, by hand, when the description
is updated:

    python3 scripts/firecracker-api-to-json.py ../shared/reference/firecracker-api.yaml \
        test/api/firecracker-api.json
    npx prettier --write test/api/firecracker-api.json   # the repo's formatting (npm run lint)

Needs PyYAML (Debian: python3-yaml). The tests never run this script: they read the vendored
JSON, so CI needs neither the YAML nor a YAML parser. The output keeps the description as it
is (paths, definitions, responses) and adds an "x-vendored" header naming the source and its
version. Keys are written in the description's order; integer response codes become strings.
"""
import json
import re
import sys

import yaml


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where Off/On/Yes/No are booleans; the description means strings
    (Logger's level enum has "Off"). Only true/false are booleans here, as in YAML 1.2."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def stringify_keys(node):
    if isinstance(node, dict):
        return {str(k): stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [stringify_keys(v) for v in node]
    return node


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(f"usage: {argv[0]} firecracker-api.yaml out.json\n")
        return 2
    with open(argv[1], encoding="utf-8") as f:
        doc = stringify_keys(yaml.load(f, Loader=Yaml12Loader))
    if doc.get("swagger") != "2.0" or "paths" not in doc or "definitions" not in doc:
        sys.stderr.write(f"{argv[1]}: not a Swagger 2.0 description with paths and definitions\n")
        return 1
    out = {
        "x-vendored": {
            "source": "Firecracker's API description, src/firecracker/swagger/firecracker.yaml "
            "(firecracker-microvm/firecracker), Apache-2.0",
            "version": doc["info"]["version"],
            "converted-by": "scripts/firecracker-api-to-json.py",
        }
    }
    out.update(doc)
    with open(argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
