"""Choosing the tf.distribute strategy of a training run, and fitting to it."""

import contextlib
import os
import threading

import tensorflow as tf


def _cluster_spec():
    try:
        return tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    except ValueError as error:
        raise ValueError(f"TF_CONFIG is not valid: {error}") from None


def cluster_addresses():
    """`[(task, address)]` of every task `TF_CONFIG` names, e.g. `("worker 1", "h:2222")`."""
    cluster = _cluster_spec()
    return [(f"{job} {index}", cluster.task_address(job, index))
            for job in sorted(cluster.jobs) for index in cluster.task_indices(job)]


def cluster_workers():
    """Number of workers `TF_CONFIG` describes (1 when it is unset).

    Raises:
        ValueError: `TF_CONFIG` is not valid, or names one address for two
            tasks (each would wait for the other for ever).
    """
    seen = {}
    for task, address in cluster_addresses():
        if address in seen:
            raise ValueError(
                f"TF_CONFIG names the address {address} twice ({seen[address]} and "
                f"{task}); every task needs its own host:port.")
        seen[address] = task
    jobs = _cluster_spec().as_dict()
    return max(1, sum(len(jobs[job]) for job in ("worker", "chief") if job in jobs))


@contextlib.contextmanager
def peer_deadline(timeout_s):
    """Ends the process with an error when the block outlasts `timeout_s` seconds.

    For the part of a multi-worker run that needs every peer (creating the
    strategy, building the model, the first step): TensorFlow waits for
    unreachable peers for ever, inside C++ that nothing in Python can
    interrupt, so a timer thread prints one line naming the cluster's
    addresses and exits with status 1. Without a `TF_CONFIG` cluster it does
    nothing.

    Args:
        timeout_s: Seconds to wait (`--cluster_timeout`).
    """
    if cluster_workers() < 2:
        yield
        return
    addresses = ", ".join(f"{task} at {address}" for task, address in cluster_addresses())
    print(f"Waiting up to {timeout_s} s for the cluster ({addresses}).", flush=True)

    def give_up():
        os.write(2, (f"Error: the cluster's workers could not all be reached within "
                     f"--cluster_timeout={timeout_s} s ({addresses}). Start the same "
                     "command on every worker and check the addresses in TF_CONFIG.\n"
                     ).encode())
        os._exit(1)  # pylint: disable=protected-access

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def make_strategy(single_device=False):
    """Returns the strategy for this process.

    - `TF_CONFIG` describing more than one worker: `MultiWorkerMirroredStrategy`
      (all local GPUs of every worker); this is how a run scales past one
      machine.
    - Otherwise `MirroredStrategy` over all local GPUs; without GPUs, over
      the logical CPU devices (one, unless the process configured several
      with `tf.config.set_logical_device_configuration`, as tests do).
    - `single_device=True` (for XLA, which Keras turns off under a
      strategy): the default strategy on the first device; refused when
      several GPUs or workers are there to use.

    Args:
        single_device: Use one device and no distribution strategy.

    Returns:
        A `tf.distribute.Strategy`.
    """
    workers = cluster_workers()
    # Physical devices only: listing logical ones initialises the runtime,
    # after which MultiWorkerMirroredStrategy can no longer be created.
    gpus = tf.config.list_physical_devices("GPU")
    if single_device:
        if workers > 1 or len(gpus) > 1:
            raise ValueError(
                "XLA (--xla) cannot be combined with a distribution strategy "
                f"(found {workers} worker(s) and {len(gpus)} GPU(s)); Keras "
                "turns XLA off under tf.distribute. Drop --xla, or run on "
                "one device."
            )
        return tf.distribute.get_strategy()
    if workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU" if gpus else "CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def is_chief(strategy):
    """Whether this worker writes the run's files (selection, report, export)."""
    return strategy.extended.should_checkpoint


def worker_dir(run_dir, strategy):
    """The directory of a non-chief worker's own files, inside `run_dir`."""
    return os.path.join(run_dir, "workers", str(strategy.cluster_resolver.task_id))


def adapt_to_multi_worker(model, sample_batch):
    """Lets a compiled Keras 3.15 model `fit` under MultiWorkerMirroredStrategy.

    Keras reduces two things across workers with `strategy.reduce(...,
    axis=0)`, which fails there (tensorflow/tensorflow#72388):
    - the sample batch `fit` builds metrics from: only its shapes matter, so
      build from a local batch and skip that step;
    - the scalar logs of each step ("Invalid reduction dimension 0 for input
      with 0 dimensions"): give them a leading axis of 1, so the mean over
      replicas is the scalar itself.

    Call it inside `strategy.scope()` after `compile`.

    Args:
        model: A compiled Keras model.
        sample_batch: One `(inputs, labels)` batch of the training data.
    """
    model._symbolic_build(data_batch=sample_batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    for name in ("train_step", "test_step"):
        setattr(model, name, _with_batched_logs(getattr(model, name)))


def _with_batched_logs(step):
    def step_with_batched_logs(data):
        return {key: tf.reshape(value, [1]) for key, value in step(data).items()}

    return step_with_batched_logs
