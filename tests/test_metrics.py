import json

import keras
import numpy as np
import pytest

from nbn_keras.training import metrics

# Training counts: classes 0-1 many (>100), 2-3 medium, 4-5 few (<20).
COUNTS = [500, 101, 100, 20, 19, 3]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5])
Y_PRED = np.array([0, 0, 0, 1, 1, 0, 2, 2, 0, 3, 0, 0, 5, 0, 0, 0])
# Hand-computed per-class accuracy: 3/4, 1/2, 2/3, 1/1, 0/2, 1/4.
PER_CLASS = [3 / 4, 1 / 2, 2 / 3, 1.0, 0.0, 1 / 4]
EXPECTED = {
    "top1": (3 + 1 + 2 + 1 + 0 + 1) / 16,
    "many": (3 / 4 + 1 / 2) / 2,
    "medium": (2 / 3 + 1.0) / 2,
    "few": (0.0 + 1 / 4) / 2,
    "balanced": sum(PER_CLASS) / 6,
}


def _logits(pred, num_classes=6):
    return np.eye(num_classes, dtype=np.float32)[pred] * 5.0 - 1.0


def test_groups_follow_thresholds():
    groups = metrics.class_groups(COUNTS)
    assert groups["many"].tolist() == [True, True, False, False, False, False]
    assert groups["medium"].tolist() == [False, False, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, True, True]
    custom = metrics.class_groups(COUNTS, many_threshold=50, few_threshold=5)
    assert custom["few"].tolist() == [False] * 5 + [True]


def test_metrics_against_hand_computed_values():
    results = {}
    for metric in metrics.long_tail_metrics(COUNTS):
        # Two updates: the state must accumulate.
        metric.update_state(Y_TRUE[:7], _logits(Y_PRED[:7]))
        metric.update_state(Y_TRUE[7:], _logits(Y_PRED[7:]))
        results[metric.name] = float(metric.result())
    for name, value in EXPECTED.items():
        assert results[name] == pytest.approx(value, abs=1e-6), name
    per_class = metrics.PerClassAccuracy(6)
    per_class.update_state(Y_TRUE, _logits(Y_PRED))
    np.testing.assert_allclose(per_class.result(), PER_CLASS, atol=1e-6)
    report = metrics.long_tail_report(Y_TRUE, Y_PRED, COUNTS)
    for name, value in EXPECTED.items():
        assert report[name] == pytest.approx(value), name


def test_empty_group_is_nan_and_reset():
    few = metrics.GroupAccuracy([500, 400], group="few")
    few.update_state([0, 1], _logits([0, 1], 2))
    assert np.isnan(float(few.result()))
    many = metrics.GroupAccuracy([500, 400], group="many")
    many.update_state([0, 1], _logits([0, 0], 2))
    assert float(many.result()) == pytest.approx(0.5)
    many.reset_state()
    assert np.isnan(float(many.result()))


def test_sample_weight_and_column_labels():
    balanced = metrics.BalancedAccuracy(3)
    balanced.update_state(np.array([[0], [1], [2]]), _logits([0, 0, 2], 3),
                          sample_weight=np.array([1.0, 2.0, 1.0]))
    assert float(balanced.result()) == pytest.approx(2 / 3)


def test_serialization_round_trip():
    metric = metrics.GroupAccuracy(COUNTS, group="medium", many_threshold=80, few_threshold=10)
    config = keras.saving.serialize_keras_object(metric)
    assert config["registered_name"] == "nbn_keras>GroupAccuracy"
    again = keras.saving.deserialize_keras_object(config)
    assert again.get_config() == metric.get_config()
    for cls in (metrics.BalancedAccuracy, metrics.PerClassAccuracy):
        clone = cls.from_config(cls(7).get_config())
        assert clone.num_classes == 7


def test_fit_and_evaluate_report_group_metrics():
    x = _logits(Y_PRED)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Identity()])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=metrics.long_tail_metrics(COUNTS) + [metrics.PerClassAccuracy(6)])
    results = model.evaluate(x, Y_TRUE, batch_size=5, return_dict=True, verbose=0)
    for name, value in EXPECTED.items():
        assert results[name] == pytest.approx(value, abs=1e-6), name
    np.testing.assert_allclose(results["per_class"], PER_CLASS, atol=1e-6)


def test_bad_group():
    with pytest.raises(ValueError, match="group"):
        metrics.GroupAccuracy(COUNTS, group="tail")


def _refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_report_writes_undefined_figures_as_null(tmp_path):
    from nbn_keras.analysis import report
    from nbn_keras.data import base

    # Records are the logits themselves (1x1 "images", recipe "none").
    def split(labels, predicted):
        return base.Split(np.eye(3, dtype=np.uint8)[predicted].reshape(-1, 1, 1, 3) * 5,
                          labels)

    # Class 2 has no training and no test image; every class is "few".
    data = base.LongTailedData(
        name="t", train_split=split([0, 0, 1], [0, 0, 1]),
        val_split=split([0, 1], [0, 1]), test_split=split([0, 0, 1], [0, 1, 1]),
        num_classes=3, image_shape=(1, 1, 3), mean=(0, 0, 0), std=(1, 1, 1),
        recipe="none")
    model = keras.Sequential([keras.Input((1, 1, 3)), keras.layers.Flatten()])
    figures = report.evaluate(model, data)
    path = report.write(figures, str(tmp_path))
    written = json.loads(open(path).read(), parse_constant=_refuse_constant)
    assert written["per_class"] == [50.0, 100.0, None]
    assert written["many"] is None and written["medium"] is None
    assert written["few"] == pytest.approx(75.0)
    assert written["balanced"] == pytest.approx(75.0)
    assert written["top1"] == pytest.approx(200 / 3)
    assert written["class_counts"] == [2, 1, 0]
    # The printed table still shows the undefined figures.
    assert "nan" in report.table(figures)
