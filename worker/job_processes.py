"""The processes jobs run in: what a worker's parent prepares before it forks the
pool, how many threads a job may use, and whether a pool child runs more than one job.

Measured in a fresh child (2-core VM, torch 2.13 CPU): the first `torch.optim`
optimizer imports `torch._dynamo` (~1.0 s), the first MLflow model save ~1.0 s
(0.01 s the second time), the first matplotlib figure ~0.2 s more than the next.
Paid once in the parent, before it forks, every child inherits them.

Threads: torch and numpy's BLAS each start as many threads as the machine has cores,
in every process. Two jobs on a 2-core machine then ran 12x slower each than one
alone; with one thread each, at 0.97x. So a job gets `TORCH_THREADS_PER_JOB` threads,
by default the cores this worker may use divided by its concurrency.
"""

from __future__ import annotations

import io
import logging
import os

import torch

from jobs.settings import settings

# The environment variables that size the thread pools of libraries loaded after the
# limit is set (OpenBLAS, MKL and OpenMP read them when they load).
THREAD_ENV_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (taskset, a cpuset cgroup), not the machine's count."""
    return len(os.sched_getaffinity(0))


def threads_per_job(concurrency: int) -> int:
    if settings.torch_threads_per_job:
        return settings.torch_threads_per_job
    return max(1, cores_available() // max(1, concurrency))


def limit_job_threads(threads: int) -> None:
    """In a job's process: torch's intra-op pool, and the BLAS/OpenMP pools numpy and
    scipy use (through threadpoolctl, for libraries already loaded; the environment for
    those loaded later)."""
    from threadpoolctl import threadpool_limits

    for name in THREAD_ENV_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(threads)


def children_run_one_job_each() -> bool:
    """By default a fresh child per job only where a job can use CUDA: its process ending
    is what returns all of a job's GPU memory (the CUDA context included), and the parent
    can tell without initialising CUDA only from the build. A CPU-only torch build reuses
    its children: no GPU memory to return, and no child to replace between two jobs.
    `FRESH_PROCESS_PER_JOB` decides otherwise (say, a CUDA image on a CPU-only machine)."""
    if settings.fresh_process_per_job is not None:
        return settings.fresh_process_per_job
    return torch.backends.cuda.is_built()


def warm_up_for_children() -> None:
    """Pay, in the parent, the first-use costs that every job would pay in its child.
    Nothing here may initialise CUDA: the children could not use it afterwards."""
    import matplotlib.pyplot as plt

    # mlflow.pytorch calls logging.basicConfig when imported; here that would come before
    # Celery configures logging, and Celery's would then not apply: a placeholder handler
    # makes basicConfig do nothing.
    root, placeholder = logging.getLogger(), logging.NullHandler()
    root.addHandler(placeholder)
    try:
        import mlflow.pytorch  # noqa: F401 - imported for its first-use cost, paid once here
    finally:
        root.removeHandler(placeholder)
    from worker.confusion_plot import confusion_png
    from worker.mlflow_run import model_template

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.optim.Adam(model.parameters())  # the first optimizer imports torch._dynamo
    confusion_png([[1, 0], [0, 1]], ["a", "b"])  # its font, loaded once
    figure, _ = plt.subplots()  # the diagnostics' figures: matplotlib's first figure
    try:
        figure.savefig(io.BytesIO(), format="png")
    finally:
        plt.close(figure)
    model_template(model)  # MLflow's save of a model of torch's layers, which every such job's model reuses
    # A study's trial loads its Optuna study before it trains (pruning) and moves the study
    # on when it ends; the storage's first build is paid here, its connection closed.
    from jobs import study_search

    study_search.warm_storage()
    if torch.cuda.is_initialized():  # a dependency changed under us: fail loudly, not in every child
        raise RuntimeError("warming up the worker initialised CUDA in the parent; forked jobs could not use it")
