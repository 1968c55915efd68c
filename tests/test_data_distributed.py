"""Sampler pipelines and metrics under MirroredStrategy with 2 CPU replicas.

Logical devices must be configured before TF initialises, so this runs in a
fresh subprocess and leaves the pytest process untouched.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import nbn_keras.data as nbn_data
    from nbn_keras.training import metrics

    data = nbn_data.load("synthetic_lt", num_classes=5, n_max=40, imbalance_factor=10,
                         image_size=8, recipe="cifar")
    batch, epochs = 16, 2
    steps = nbn_data.steps_per_epoch(data, batch)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}

    train = nbn_data.make_train_dataset(data, batch, sampler="progressive", epochs=epochs)
    dist = strategy.experimental_distribute_dataset(train)
    shapes = []
    for images, labels in dist:
        shapes.append([list(t.shape) for t in strategy.experimental_local_results(images)])
    out["num_batches"], out["expected_batches"] = len(shapes), epochs * steps
    out["replica_shapes"] = shapes[0]

    with strategy.scope():
        model = keras.Sequential([keras.Input(data.image_shape), keras.layers.Rescaling(1 / 255.0),
                                  keras.layers.Flatten(), keras.layers.Dense(data.num_classes)])
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=metrics.long_tail_metrics(data.class_counts, 30, 10))
    history = model.fit(
        nbn_data.make_train_dataset(data, batch, sampler="class_balanced", epochs=epochs),
        epochs=epochs, steps_per_epoch=steps, verbose=0)
    out["fit_keys"] = sorted(history.history)
    test = nbn_data.make_eval_dataset(data, "test", batch_size=batch)
    out["evaluate"] = model.evaluate(test, return_dict=True, verbose=0)
    logits = model.predict(test, verbose=0)
    report = metrics.long_tail_report(data.test_split.labels, logits, data.class_counts, 30, 10)
    out["report"] = {k: float(v) for k, v in report.items() if k != "per_class"}
    print("RESULT" + json.dumps(out, default=float))
    """
)


def test_sampler_dataset_and_metrics_under_mirrored_strategy():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["replicas"] == 2
    assert out["num_batches"] == out["expected_batches"]
    assert out["replica_shapes"] == [[8, 8, 8, 3], [8, 8, 8, 3]]
    assert {"top1", "many", "medium", "few", "balanced"} <= set(out["fit_keys"])
    for name, value in out["report"].items():
        assert abs(out["evaluate"][name] - value) < 1e-5, name
