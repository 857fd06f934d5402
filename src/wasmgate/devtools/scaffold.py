"""``wasmgate new NAME``: a Go plugin project that builds and passes its own spec at once."""

from __future__ import annotations

import re
from pathlib import Path

from wasmgate.devtools import templates


class ScaffoldError(Exception):
    pass


_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def scaffold(target: Path, name: str | None = None) -> list[Path]:
    """Write the project into ``target`` (which must not exist or be empty); returns the files."""
    name = name or target.name
    if not _NAME.match(name):
        raise ScaffoldError(f"{name!r}: a plugin name is lower-case letters, digits and '-', "
                            "starting with a letter (it becomes a WasmPlugin name)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target}: already exists and is not an empty directory")
    target.mkdir(parents=True, exist_ok=True)
    metric = name.replace("-", "_") + "_requests"
    files = {
        "go.mod": templates.GO_MOD,
        "main.go": templates.MAIN_GO,
        "spec.yaml": templates.SPEC_YAML,
        "wasmplugin.yaml": templates.WASMPLUGIN_YAML,
        "README.md": templates.README_MD,
        ".gitignore": "plugin.wasm\n",
    }
    written = []
    for fname, text in files.items():
        p = target / fname
        p.write_text(text.replace("__NAME__", name).replace("__METRIC__", metric))
        written.append(p)
    return written
