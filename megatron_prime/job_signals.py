"""The trainer alone reacts to the job's signals; the processes it starts outlive them.

SLURM sends ``--signal=USR1@N`` (the time-limit warning), and scancel or a pre-emption sends
SIGTERM, to every process of the job step: the trainer, and the vLLM engine, the math
verifier's workers and the code sandboxes it started. The trainer (train.StopRequest)
finishes its step, which still needs those children, saves, and shuts them down itself; a
child that died on the signal would fail the step and lose the save.

Children are therefore started with both signals *blocked* (``children_outlive_job_signals``):
a blocked signal stays pending, undelivered, whatever handler the child installs later (vLLM's
engine core and workers install SIGTERM handlers that shut them down), and the signal mask is
inherited across fork and exec. Only the calling thread's mask changes, and only while it
starts children: the trainer's dispositions stay as they are, so a signal meanwhile still
reaches its StopRequest handler (through another thread, or when the mask is restored).
Children are stopped by the trainer with SIGKILL (verifiers, sandboxes) or SIGINT (vLLM).

Anchors: verl, slime and NeMo-RL start their engines as Ray actors and leave stopping them to
the Ray driver; on a job-wide SIGTERM their actors go down with the job, no save. Megatron-LM's
``--exit-signal-handler`` (SIGTERM: save, then exit) has no children to keep alive.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

JOB_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})


@contextlib.contextmanager
def children_outlive_job_signals(spawn: bool = False) -> Iterator[None]:
    """Processes started inside (this thread) inherit SIGTERM and SIGUSR1 blocked.

    ``spawn=True`` where the children come from multiprocessing's spawn (vLLM's engine core):
    its resource tracker (a child too) is then started here, inside the block. The first
    spawn would start it otherwise, and ``resource_tracker.ensure_running`` *unblocks* SIGINT
    and SIGTERM in the calling thread after starting it, so the engine core would come up
    with SIGTERM deliverable. The mask is set again after it; a tracker that already runs is
    left alone (and the mask with it).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        if spawn:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_SETMASK, previous | JOB_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
