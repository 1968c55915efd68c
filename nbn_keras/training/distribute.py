"""Choosing the tf.distribute strategy of a training run, and fitting to it."""

import os
import socket
import time

import tensorflow as tf

from nbn_keras import interrupts
from nbn_keras import keras_internals


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


def wait_for_peers(timeout_s, poll_s=0.2):
    """Returns once every other task of `TF_CONFIG` accepts a TCP connection.

    TensorFlow waits for unreachable peers for ever, inside C++ that holds
    the interpreter (no signal handler runs there), so this worker checks
    first, in Python: it listens on its own port (for its peers' checks)
    until it has reached each peer, on that peer's listener or, once the
    peer went on, on its TensorFlow server.

    Args:
        timeout_s: Seconds to wait (`--cluster_timeout`).
        poll_s: Seconds between two attempts.

    Raises:
        ValueError: A peer was not reached in time; the message names the
            addresses.
    """
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    own = resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id)
    waiting = {task: address for task, address in cluster_addresses() if address != own}
    print(f"Waiting up to {timeout_s} s for {_named(waiting)}.", flush=True)
    deadline = time.monotonic() + timeout_s
    with _listen(own):
        while waiting:
            for task, address in list(waiting.items()):
                if _accepts(address):
                    del waiting[task]
            if waiting and time.monotonic() > deadline:
                raise ValueError(
                    f"This worker ({own}) could not reach {_named(waiting)} within "
                    f"--cluster_timeout={timeout_s} s. Start the same command on every "
                    "worker and check the addresses in TF_CONFIG.")
            time.sleep(poll_s if waiting else 0)


def _named(tasks):
    return ", ".join(f"{task} at {address}" for task, address in tasks.items())


def _split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _listen(address):
    port = _split_address(address)[1]
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6,
                                        dualstack_ipv6=True, backlog=64)
        return socket.create_server(("", port), backlog=64)
    except OSError as error:
        raise ValueError(f"This worker cannot listen on its TF_CONFIG address {address}: "
                         f"{error.strerror}.") from None


def _accepts(address):
    try:
        socket.create_connection(_split_address(address), timeout=1).close()
        return True
    except OSError:
        return False


def make_strategy(single_device=False, cluster_timeout=300):
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
        cluster_timeout: Seconds to wait for the other workers of a cluster
            (`wait_for_peers`).

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
        wait_for_peers(cluster_timeout)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        interrupts.restore_handlers()  # The strategy installs a SIGTERM handler that only logs.
        return strategy
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
    keras_internals.build_for_fit(model, sample_batch)
    for name in ("train_step", "test_step"):
        setattr(model, name, _with_batched_logs(getattr(model, name)))


def _with_batched_logs(step):
    def step_with_batched_logs(data):
        return {key: tf.reshape(value, [1]) for key, value in step(data).items()}

    return step_with_batched_logs
