"""Ending a multi-process run so that every rank exits (both trainers call :func:`finish_distributed`).

A gloo process group can deadlock its process at exit. ``accelerator.end_training()`` destroys the
process group, but DDP's C++ ``Reducer`` still owns a reference to it; when the wrapped model is freed
later (function return, interpreter exit) the Reducer's destructor runs ``~ProcessGroupGloo`` while
holding the GIL and joins gloo's worker threads, and a worker that is still releasing a finished
collective's Python tensors waits for the GIL forever (pytorch/pytorch#56297). Seen here: a rank that
had written its last file hung in ``sys.exit`` (py-spy: ``~Reducer → ~ProcessGroupGloo →
thread::join``; the worker in ``AsyncBarrierWork`` dtor → ``decref_pyobject``), and the launcher waited.

The fix is the order of release: free the DDP wrapper while the process group is still registered (the
Reducer then drops only one of several references), and let ``destroy_process_group`` drop the last
one through the Python binding, whose destructor releases the GIL.
"""

from __future__ import annotations

import gc

from accelerate import Accelerator


def finish_distributed(accelerator: Accelerator) -> None:
    """Barrier, free the prepared (DDP) modules, then destroy the process group.

    The caller must first drop its own references to the prepared model (``del model``): this function
    can only free the accelerator's.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator's references to prepared models, optimizers, loaders
    gc.collect()  # DDP wrappers in reference cycles go now, while the process group is still registered
    accelerator.end_training()  # destroy_process_group: the group's last reference
