"""The published JSON Schema against every manifest a test session left behind: it must accept each bundle
the suite built and reject exactly what the Python types reject (tests corrupt some manifests on purpose)."""

from __future__ import annotations

import json
from pathlib import Path


def disagreements(root: Path) -> tuple[int, list[str]]:
    """(manifests checked, problems) for every ``manifest.json`` under ``root``."""
    import jsonschema

    from smoledge.errors import SmolEdgeError
    from smoledge.runtime.manifest import SCHEMA_FILE, Manifest

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    checked, problems = 0, []
    for path in sorted(root.rglob("manifest.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not JSON at all: nothing for a schema to say
        checked += 1
        try:
            Manifest.from_dict(data, str(path.parent))
            typed_ok = True
        except SmolEdgeError:
            typed_ok = False
        errors = sorted(validator.iter_errors(data), key=lambda e: e.json_path)
        if typed_ok and errors:
            problems.append(f"{path}: the JSON Schema rejects a bundle the runtime reads: {errors[0].message[:200]} "
                            f"at {errors[0].json_path}")
        elif not typed_ok and not errors:
            problems.append(f"{path}: the JSON Schema accepts a manifest the runtime refuses")
    return checked, problems
