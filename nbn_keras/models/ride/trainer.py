"""The training model of a RIDE classifier: its loss sees every expert's logits.

A RIDE classifier (`nbn_keras.models.ride.network`) has one output, the mean
of its experts' logits, which evaluation, folding and the serving export
use. Its losses (`nbn_keras.models.ride.loss`) need the logits of each
expert. `ExpertLogitsTrainer` is what `fit` trains: a view of the same
layers with both outputs, which gives the compiled loss the stacked expert
logits and the compiled metrics the mean logits, so the logs (`loss`,
`top1`, `val_loss`, ...) are those of the classifier. The classifier is what
is saved and exported.
"""

import keras

from nbn_keras.graph import leaf_layers
from nbn_keras.models.ride.network import ExpertAverage


class ExpertLogitsTrainer(keras.Model):
    """Trains a RIDE classifier with a loss on its per-expert logits.

    The trainer shares the classifier's layers and weights: it calls a
    functional view of the classifier's graph that returns
    `{"logits": <mean logits>, "expert_logits": <the input of its
    ExpertAverage layer>}` from one forward pass. `compute_loss` passes the
    expert logits (`[batch, experts, classes]`) to the compiled loss,
    `compute_metrics` the mean logits to the compiled metrics. Its variables
    are the classifier's, in the same order, so an optimizer built for the
    trainer has the slots a checkpoint of the classifier holds.

    The trainer is not saved: save the classifier (compiled with the
    trainer's optimizer, see `nbn_keras.training.callbacks.RunCheckpoint`).

    Args:
        classifier: A RIDE classifier (`build_ride_classifier`, NBN-converted
            or not), with an `ExpertAverage` layer.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Example:

    >>> trainer = ExpertLogitsTrainer(classifier)
    >>> trainer.compile(optimizer, loss=RIDELoss(class_counts), metrics=["accuracy"])
    >>> trainer.fit(data, epochs=2, callbacks=[RIDEEpochHook()])
    >>> classifier.save("model.keras")
    """

    def __init__(self, classifier, **kwargs):
        super().__init__(**kwargs)
        averages = [l for l in leaf_layers(classifier) if isinstance(l, ExpertAverage)]
        if len(averages) != 1:
            raise ValueError(
                f"ExpertLogitsTrainer needs a RIDE classifier with one ExpertAverage "
                f"layer; '{classifier.name}' has {len(averages)}.")
        self.view = keras.Model(
            classifier.inputs,
            {"logits": classifier.output, "expert_logits": averages[0].input},
            name=f"{classifier.name}_with_expert_logits")
        # The optimizer is built on the trainer's variables and saved with the
        # classifier's checkpoints: both must list the same variables in order.
        if [id(v) for v in self.view.weights] != [id(v) for v in classifier.weights]:
            raise ValueError(
                f"The weights of '{classifier.name}' and of its view with the expert "
                "logits differ or come in another order: its checkpoints would not "
                "hold the optimizer state of the trainer.")
        self.built = True

    def call(self, inputs, training=None):
        return self.view(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        return super().compute_loss(
            x, y, y_pred["expert_logits"], sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred["logits"], sample_weight)
