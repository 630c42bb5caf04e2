"""Output folders: the one guard every command runs before it computes anything, and the ways outputs are written.

The guard refuses a folder that cannot be created (a file in the way) and, without ``--overwrite``, a folder that
already holds what the command would write; each command states what counts as its outputs and how to say so in
an ``OutputRule``. Outputs are then written either staged (all files of a report appear together) or one file at
a time atomically (a measurement's JSON and markdown).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from nnunetv2_llm.common.atomic_files import atomic_file
from nnunetv2_llm.common.dataset_checks import file_in_the_way
from nnunetv2_llm.common.errors import LLMSettingError


@dataclass(frozen=True)
class OutputRule:
    """What a command writes into its output folder, and the words of its refusals.

    what: the outputs as a message names them ("the report", "predictions").
    setting: the option that names the folder (``-o``); named when a file is in the way.
    refusal: the message when earlier outputs are there and ``overwrite`` is False; ``str.format`` fields
        ``{folder}``, ``{count}``, ``{shown}`` (the first three names, then "...") and ``{names}`` (all, joined
        with "and").
    refusal_setting: the setting named by that refusal (``-o / --overwrite``).
    outputs: glob patterns of the entries that are earlier outputs; None: the folder itself, once it exists.
    keep: glob patterns of entries that never count (a command's own state kept between runs).
    error: the LLMSettingError subclass raised.
    """

    what: str
    setting: str
    refusal: str
    refusal_setting: str
    outputs: tuple[str, ...] | None = ("*",)
    keep: tuple[str, ...] = ()
    error: type[LLMSettingError] = LLMSettingError


def check_output_folder(folder: str | os.PathLike, overwrite: bool, rule: OutputRule) -> None:
    """Refuse ``folder`` when it cannot be a folder, or holds earlier outputs (``rule``) and not ``overwrite``.

    Raises:
        rule.error: a file is in the way (naming it and ``rule.setting``), or earlier outputs would be replaced
            (``rule.refusal``, naming ``rule.refusal_setting``).
    """
    folder = Path(folder)
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise rule.error(f"cannot write {rule.what} to {folder}: {blocking} exists and is not a folder", rule.setting)
    held = earlier_outputs(folder, rule)
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise rule.error(rule.refusal.format(folder=folder, count=len(held), shown=shown, names=" and ".join(held)),
                         rule.refusal_setting)


def earlier_outputs(folder: Path, rule: OutputRule) -> list[str]:
    """Sorted names of the entries of ``folder`` that ``rule`` counts as outputs (``[folder.name]`` when
    ``rule.outputs`` is None and the folder exists); empty when ``folder`` is no folder."""
    if not folder.is_dir():
        return []
    if rule.outputs is None:
        return [folder.name]
    return sorted(p.name for p in folder.iterdir()
                  if any(fnmatchcase(p.name, pattern) for pattern in rule.outputs)
                  and not any(fnmatchcase(p.name, pattern) for pattern in rule.keep))


@contextmanager
def staged_outputs(output_dir: str | os.PathLike, files: Sequence[str]) -> Iterator[Path]:
    """A temporary sibling folder to write ``files`` into; moved into ``output_dir`` when the block succeeds.

    A new ``output_dir`` is the staging folder renamed (all outputs or none); in an existing one each of ``files``
    is replaced, or removed when this run did not write it (so old and new outputs never mix), and other entries
    are kept. When the block fails ``output_dir`` is left as it was. The temporary folder is always removed.
    """
    output_dir = Path(output_dir).absolute()
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if not output_dir.exists():
            staging.rename(output_dir)
            return
        for name in files:
            if (staging / name).exists():
                os.replace(staging / name, output_dir / name)
            else:
                (output_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_report_free(folder: str | os.PathLike, stem: str, overwrite: bool) -> None:
    """LLMSettingError when ``folder`` cannot be created, or already holds ``stem.json`` or ``stem.md`` and
    ``overwrite`` is False: a measurement can take long to repeat. Call it before measuring."""
    check_output_folder(folder, overwrite, OutputRule(
        what="the results", setting="--output", outputs=(f"{stem}.json", f"{stem}.md"),
        refusal="{folder} already holds {names} from an earlier run; pass --overwrite to replace them, or choose "
                "another --output", refusal_setting="--output / --overwrite"))


def write_json_and_markdown(folder: str | os.PathLike, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
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
