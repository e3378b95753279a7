"""Multi-worker training: the train stage under ``tf.distribute.MultiWorkerMirroredStrategy``.

TensorFlow's own convention turns it on: the environment variable ``TF_CONFIG`` names
the cluster and this process's place in it, for example, on the first of two machines::

    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
                "task": {"type": "worker", "index": 0}}'

Every worker runs the same train stage on the same prepared data and params; each epoch's
batches are split across the workers and their gradients all-reduced, so
``train.batch_size`` stays the global batch and the result is the single-worker one.
Worker 0 (or the task of type ``chief``, if the cluster has one) is the chief: only it
opens the MLflow run, checkpoints and writes the stage's outputs.

This is the one module that imports TensorFlow by name: the model and the training loop
stay pure Keras 3, and without ``TF_CONFIG`` nothing here runs.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from classifier.errors import StageError

TF_CONFIG = "TF_CONFIG"
ROLES = ("chief", "worker")


class ClusterConfigError(StageError):
    """TF_CONFIG is not a cluster this stage can train on."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster, read from ``TF_CONFIG``."""

    workers: int
    role: str
    index: int
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """TensorFlow's rule: the chief task if there is one, else worker 0."""
        if self.has_chief:
            return self.role == "chief"
        return self.index == 0


def cluster_from_env(environ: dict[str, str] | None = None) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes, or None to train alone (unset, or one worker)."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        role, index = task["type"], int(task["index"])
        sizes = {name: len(cluster.get(name, [])) for name in ROLES}
    except (ValueError, KeyError, TypeError) as error:
        raise ClusterConfigError(
            f"{TF_CONFIG}: not a cluster spec ({type(error).__name__}: {error}); expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    unknown = sorted(set(cluster) - set(ROLES))
    if unknown:
        raise ClusterConfigError(
            f"{TF_CONFIG}: task types {unknown} are not used by MultiWorkerMirroredStrategy; "
            "name the machines chief and worker"
        )
    if role not in ROLES or not 0 <= index < sizes[role]:
        raise ClusterConfigError(
            f"{TF_CONFIG}: task {role} {index} is not in the cluster ({sizes})"
        )
    total = sizes["chief"] + sizes["worker"]
    if total == 1:
        return None
    return Cluster(workers=total, role=role, index=index, has_chief=sizes["chief"] > 0)


def strategy() -> Any:
    """A MultiWorkerMirroredStrategy that joins the cluster of ``TF_CONFIG``.

    TensorFlow reads ``TF_CONFIG`` itself; the first collective waits for every worker.
    """
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def adapt_to_multi_worker(model: Any, strategy: Any) -> None:
    """Make Keras 3's ``fit`` work, and report cluster-wide metrics, under this strategy.

    keras-team/keras#20585 (open; still so in Keras 3.15): ``fit`` fails before the first
    step, because it reduces a whole (x, y) batch across workers to learn its shapes, and
    after it, because it averages the scalar loss and metrics "along axis 0". Here the
    shapes come from one worker's share of the batch. And each step's logs are computed
    from the metrics' totals and counts summed over all workers, not as a mean of each
    worker's own means, which a worker with an empty last batch would skew: the logged
    loss and accuracy are those of the whole epoch, as on one machine. Gradients are
    all-reduced by the strategy itself.
    """
    import keras
    import tensorflow as tf

    def first_local(value: Any) -> Any:
        is_distributed = isinstance(value, tf.distribute.DistributedValues)
        return value.values[0] if is_distributed else value

    def build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(first_local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def cluster_logs(step: Any) -> Any:
        def logs(data: Any) -> dict[str, Any]:
            step(data)
            replica = tf.distribute.get_replica_context()
            results: dict[str, Any] = {}
            for metric in model.metrics:  # loss and accuracy: means, so sums of their states
                summed = replica.all_reduce("SUM", [tf.identity(v.value) for v in metric.variables])
                result = metric.stateless_result(summed)
                results.update(result if isinstance(result, dict) else {metric.name: result})
            return {name: keras.ops.reshape(value, (1,)) for name, value in results.items()}

        return logs

    model._maybe_symbolic_build = build
    model.train_step = cluster_logs(model.train_step)
    model.test_step = cluster_logs(model.test_step)


class WorkerLost(StageError):
    """Another worker of the cluster stopped (crashed, killed, unreachable) mid-training."""


def reporting_lost_workers(train: Callable[[], object]) -> None:
    """Call ``train``; TensorFlow's error for a worker that stopped answering becomes one line."""
    import tensorflow as tf

    try:
        train()
        return
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as error:
        first_line = str(error.message).strip().splitlines()[0]
        reason = first_line.split("Collective ops is aborted by: ")[-1][:300]
    # The failed all-reduce leaves a thread pool in the frames of the error, whose __del__
    # prints a traceback at interpreter exit; with the error gone, collect it now.
    gc.collect()
    raise WorkerLost(
        f"multi-worker training stopped: another worker is gone ({reason}); "
        "start every worker again"
    )
