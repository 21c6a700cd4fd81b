"""Random draws that survive a resume by construction.

Every draw of a training step comes from a generator seeded by
(seed, global step, micro-batch, rank, purpose). A run resumed at step N draws exactly
what the uninterrupted run drew at step N, with no generator state to checkpoint, and
one purpose's draws do not shift when another's probability changes.
"""

import hashlib

import torch


def step_generator(seed: int, step: int, rank: int, purpose: str, micro_batch: int = 0) -> torch.Generator:
    """A CPU generator for one purpose of one step (draw on CPU, then move the tensor)."""
    key = f"{seed}/{step}/{micro_batch}/{rank}/{purpose}".encode()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
    return generator
