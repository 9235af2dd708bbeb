"""Metrics as the field computes them, checked against hand-computed values."""

import random

import pytest

from surgery_r1_ros.metrics import accuracy, f_score, legacy_iou, legacy_miou, mean_iou, normalize_box, per_class

SIZE = (100, 100)


def test_accuracy_and_macro_f_score():
    truth = ["Idle", "Idle", "Cutting", "kidney"]
    pred = ["Idle", "Cutting", "Cutting", "kidney"]
    assert accuracy(truth, pred) == 0.75
    # Idle: P=1, R=0.5 -> F=2/3; Cutting: P=0.5, R=1 -> F=2/3; kidney: F=1. Macro = (2/3+2/3+1)/3.
    assert f_score(truth, pred) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_f_score_zero_division_counts_as_one():
    # "Grasping" is predicted but never true: recall is undefined -> 1 with zero_division=1.
    truth = ["Idle", "Idle"]
    pred = ["Idle", "Grasping"]
    # Idle: P=1, R=0.5 -> 2/3; Grasping: P=0, R=0/0 -> 1 -> F=0.
    assert f_score(truth, pred) == pytest.approx((2 / 3 + 0.0) / 2)


def test_legacy_iou_hand_computed_touching_corners():
    # normalized (0,0,.5,.5) vs (.5,.5,1,1): inter=(0+1)^2=1, areas=1.5^2, union=2.25*2-1=3.5
    assert legacy_iou(normalize_box((0, 0, 50, 50), SIZE), normalize_box((50, 50, 100, 100), SIZE)) == pytest.approx(
        1 / 3.5
    )


def test_legacy_iou_scores_disjoint_boxes_above_zero():
    # (0,0,.2,.2) vs (.8,.8,1,1): inter=(0.2-0.8+1)^2=0.16, areas=1.44, union=2.72
    score = legacy_miou([(0, 0, 20, 20)], [(80, 80, 100, 100)], [SIZE])
    assert score == pytest.approx(0.16 / 2.72)
    assert score > 0
    assert mean_iou([(0, 0, 20, 20)], [(80, 80, 100, 100)]) == 0.0


def test_identical_boxes_score_one_on_both():
    assert legacy_miou([(10, 10, 60, 90)], [(10, 10, 60, 90)], [SIZE]) == pytest.approx(1.0)
    assert mean_iou([(10, 10, 60, 90)], [(10, 10, 60, 90)]) == pytest.approx(1.0)


def test_true_iou_hand_computed_and_missing_prediction():
    # overlap 25x50 of two 50x50 boxes: 1250 / (2500+2500-1250)
    assert mean_iou([(0, 0, 50, 50), (0, 0, 10, 10)], [(25, 0, 75, 50), None]) == pytest.approx((1250 / 3750) / 2)


def test_legacy_miou_reads_high_on_random_boxes_whose_true_iou_is_low():
    rng = random.Random(0)

    def box():
        x1, x2 = sorted(rng.uniform(0, 1280) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, 1024) for _ in range(2))
        return (x1, y1, x2, y2)

    truth, pred = [box() for _ in range(2000)], [box() for _ in range(2000)]
    legacy = legacy_miou(truth, pred, [(1280, 1024)] * 2000)
    true = mean_iou(truth, pred)
    assert 0.40 < legacy < 0.52
    assert true < 0.15


def test_per_class_table_and_length_mismatch():
    rows = per_class(["Idle", "Idle", "Cutting"], ["Idle", "Cutting", "Cutting"])
    assert [r.label for r in rows] == ["Idle", "Cutting"]
    assert rows[0].support == 2 and rows[0].recall == 0.5
    with pytest.raises(ValueError, match="2 items"):
        accuracy(["a", "b"], ["a"])
