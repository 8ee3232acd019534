"""What every process of a run must learn together.

A process that raised alone would leave the others waiting in the next collective. So a
condition one process may meet alone (a stop signal, a failed write) is first combined over all
processes, and then every process acts on the same answer at the same step.
"""

from __future__ import annotations

import torch


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process. A collective under several processes: every
    process calls it at the same point and gets the same answer."""
    if accelerator.num_processes == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").item() > 0
