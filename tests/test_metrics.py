import numpy as np
import pytest

from serforget.common.metrics import classification_report, confusion_matrix, macro_f1, plot_confusion


def test_hand_computed_values() -> None:
    # true:  0 0 0 0 1 1 2 2 2 2 ; pred: 0 0 0 1 1 0 2 2 1 2
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2, 1, 2]
    rep = classification_report(y_true, y_pred, labels=["a", "b", "c"])
    assert rep["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 1, 3]]
    assert rep["wa"] == pytest.approx(7 / 10)
    assert rep["ua"] == pytest.approx((3 / 4 + 1 / 2 + 3 / 4) / 3)
    # F1: a: 2*3/(4+4)=0.75 ; b: 2*1/(2+3)=0.4 ; c: 2*3/(4+3)=6/7
    assert rep["macro_f1"] == pytest.approx((0.75 + 0.4 + 6 / 7) / 3)
    assert rep["recall"] == {"a": 0.75, "b": 0.5, "c": 0.75}


def test_absent_class_is_left_out_of_ua() -> None:
    rep = classification_report([0, 0, 1], [0, 1, 1], labels=["a", "b", "c"])
    assert rep["ua"] == pytest.approx((0.5 + 1.0) / 2)
    assert rep["recall"]["c"] is None


def test_validation_and_plot(tmp_path) -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], n_classes=3)
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix([0], [0, 1], n_classes=2)
    assert np.isnan(macro_f1(np.zeros((2, 2), dtype=int)))
    out = plot_confusion([[2, 1], [0, 3]], labels=["x", "y"], path=tmp_path / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
