"""Writing a measured result as JSON (for machines) and markdown (for people), side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_json_and_markdown(folder: str | Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Writes ``folder/stem.json`` and ``folder/stem.md``, prints the markdown, returns both paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2))
    md_path.write_text(markdown)
    print("\n" + markdown)
    return json_path, md_path
