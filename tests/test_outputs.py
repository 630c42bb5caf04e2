"""The one output-folder guard: a file in the way and earlier outputs are refused, naming the setting; staged
outputs replace only the command's own files."""

from __future__ import annotations

import pytest

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.outputs import OutputRule, check_output_folder, earlier_outputs, staged_outputs

RULE = OutputRule(what="the report", setting="-o", outputs=("*.csv", "report.md"), keep=("keep_*",),
                  refusal="{folder} holds {count} ({shown}; {names})", refusal_setting="--overwrite")


@pytest.mark.parametrize("under", ["", "deeper"])
def test_a_file_in_the_way_is_refused_whatever_overwrite_says(tmp_path, under):
    (tmp_path / "blocker").write_text("")
    folder = tmp_path / "blocker" / under if under else tmp_path / "blocker"
    for overwrite in (False, True):
        with pytest.raises(LLMSettingError) as info:
            check_output_folder(folder, overwrite, RULE)
        assert str(info.value) == (f"cannot write the report to {folder}: {tmp_path / 'blocker'} exists and is not a "
                                   "folder (fix: -o)")


def test_only_earlier_outputs_are_refused_and_only_without_overwrite(tmp_path):
    for name in ("a.csv", "b.csv", "keep_c.csv", "report.md", "notes.txt"):
        (tmp_path / name).write_text("")
    assert earlier_outputs(tmp_path, RULE) == ["a.csv", "b.csv", "report.md"]
    with pytest.raises(LLMSettingError) as info:
        check_output_folder(tmp_path, False, RULE)
    assert str(info.value) == f"{tmp_path} holds 3 (a.csv, b.csv, report.md; a.csv and b.csv and report.md) " \
                              "(fix: --overwrite)"
    check_output_folder(tmp_path, True, RULE)
    check_output_folder(tmp_path / "new", False, RULE)


def test_a_rule_without_patterns_refuses_the_existing_folder_itself(tmp_path):
    rule = OutputRule(what="the dataset", setting="-o", outputs=None, refusal="{folder} exists",
                      refusal_setting="--overwrite")
    assert earlier_outputs(tmp_path / "new", rule) == []
    (tmp_path / "new").mkdir()
    with pytest.raises(LLMSettingError, match="new exists"):
        check_output_folder(tmp_path / "new", False, rule)


def test_staged_outputs_replace_the_commands_files_and_keep_the_others(tmp_path):
    out = tmp_path / "out"
    with staged_outputs(out, ("a.txt", "b.txt")) as staging:
        (staging / "a.txt").write_text("1")
        (staging / "b.txt").write_text("1")
    (out / "mine.txt").write_text("mine")
    with staged_outputs(out, ("a.txt", "b.txt")) as staging:
        (staging / "a.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "mine.txt"]
    assert (out / "a.txt").read_text() == "2"
    with pytest.raises(RuntimeError), staged_outputs(out, ("a.txt",)) as staging:
        (staging / "a.txt").write_text("3")
        raise RuntimeError
    assert (out / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
