"""The task runner that fans a flow's tasks out over several processes or machines: prefect-dask's
``DaskTaskRunner``, on a local Dask cluster or an existing scheduler.

    --workers N          a LocalCluster of N worker processes, one thread each (the default)
    --address tcp://...  the workers of a running ``dask scheduler`` instead

On an existing scheduler every worker must see the project at the same path (a shared
filesystem), run this project's venv, and reach the Prefect API and the MLflow store.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


def dask_runner(workers: int, address: str | None = None) -> DaskTaskRunner:
    """A ``DaskTaskRunner``: ``workers`` local processes with one thread each, or the scheduler at ``address``.

    One thread per worker because a task (a training, a shard of images) keeps a process busy;
    processes rather than threads so that the tasks do not share one interpreter. The local
    scheduler's HTTP endpoint takes a free port: Dask's fixed 8787 would clash with a second run
    on the same machine (the dashboard itself needs bokeh, which the project does not install).
    """
    from prefect_dask import DaskTaskRunner  # here: importing Dask takes most of a second, for nothing at 1 worker

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1,
                                          "dashboard_address": ":0"})


def threads_per_trial(workers: int, address: str | None) -> int | None:
    """torch threads for each of ``workers`` local trials, so that they do not oversubscribe the cores;
    None on an existing scheduler, whose machines this process cannot see."""
    return None if address else max(1, (os.cpu_count() or 1) // max(workers, 1))


@contextlib.contextmanager
def workers_report_here() -> Iterator[None]:
    """Make task runs in worker processes report to this flow run's Prefect API.

    Without ``PREFECT_API_URL`` a flow runs against a temporary API that only its own process
    knows, and every Dask worker would start a temporary API of its own (20 s each), where its
    task runs and logs would end up. Prefect carries its settings to the workers with each task,
    so naming the flow's API in the settings while the tasks are submitted is enough.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield
