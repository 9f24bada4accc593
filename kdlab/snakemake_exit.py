"""Let `snakemake --profile profiles/pbs` return when it has nothing to do.

Snakemake 9.27 makes its executor before it finds that there is nothing to do, then returns
without shutting it down. The cluster-generic executor (1.0.9) starts, with its sidecar,
two threads that are not daemons and loop until that shutdown: the process printed
"Nothing to be done" and never exited. Imported without torch, by the Snakefile.
"""

import gc
import threading


def shut_down_executors_at_exit():
    """Once the main thread has ended, shut down every remote executor still waiting
    (Snakemake shuts them down itself whenever it ran jobs: then nothing is left to do)."""
    def when_the_main_thread_ends():
        threading.main_thread().join()  # returns when the interpreter starts joining the other threads
        from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
        # type(), not isinstance(): some objects in a Snakemake process fake their __class__
        for executor in [obj for obj in gc.get_objects() if issubclass(type(obj), RemoteExecutor)]:
            if getattr(executor, "wait", False):  # False too for one whose __init__ raised before setting it
                executor.shutdown()  # stops its sidecar, whose threads then end
    threading.Thread(target=when_the_main_thread_ends, name="kdlab-shut-down-executors", daemon=True).start()
