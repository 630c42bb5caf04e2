"""Writing a measured result as JSON (for machines) and markdown (for people), side by side."""

from __future__ import annotations

import json
from pathlib import Path

from nnunetv2_llm.common.atomic_files import atomic_file
from nnunetv2_llm.common.errors import LLMSettingError


def check_report_free(folder: str | Path, stem: str, overwrite: bool) -> None:
    """LLMSettingError when ``folder`` already holds ``stem.json`` or ``stem.md`` and ``overwrite`` is False: a
    benchmark's raw times can take long to measure again. Call it before measuring."""
    held = [p.name for p in (Path(folder) / f"{stem}.json", Path(folder) / f"{stem}.md") if p.exists()]
    if held and not overwrite:
        raise LLMSettingError(f"{folder} already holds {' and '.join(held)} from an earlier run; pass --overwrite to "
                              "replace them, or choose another --output", "--output / --overwrite")


def write_json_and_markdown(folder: str | Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Writes ``folder/stem.json`` and ``folder/stem.md`` (each atomically), prints the markdown, returns both."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    with atomic_file(json_path, "w") as f:
        f.write(json.dumps(data, indent=2))
    with atomic_file(md_path, "w") as f:
        f.write(markdown)
    print("\n" + markdown)
    return json_path, md_path
