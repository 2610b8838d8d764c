"""The client side of FedProx and SCAFFOLD: gradient corrections for ``client.train.train_round``.

FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") adds
``mu / 2 * ||w - w_global||^2`` over the trained adapter tensors to the local loss; its gradient
``mu * (w - w_global)`` is what ``ProximalTerm`` adds each step.

SCAFFOLD (Karimireddy et al. 2020) corrects each local gradient by ``c - c_i`` (server and client
control variates). After the round the client's variate becomes the mean of the raw minibatch
gradients it computed along its local trajectory (an estimate of its local gradient, as the
paper's option I, averaged over the round's steps instead of one extra pass; option II's
``(x - y_i) / (K lr)`` assumes plain SGD, and local training here is AdamW). ``c_i`` lives in the
client's state directory, so it survives restarts; the update returns ``delta c_i`` beside the
adapter delta, under ``keys.CONTROL_PREFIX``, and the transports sum it like the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save

from client.durable import prune_versions, version_before, versioned, write_bytes_atomic
from client.train import Params
from protocol import keys

CONTROL_FILE = Path("scaffold") / "control.safetensors"  # and control-r<round>.safetensors
CONTROL_STEM, CONTROL_SUFFIX = "control", ".safetensors"

Arrays = Mapping[str, np.ndarray]


class ProximalTerm:
    """grad += mu * (w - w_global) on the trainable adapter tensors."""

    def __init__(self, mu: float, global_adapter: Arrays) -> None:
        self.mu = mu
        self.anchor = {
            k: torch.from_numpy(np.asarray(v)).clone() for k, v in global_adapter.items()
        }

    def __call__(self, params: Params) -> None:
        with torch.no_grad():
            for name, p in params.items():
                if p.requires_grad and p.grad is not None:
                    w0 = self.anchor[name].to(device=p.device, dtype=p.dtype)
                    p.grad.add_(p.detach() - w0, alpha=self.mu)


class Scaffold:
    """grad += c - c_i each step; records the raw gradients for the next c_i."""

    def __init__(self, server_control: Arrays, client_control: Arrays) -> None:
        self.c = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in server_control.items()}
        self.ci = {
            k: np.asarray(client_control.get(k, np.zeros_like(v)), np.float32)
            for k, v in server_control.items()
        }
        self.grad_sum = {k: torch.zeros_like(v) for k, v in self.c.items()}
        self.steps = 0

    def __call__(self, params: Params) -> None:
        with torch.no_grad():
            for name, c in self.c.items():
                p = params[name]
                if p.grad is None:
                    continue
                self.grad_sum[name] += p.grad.detach().to("cpu", torch.float32)
                correction = c - torch.from_numpy(self.ci[name])
                p.grad.add_(correction.to(device=p.device, dtype=p.grad.dtype))
        self.steps += 1

    def new_client_control(self) -> dict[str, np.ndarray]:
        """c_i+ = the mean raw gradient over the round's steps (c_i unchanged if none ran)."""
        if self.steps == 0:
            return {k: v.copy() for k, v in self.ci.items()}
        return {k: (g / self.steps).numpy().astype(np.float32) for k, g in self.grad_sum.items()}

    def control_delta(self, new: Arrays) -> dict[str, np.ndarray]:
        """c_i+ - c_i, keyed for the update record."""
        return {
            keys.CONTROL_PREFIX + k: (np.asarray(new[k], np.float32) - self.ci[k]).astype(
                np.float32
            )
            for k in self.c
        }


def load_client_control(state_dir: Path, rnd: int | None = None) -> dict[str, np.ndarray]:
    """c_i for round ``rnd``: the newest one saved by a round before it (``client.durable``:
    a redone round starts from the same c_i); without ``rnd``, or if none, the unversioned file
    of older runs. {} before the client's first SCAFFOLD round."""
    path = state_dir / CONTROL_FILE
    if rnd is not None:
        found = version_before(path.parent, CONTROL_STEM, CONTROL_SUFFIX, rnd)
        path = found if found is not None else path
    return dict(load_file(str(path))) if path.is_file() else {}


def save_client_control(state_dir: Path, control: Arrays, rnd: int | None = None) -> None:
    """Atomically write the client's control variate after round ``rnd`` (temp file, fsync,
    rename, fsync of the directory); without ``rnd``, replace the unversioned file."""
    path = state_dir / CONTROL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if rnd is None else versioned(path.parent, CONTROL_STEM, CONTROL_SUFFIX, rnd)
    blob = save({k: np.ascontiguousarray(v) for k, v in control.items()})
    write_bytes_atomic(target, blob)
    if rnd is not None:
        prune_versions(path.parent, CONTROL_STEM, CONTROL_SUFFIX, rnd)
