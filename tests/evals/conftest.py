"""One thread: the workers here share two cores, and two OpenMP threads on a busy core run slower than one."""

import torch

torch.set_num_threads(1)
