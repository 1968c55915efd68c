"""The README's "Bad input" table and the bad-input cases name each other.

The cases are `pytest.param` tables in the modules' own test files; each row
of the README's table names its cases in its last column.
"""

import os
import re

from tests.helpers import REPO
from tests.test_data_list_files import IMAGE_FILE_CASES
from tests.test_data_list_files import LIST_FILE_CASES
from tests.test_export import EXPORT_FLAG_CASES
from tests.test_saving import KERAS_FILE_CASES
from tests.test_serving_inputs import SERVING_INPUT_CASES
from tests.test_train_flags import TRAINING_FLAG_CASES

# Group: (its cases, how its README rows start).
GROUPS = {
    "list file": (LIST_FILE_CASES, "list:"),
    "image file": (IMAGE_FILE_CASES, "image:"),
    "serving input": (SERVING_INPUT_CASES, "serving:"),
    ".keras file": (KERAS_FILE_CASES, "`.keras`:"),
    "export flag": (EXPORT_FLAG_CASES, "export:"),
    "training flag": (TRAINING_FLAG_CASES, "training:"),
}


def readme_rows():
    """`[(input, outcome, [case ids])]` of the README's "Bad input" table."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Bad input\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and line != "| input | outcome | cases |":
            what, outcome, cases = line[2:-2].split(" | ")
            rows.append((what, outcome, re.findall(r"`([^`]+)`", cases)))
    return rows


def test_at_least_thirty_cases_in_every_group():
    ids = [case.id for cases, _ in GROUPS.values() for case in cases]
    assert len(ids) >= 30
    assert all(cases for cases, _ in GROUPS.values())
    assert len(set(ids)) == len(ids)


def test_readme_table_names_every_case_once():
    rows = readme_rows()
    assert len(rows) >= 40
    named = [case for _, _, cases in rows for case in cases]
    assert len(set(named)) == len(named), "a case is named in two rows"
    for group, (cases, prefix) in GROUPS.items():
        ids = {case.id for case in cases}
        in_rows = {case for what, _, names in rows if what.startswith(prefix)
                   for case in names}
        assert in_rows == ids, (group, "missing in the README:", sorted(ids - in_rows),
                                "no such case:", sorted(in_rows - ids))
    for what, outcome, cases in rows:
        assert cases, f"row names no case: {what}"
        assert any(what.startswith(prefix) for _, prefix in GROUPS.values()), what
        count = re.search(r"\((\d+) cases\)", outcome)
        if count:
            assert int(count.group(1)) == len(cases), what
