"""Split: seeded, order independent, paper counts, proportions for other sizes, write once."""

import pandas as pd
import pytest

from locnet.split import SplitExistsError, make_split, read_split, split_sizes, write_split

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
