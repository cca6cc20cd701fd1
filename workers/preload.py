"""What the worker's fork server imports once, so that every job's process starts with it already imported.

Each job still trains in a process of its own (GPU memory is only reliably freed when a process exits), but a
process forked from a server that has imported torch, transformers' model code and FlashTune does not import them
again. Measured on the GPU machine (docs/benchmarks.md, session 7), a spawned job process spent 5-8 s before its
first event and ~12 s more importing before it began to load the base; on a 2-core CPU machine the imports below
take ~7 s.

CUDA must not be initialised in the server: a process forked from one that has initialised CUDA cannot use it.
bitsandbytes initialises CUDA when it is imported, and peft imports bitsandbytes, so both are left to the job's
process. The worker checks that once, in a process forked from the server (``workers.worker.job_process_context``);
if the check fails, jobs start as fresh processes ("spawn"), as before. Only the fork server imports this module.

The server dies with its worker: the kernel sends it SIGKILL when the worker ends (``PR_SET_PDEATHSIG``, set here,
on import). Left to itself it would exit only once every process holding its "alive" pipe had (a job's process
closes its copy: ``workers.child.die_with_worker``), and then spend seconds in interpreter shutdown with torch
loaded (measured 9.4 s on the loaded 2-core machine). Its job's process, in turn, dies with the server.
"""

from __future__ import annotations

import os
import signal

import torch  # noqa: F401
import transformers.modeling_utils  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401  (the Llama family: the built-in base, DeepSeek-7B)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import workers.child  # noqa: F401
from workers.training.distributed import die_with_parent

die_with_parent(signal.SIGKILL, os.getppid())  # the parent is the worker that started this server
