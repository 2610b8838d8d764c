"""``--strategy``: a server optimizer (``coordinator.optimizers``) and what clients are told.

    fedavg      SGD on the mean delta, server learning rate 1 (McMahan et al. 2017)
    fedavgm     server momentum (Hsu et al. 2019)
    fedadam     adaptive server optimizers (Reddi et al. 2021)
    fedyogi
    fedadagrad
    fedprox     FedAvg on the server; clients add mu/2 ||w - w_global||^2 (Li et al. 2020)
    scaffold    control variates (Karimireddy et al. 2020): see ``Scaffold`` below

Everything here acts on the mean delta the privacy stage releases, so it composes with secure
aggregation (the mean is the unmasked sum / weight) and with client-level DP (post-processing of
the noised mean: the privacy guarantee is unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from coordinator.optimizers.base import ServerOptimizer, load_named
from coordinator.optimizers.fedadagrad import fedadagrad
from coordinator.optimizers.fedadam import fedadam
from coordinator.optimizers.fedavg import FedAvg
from coordinator.optimizers.fedavgm import FedAvgM
from coordinator.optimizers.fedyogi import fedyogi
from protocol import keys
from protocol.adapter import AdapterSpec, TensorSpec
from protocol.codecs import Codec
from protocol.messages import TrainInstruction, encode_train_instruction

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class StrategySettings:
    """The strategy options of a run (``RunConfig`` fields of the same names)."""

    name: str = "fedavg"
    server_learning_rate: float = 0.0  # 0: the strategy's default (DEFAULT_SERVER_LR)
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.01  # fedprox only (Li et al. 2020 tune mu in {0.001, 0.01, 0.1, 1})


# Server learning rates when --server-learning-rate is 0: 1 for the FedAvg family (plain
# averaging), 0.01 for the adaptive ones (Reddi et al. 2021 tune it on a grid; 1e-2 is where their
# best values for text tasks lie, and Flower's FedYogi default).
DEFAULT_SERVER_LR = {
    "fedavg": 1.0,
    "fedavgm": 1.0,
    "fedprox": 1.0,
    "scaffold": 1.0,
    "fedadam": 0.01,
    "fedyogi": 0.01,
    "fedadagrad": 0.01,
}
STRATEGIES = tuple(DEFAULT_SERVER_LR)


def _optimizer(s: StrategySettings) -> ServerOptimizer:
    lr = s.server_learning_rate or DEFAULT_SERVER_LR[s.name]
    makers: dict[str, Callable[[], ServerOptimizer]] = {
        "fedavgm": lambda: FedAvgM(lr, s.server_momentum),
        "fedadam": lambda: fedadam(lr, s.beta1, s.beta2, s.tau),
        "fedyogi": lambda: fedyogi(lr, s.beta1, s.beta2, s.tau),
        "fedadagrad": lambda: fedadagrad(lr, s.beta1, s.beta2, s.tau),
    }
    return makers.get(s.name, lambda: FedAvg(lr))()


def control_name(name: str) -> str:
    return keys.CONTROL_PREFIX + name


@dataclass
class Strategy:
    """A server optimizer plus the client side of the strategy (proximal term, control
    variates). ``population`` is the number of clients (SCAFFOLD's N)."""

    settings: StrategySettings
    optimizer: ServerOptimizer
    population: int = 1
    cohort: int = 1  # clients per round (SCAFFOLD's |S|)
    control: dict[str, np.ndarray] = field(default_factory=dict)  # SCAFFOLD's server c

    @classmethod
    def create(cls, settings: StrategySettings, population: int, cohort: int) -> Strategy:
        if settings.name not in STRATEGIES:
            raise ValueError(f"strategy: {settings.name!r} is not one of {', '.join(STRATEGIES)}")
        return cls(settings, _optimizer(settings), max(1, population), max(1, cohort))

    @property
    def scaffold(self) -> bool:
        return self.settings.name == "scaffold"

    @property
    def proximal_mu(self) -> float:
        return self.settings.proximal_mu if self.settings.name == "fedprox" else 0.0

    # -- what a client is sent and returns --------------------------------------------------

    def instruction(self, instr: TrainInstruction) -> TrainInstruction:
        return dataclasses.replace(instr, proximal_mu=self.proximal_mu, scaffold=self.scaffold)

    def train_content(
        self,
        instr: TrainInstruction,
        adapter: Arrays,
        trained: AdapterSpec,
        *,
        down: Codec | None = None,
        rng: np.random.Generator | None = None,
    ) -> RecordDict:
        """The train message; ``down`` compresses the global adapter (``--compress-down``)."""
        control = None
        if self.scaffold:
            control = {
                name: self.control.get(name, np.zeros(t.shape, np.float32)).astype(np.float32)
                for name, t in trained.tensors
            }
        return encode_train_instruction(
            self.instruction(instr), dict(adapter), control, down=down, rng=rng
        )

    def update_spec(self, trained: AdapterSpec) -> AdapterSpec:
        """What a client's update holds: the trained tensors' deltas, and with SCAFFOLD their
        control-variate deltas (summed by the transport like the rest)."""
        if not self.scaffold:
            return trained
        extra = tuple((control_name(n), TensorSpec(t.shape, t.dtype)) for n, t in trained.tensors)
        return AdapterSpec(trained.tensors + extra)

    # -- the server step --------------------------------------------------------------------

    def apply(self, adapter: Arrays, mean: Arrays) -> dict[str, np.ndarray]:
        """The next global adapter from the released mean update. SCAFFOLD also moves the
        server control variate: c <- c + (|S| / N) mean(delta c) with |S| / N read as the
        sampling fraction clients-per-round / population."""
        delta = {k: v for k, v in mean.items() if not k.startswith(keys.CONTROL_PREFIX)}
        if self.scaffold:
            frac = min(1.0, self.cohort / self.population)
            for k in delta:
                dc = np.asarray(mean[control_name(k)], np.float64)
                self.control[k] = self.control.get(k, np.zeros(dc.shape, np.float64)) + frac * dc
        return self.optimizer.step(adapter, delta)

    # -- state saved with every round -------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"optimizer/{k}": v for k, v in self.optimizer.state_arrays().items()}
        out.update({f"control/{k}": v for k, v in self.control.items()})
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state_arrays(
            {k[len("optimizer/") :]: v for k, v in arrays.items() if k.startswith("optimizer/")}
        )
        self.control = load_named("control/", arrays)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.settings.name, **self.optimizer.settings()}
        if self.proximal_mu:
            out["proximal_mu"] = self.proximal_mu
        return out
