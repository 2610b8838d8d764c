"""The coordinator's run configuration: one frozen dataclass, built from the flat kebab-case keys
used by ``pyproject.toml`` (``[tool.flwr.app.config]``), ``fedtune`` options and Flower's
``run_config``. Errors name the key and the bad value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from client.defaults import DEFAULT_MODEL, Choice, Quantization
from protocol.messages import EvalInstruction, LoraSpec, SampleDP, TrainInstruction

ROUND_FAILURE_POLICIES = ("continue", "stop")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class DpMode(Choice):
    """Differential privacy for a run: off, per client (coordinator-side DP-FedAvg) or per
    training example (DP-SGD on every client)."""

    NONE = "none"
    CLIENT = "client"
    SAMPLE = "sample"

    @classmethod
    def parse(cls, value: str, *, field: str | None = "dp") -> DpMode:
        return super().parse(value, field=field)


ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    quantization: Quantization = Quantization.NF4
    # Simulation only: comma-separated modes given to clients round-robin ("" = all `quantization`).
    client_quantization: str = ""
    # Simulation only: comma-separated memory budgets (e.g. "1GB" or "768MB,2GB") given to
    # clients round-robin, a device's max-memory ("" = none).
    client_max_memory: str = ""
    # Clients may fall back to a smaller quantization to fit their memory budget.
    quantize_to_fit: bool = False
    rounds: int = 3
    clients_per_round: int = 3
    min_clients: int = 2
    eval_clients: int = 8  # clients evaluated every round (a fixed, seeded set); 0 = all
    round_timeout: float = 900.0
    node_wait_timeout: float = 120.0  # how long to wait for min-clients nodes to connect
    # A round with fewer than min-clients usable updates is recorded as failed, then the run
    # goes on with the unchanged adapter ("continue") or ends with an error ("stop").
    on_round_failure: str = "continue"
    local_steps: int = 6
    batch_size: int = 4
    eval_batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    lora: LoraSpec = field(default_factory=LoraSpec)
    heldout_fraction: float = 0.1
    seed: int = 0
    output_dir: str = ""
    central_eval_data: str = ""
    partition_dir: str = ""
    cache_dir: str = ""
    # -- secure aggregation (README, "Secure aggregation") ------------------------------------
    secagg: bool = False
    secagg_neighbours: int = 0  # k of the SecAgg+ graph; 0: about 3 log2(n), capped at n - 1
    secagg_threshold: int = 0  # t shares rebuild a secret; 0: a strict majority of k + 1
    secagg_clip: float = 0.5  # per-coordinate clip range of an update before fixed-point encoding
    secagg_precision: float = 0.0  # quantization step; 0: the finest that fits a 32-bit ring
    secagg_weight_cap: int = 65536  # example weights (num-examples) are capped at this
    inject_dropout: float = 0.0  # simulation: fraction of each round's clients made to crash
    dropout_stage: str = "masked-input"  # advertise | share-keys | masked-input | unmask
    # -- differential privacy (README, "Differential privacy") --------------------------------
    dp: DpMode = DpMode.NONE
    noise_multiplier: float = 0.0  # client: z on the clipped sum; sample: DP-SGD sigma
    clip_norm: float = 1.0  # client: L2 bound per client update; sample: per example gradient
    adaptive_clip: bool = False  # client: Andrew et al. 2021 quantile-tracking clip norm
    clip_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_stddev: float = 0.0  # 0: expected clients per round / 20 (the paper's choice)
    target_epsilon: float = 0.0  # 0: none; client: calibrate noise-multiplier for `rounds`
    max_epsilon: float = 0.0  # 0: none; stop before a round would exceed it
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | pld (Google's dp-accounting)
    population: int = 0  # clients in the population; 0: the nodes connected at the start
    ffa_lora: bool = False  # FFA-LoRA: A frozen at the shared init, only B trained and sent

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        need(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        self.client_quantizations()  # raises ConfigError naming a bad mode
        self.client_memory_budgets()  # raises ConfigError naming a bad size
        need(
            self.clients_per_round >= 1,
            "clients-per-round",
            f"must be >= 1, got {self.clients_per_round}",
        )
        need(self.min_clients >= 1, "min-clients", f"must be >= 1, got {self.min_clients}")
        need(
            self.min_clients <= self.clients_per_round,
            "min-clients",
            f"{self.min_clients} exceeds clients-per-round {self.clients_per_round}",
        )
        need(self.eval_clients >= 0, "eval-clients", f"must be >= 0, got {self.eval_clients}")
        need(
            self.round_timeout > 0,
            "round-timeout",
            f"must be > 0 seconds, got {self.round_timeout}",
        )
        need(
            self.node_wait_timeout > 0,
            "node-wait-timeout",
            f"must be > 0, got {self.node_wait_timeout}",
        )
        need(
            self.on_round_failure in ROUND_FAILURE_POLICIES,
            "on-round-failure",
            f"must be one of {', '.join(ROUND_FAILURE_POLICIES)}, got {self.on_round_failure!r}",
        )
        need(
            self.eval_batch_size >= 1,
            "eval-batch-size",
            f"must be >= 1, got {self.eval_batch_size}",
        )
        need(
            0.0 <= self.heldout_fraction < 1.0,
            "heldout-fraction",
            f"must be in [0, 1), got {self.heldout_fraction}",
        )
        self._check_secagg(need)
        self._check_privacy(need)
        # Validate the per-round instruction fields once, up front, with their own checks.
        self.train_instruction(1)

    def client_quantizations(self) -> list[Quantization]:
        """Every mode a client of this run may use."""
        if not self.client_quantization:
            return [self.quantization]
        out = []
        for mode in self.client_quantization.split(","):
            try:
                out.append(Quantization.parse(mode.strip(), field="client-quantization"))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        return out

    def client_memory_budgets(self) -> list[int]:
        """The simulated clients' memory budgets in bytes (empty: none)."""
        from client.defaults import parse_size

        out = []
        for size in (b.strip() for b in self.client_max_memory.split(",") if b.strip()):
            try:
                out.append(parse_size(size, "client-max-memory"))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            if out[-1] < 64 * 2**20:
                raise ConfigError(f"client-max-memory: {size} is below 64 MiB")
        return out

    def _check_secagg(self, need: Any) -> None:
        from privacy.secagg.server import STAGES

        need(
            self.secagg_neighbours >= 0,
            "secagg-neighbours",
            f"must be >= 0 (0: automatic), got {self.secagg_neighbours}",
        )
        need(
            self.secagg_threshold == 0 or self.secagg_threshold >= 2,
            "secagg-threshold",
            f"must be >= 2 (0: automatic), got {self.secagg_threshold}",
        )
        need(self.secagg_clip > 0, "secagg-clip", f"must be > 0, got {self.secagg_clip}")
        need(
            self.secagg_precision >= 0,
            "secagg-precision",
            f"must be >= 0 (0: automatic), got {self.secagg_precision}",
        )
        need(
            self.secagg_weight_cap >= 1,
            "secagg-weight-cap",
            f"must be >= 1, got {self.secagg_weight_cap}",
        )
        need(
            0.0 <= self.inject_dropout < 1.0,
            "inject-dropout",
            f"must be in [0, 1), got {self.inject_dropout}",
        )
        need(
            self.dropout_stage in STAGES,
            "dropout-stage",
            f"{self.dropout_stage!r} is not one of {', '.join(STAGES)}",
        )
        need(
            self.inject_dropout == 0 or self.secagg,
            "inject-dropout",
            "injects dropouts into secure aggregation; it needs --secagg",
        )

    def _check_privacy(self, need: Any) -> None:
        need(self.clip_norm > 0, "clip-norm", f"must be > 0, got {self.clip_norm}")
        # Secure aggregation has its own round (coordinator/secagg_round.py): client-level DP
        # there is distributed DP (Skellam noise added by the clients, accounted in RDP by
        # privacy/distributed_dp.py); FFA-LoRA needs its trainable keys in that round.
        ddp = self.secagg and self.dp is DpMode.CLIENT
        need(
            not (ddp and self.accountant != "rdp"),
            "accountant",
            f"{self.accountant!r} cannot account --dp client --secagg: the distributed Skellam "
            "noise has an RDP bound only; use --accountant rdp",
        )
        need(
            not (ddp and self.adaptive_clip),
            "adaptive-clip",
            "is not supported with --dp client --secagg (the clip-count query would need its own "
            "secure sum); use a fixed --clip-norm",
        )
        need(
            not (self.secagg and self.ffa_lora),
            "ffa-lora",
            "is not wired into secure-aggregation rounds yet; drop --secagg or --ffa-lora",
        )
        need(
            self.noise_multiplier >= 0,
            "noise-multiplier",
            f"must be > 0, got {self.noise_multiplier}",
        )
        need(0.0 < self.delta < 1.0, "delta", f"must be in (0, 1), got {self.delta}")
        need(
            self.target_epsilon >= 0,
            "target-epsilon",
            f"must be > 0 (or 0 for none), got {self.target_epsilon}",
        )
        need(
            self.max_epsilon >= 0,
            "max-epsilon",
            f"must be > 0 (or 0 for none), got {self.max_epsilon}",
        )
        need(
            self.accountant in ACCOUNTANTS,
            "accountant",
            f"{self.accountant!r} is not one of {', '.join(ACCOUNTANTS)}",
        )
        need(self.population >= 0, "population", f"must be >= 0, got {self.population}")
        need(
            0.0 < self.clip_quantile < 1.0,
            "clip-quantile",
            f"must be in (0, 1), got {self.clip_quantile}",
        )
        need(
            self.clip_learning_rate > 0,
            "clip-learning-rate",
            f"must be > 0, got {self.clip_learning_rate}",
        )
        need(
            self.clip_count_stddev >= 0,
            "clip-count-stddev",
            f"must be >= 0 (0: clients-per-round / 20), got {self.clip_count_stddev}",
        )
        if self.dp is DpMode.NONE:
            for key, on in (
                ("noise-multiplier", self.noise_multiplier > 0),
                ("target-epsilon", self.target_epsilon > 0),
                ("max-epsilon", self.max_epsilon > 0),
                ("adaptive-clip", self.adaptive_clip),
            ):
                need(not on, key, "needs --dp client or --dp sample (dp is 'none')")
            return
        need(
            not (self.noise_multiplier > 0 and self.target_epsilon > 0),
            "noise-multiplier",
            "give either noise-multiplier or target-epsilon, not both",
        )
        if self.dp is DpMode.SAMPLE:
            need(
                self.noise_multiplier > 0,
                "noise-multiplier",
                f"dp 'sample' needs a noise multiplier > 0, got {self.noise_multiplier}",
            )
            need(
                self.target_epsilon == 0,
                "target-epsilon",
                "is for dp 'client'; with dp 'sample' use noise-multiplier and max-epsilon "
                "(each client stops training when its own epsilon would pass it)",
            )
            need(not self.adaptive_clip, "adaptive-clip", "is for dp 'client' only")
            return
        need(
            self.noise_multiplier > 0 or self.target_epsilon > 0,
            "noise-multiplier",
            "dp 'client' needs a noise multiplier > 0 or a target-epsilon, got neither",
        )

    @property
    def count_stddev(self) -> float:
        """Noise std on the adaptive-clipping count (Andrew et al.: expected cohort / 20)."""
        return self.clip_count_stddev or self.clients_per_round / 20.0

    def train_instruction(self, rnd: int) -> TrainInstruction:
        try:
            return TrainInstruction(
                round=rnd,
                lora=self.lora,
                local_steps=self.local_steps,
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                learning_rate=self.learning_rate,
                max_grad_norm=self.max_grad_norm,
                seed=self.seed,
                sample_dp=self.sample_dp(),
            )
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from exc

    def sample_dp(self) -> SampleDP:
        if self.dp is not DpMode.SAMPLE:
            return SampleDP()
        return SampleDP(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            delta=self.delta,
            max_epsilon=self.max_epsilon,
            accountant=self.accountant,
        )

    def eval_instruction(self, rnd: int) -> EvalInstruction:
        return EvalInstruction(
            round=rnd, lora=self.lora, batch_size=self.eval_batch_size, seq_len=self.seq_len
        )

    # -- flat key <-> dataclass -------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if f.name == "lora":
                out += ["lora-rank", "lora-alpha", "lora-dropout", "lora-targets"]
            else:
                out.append(f.name.replace("_", "-"))
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from flat keys; unknown keys are ignored (they belong to other components)."""
        kwargs: dict[str, Any] = {}
        lora_defaults = LoraSpec()
        try:
            lora = LoraSpec(
                rank=_as(int, values.get("lora-rank", lora_defaults.rank), "lora-rank"),
                alpha=_as(float, values.get("lora-alpha", lora_defaults.alpha), "lora-alpha"),
                dropout=_as(
                    float, values.get("lora-dropout", lora_defaults.dropout), "lora-dropout"
                ),
                target_modules=_targets(values.get("lora-targets", lora_defaults.target_modules)),
            )
        except ValueError as exc:
            raise ConfigError(str(exc).replace("lora.", "lora-").replace("_", "-")) from exc
        kwargs["lora"] = lora
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if f.name == "lora" or key not in values:
                continue
            raw = values[key]
            if f.name in ("quantization", "dp"):
                parse = Quantization.parse if f.name == "quantization" else DpMode.parse
                try:
                    kwargs[f.name] = parse(str(raw))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
            else:
                kwargs[f.name] = _as(type(f.default), raw, key)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Flat keys, the inverse of ``from_mapping`` (values are str/int/float as Flower wants)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "lora":
                out.update(
                    {
                        "lora-rank": value.rank,
                        "lora-alpha": value.alpha,
                        "lora-dropout": value.dropout,
                        "lora-targets": ",".join(value.target_modules),
                    }
                )
            elif isinstance(value, StrEnum):
                out[f.name.replace("_", "-")] = value.value
            else:
                out[f.name.replace("_", "-")] = value
        return out


def _targets(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [t.strip() for t in raw.split(",")]
    else:
        items = [str(t).strip() for t in raw]
    if not all(items):
        raise ConfigError(f"lora-targets: empty module name in {raw!r}")
    return tuple(items)


def _as(kind: type, raw: Any, key: str) -> Any:
    """Coerce a config value (TOML/CLI give str, int, float or bool) to ``kind``."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes"):
            return True
        if str(raw).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {raw!r}")
    try:
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    raise TypeError(kind)


def resolve_output_dir(cfg: RunConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    import time

    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
