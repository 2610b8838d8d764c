"""Record and field names used on the wire. Defined once; both ends import them from here."""

from typing import Final

# Bumped whenever a field is added, removed or changes meaning. Both ends refuse other versions.
# 2: replies carry the round they answer (reply-meta "round", and a "round" field in every SecAgg
#    reply); SecAgg payloads are parsed strictly (duplicate keys, NaN, deep nesting refused); train
#    instructions carry proximal-mu and scaffold (and SCAFFOLD's server control variate).
# 3: train instructions carry the update codec (compress, compress-block-size, sketch-ratio,
#    sketch-rows, error-feedback), global-rank and secagg-clip; compressed updates and global
#    adapters travel with an update-codec / global-adapter-codec record.
# 4: train instructions carry logit-adjustment (a client of version 3 would ignore it).
SCHEMA_VERSION: Final = 4

# -- records inside a Message's RecordDict --------------------------------------------------------
GLOBAL_ADAPTER: Final = "global-adapter"  # ArrayRecord: every adapter tensor of the global model
TRAIN_CONFIG: Final = "train-config"  # ConfigRecord: a TrainInstruction
EVAL_CONFIG: Final = "eval-config"  # ConfigRecord: an EvalInstruction
UPDATE: Final = "update"  # ArrayRecord: the client's adapter delta (trained tensors only)
# ConfigRecord: the scalars of a compressed update (protocol.codecs); absent without a codec.
UPDATE_CODEC: Final = "update-codec"
# ConfigRecord: codec scalars and layout of a compressed global adapter (--compress-down).
GLOBAL_ADAPTER_CODEC: Final = "global-adapter-codec"
REPLY_META: Final = "reply-meta"  # ConfigRecord: schema version and the round the reply answers
METRICS: Final = "metrics"  # MetricRecord: numbers about the local work
SERVER_CONTROL: Final = "server-control"  # ArrayRecord: SCAFFOLD's server control variate c
# SCAFFOLD: a client's control-variate delta travels in the update record under this prefix + the
# adapter tensor's name, so transports (plain and secure) sum it like the adapter delta.
CONTROL_PREFIX: Final = "scaffold-control:"

# -- fields ---------------------------------------------------------------------------------------
SCHEMA: Final = "schema-version"
ROUND: Final = "round"
NUM_EXAMPLES: Final = "num-examples"
NUM_TOKENS: Final = "num-tokens"
LOSS: Final = "loss"
TRAINABLE_KEYS: Final = "trainable-keys"

# -- secure aggregation (privacy/secagg; README "Secure aggregation") -----------------------------
# One message type per stage: Flower routes "train.<action>" to the ClientApp function registered
# with @app.train("<action>").
SECAGG_ACTIONS: Final = ("secagg_setup", "secagg_share", "secagg_mask", "secagg_unmask")
SECAGG: Final = "secagg"  # ConfigRecord: the stage's message bytes and simulation switches
SECAGG_PAYLOAD: Final = "payload"  # bytes: a privacy.secagg.messages dataclass
SECAGG_INJECT_DROPOUT: Final = "inject-dropout"  # bool: simulate this client crashing here
SECAGG_MASKED: Final = "secagg-masked"  # ArrayRecord: {"masked": uint ring vector}

# -- task evaluation on the clients' held-out rows (--eval-task-clients) --------------------------
# Optional records: an evaluate message may carry EVAL_TASK (what to score), a reply TASK_COUNTS
# (what was scored). Absent means off on both sides, so peers without them stay compatible and the
# schema version is unchanged; the coordinator counts the replies that carry counts.
EVAL_TASK: Final = "eval-task"  # ConfigRecord: a protocol.task_eval.EvalTaskSpec
TASK_COUNTS: Final = "task-counts"  # MetricRecord: a protocol.task_eval.TaskCounts
# -- client identity (a QUERY message, once per node; coordinator/roster.py) ----------------------
IDENTITY: Final = "identity"  # ConfigRecord; in the query: schema version; in the reply: "name"
IDENTITY_NAME: Final = "name"  # str: the client's stable name (partition name, device name)
