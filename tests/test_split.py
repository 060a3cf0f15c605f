"""Split: seeded, order independent, paper counts, proportions for other sizes, write once."""

import pandas as pd
import pytest

from locnet.fileio import InputError
from locnet.split import (SplitExistsError, check_annotations, make_split, read_split,
                          split_sizes, write_split)

PAPER = (167, 42, 54)


def ids(n):
    return [f"case{i:03d}" for i in range(n)]


def test_paper_cohort_gives_the_paper_counts():
    df = make_split(ids(263), seed=11)
    assert df["subset"].value_counts().to_dict() == {"train": 167, "val": 42, "test": 54}
    assert df["case_id"].tolist() == sorted(ids(263))


def test_deterministic_and_independent_of_input_order():
    a = make_split(ids(40), seed=5)
    b = make_split(list(reversed(ids(40))), seed=5)
    c = make_split(ids(40)[::3] + ids(40)[1::3] + ids(40)[2::3], seed=5)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    assert not make_split(ids(40), seed=6)["subset"].equals(a["subset"])


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 40, 100, 263, 1000])
def test_proportions_for_other_cohort_sizes(n):
    sizes = split_sizes(n, PAPER)
    assert sum(sizes) == n and min(sizes) >= 1
    if n >= 10:  # largest remainder: every size within one of its exact quota
        for size, p in zip(sizes, PAPER):
            assert abs(size - n * p / sum(PAPER)) < 1
    df = make_split(ids(n), seed=0)
    assert tuple(df["subset"].value_counts().reindex(["train", "val", "test"])) == sizes


def test_largest_remainder_by_hand():
    # quotas for 10: 6.35, 1.597, 2.053 -> floors 6, 1, 2; the one left goes to val (0.597)
    assert split_sizes(10, PAPER) == (6, 2, 2)
    assert split_sizes(3, PAPER) == (1, 1, 1)
    assert split_sizes(5, (0.6, 0.2, 0.2)) == (3, 1, 1)
    assert split_sizes(4, (100, 1, 1)) == (2, 1, 1)  # zero-rounded subsets get one case


def test_counts_and_errors():
    df = make_split(ids(10), seed=1, counts={"train": 5, "val": 2, "test": 3})
    assert df["subset"].value_counts().to_dict() == {"train": 5, "val": 2, "test": 3}
    with pytest.raises(ValueError, match="sum to the number of cases, 10"):
        make_split(ids(10), seed=1, counts=[5, 2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        make_split(ids(10), seed=1, counts=[10, 0, 0])
    with pytest.raises(ValueError, match="at least 3 cases"):
        make_split(ids(2), seed=1)
    with pytest.raises(ValueError, match="duplicate case ids"):
        make_split(["a", "b", "c", "a"], seed=1)


def test_write_once(tmp_path):
    path = tmp_path / "data" / "split.csv"
    df = make_split(ids(12), seed=3)
    assert write_split(df, path) is True
    assert write_split(df.sample(frac=1, random_state=0), path) is False  # same split: no-op
    pd.testing.assert_frame_equal(read_split(path), df)
    other = make_split(ids(12), seed=4)
    with pytest.raises(SplitExistsError, match="different split"):
        write_split(other, path)
    pd.testing.assert_frame_equal(read_split(path), df)
    assert write_split(other, path, force=True) is True
    pd.testing.assert_frame_equal(read_split(path), other)


def annotated(split, empty_subsets=(), empty_table=False):
    """A landmark table with two landmarks per case, all annotated except in
    ``empty_subsets`` (or everywhere when ``empty_table``: only the header)."""
    rows = []
    if not empty_table:
        for case, subset in zip(split["case_id"], split["subset"]):
            xyz = (None, None, None) if subset in empty_subsets else (1.0, 2.0, 3.0)
            rows += [(case, name, *xyz) for name in ("left", "right")]
    return pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"]).astype(
        {"x": float, "y": float, "z": float})


def test_a_training_subset_without_annotations_is_refused_naming_subset_and_table():
    df = make_split(ids(10), seed=1, counts={"train": 5, "val": 2, "test": 3})
    table = "results/data/landmarks.csv"
    assert check_annotations(df, annotated(df), table) == {"train": 10, "val": 4, "test": 6}
    with pytest.raises(InputError) as info:
        check_annotations(df, annotated(df, empty_table=True), table, source="/my/lm.csv")
    msg = str(info.value)
    assert msg.startswith("3 problem(s) in the split")
    train = next(l for l in msg.splitlines() if l.startswith("train subset"))
    assert "0 annotated landmark(s)" in train and table in train and "/my/lm.csv" in train
    assert "at least 1 needed for training" in train
    assert all(repr(c) in train for c in df.loc[df.subset == "train", "case_id"])


def test_a_validation_subset_without_annotations_is_refused_with_count_and_need():
    df = make_split(ids(10), seed=1, counts={"train": 5, "val": 2, "test": 3})
    with pytest.raises(InputError) as info:
        check_annotations(df, annotated(df, empty_subsets=("val",)), "lm.csv")
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith("val subset: 0 annotated landmark(s)")
    assert "at least 1 needed for model selection and calibration" in lines[0]
    assert "lm.csv" in lines[0]


def test_split_cohort_is_the_workflows_split(tmp_path):
    """Rule split's call (and ``benchmarks/device_cohort.py``'s): the config's split of the
    manifest's cases, refused naming both tables before it is written, then written once."""
    from locnet.fileio import write_landmarks
    from locnet.split import split_cohort

    cases = ids(10)
    pd.DataFrame({"case_id": cases[::-1], "image": [f"{c}.nii.gz" for c in cases[::-1]]}).to_csv(
        tmp_path / "manifest.csv", index=False)
    cfg = {"seed": 7, "proportions": [167, 42, 54], "counts": {"train": 5, "val": 2, "test": 3}}
    want = make_split(cases, seed=7, counts=cfg["counts"])
    table, out = tmp_path / "landmarks.csv", tmp_path / "split.csv"
    write_landmarks(annotated(want, empty_subsets=("test",)), table)
    with pytest.raises(InputError, match="test subset: 0 annotated") as info:
        split_cohort(tmp_path / "manifest.csv", table, cfg, out, raw_landmarks="/raw/lm.csv")
    assert str(table) in str(info.value) and "/raw/lm.csv" in str(info.value)
    assert not out.exists()
    write_landmarks(annotated(want), table)
    df, counts = split_cohort(tmp_path / "manifest.csv", table, cfg, out)
    assert counts == {"train": 10, "val": 4, "test": 6}
    pd.testing.assert_frame_equal(read_split(out), want)
