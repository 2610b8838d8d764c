"""The typed wire contract between the fedtune coordinator and its clients.

Everything that crosses the network (simulation included) goes through this package: record keys,
the dataclasses for what a round sends and what a client returns, adapter tensors <-> Flower
``ArrayRecord`` encoding, and validation of all of it on both ends.
"""

from protocol.adapter import AdapterSpec, TensorSpec, arrays_from_record, arrays_to_record
from protocol.errors import ProtocolError, UpdateRejected
from protocol.keys import SCHEMA_VERSION
from protocol.messages import (
    ClientUpdate,
    EvalInstruction,
    EvalResult,
    LoraSpec,
    SampleDP,
    TrainInstruction,
    decode_eval_instruction,
    decode_eval_result,
    decode_train_instruction,
    decode_update,
    encode_eval_instruction,
    encode_eval_result,
    encode_train_instruction,
    encode_update,
)

__all__ = [
    "SCHEMA_VERSION",
    "AdapterSpec",
    "ClientUpdate",
    "EvalInstruction",
    "EvalResult",
    "LoraSpec",
    "ProtocolError",
    "SampleDP",
    "TensorSpec",
    "TrainInstruction",
    "UpdateRejected",
    "arrays_from_record",
    "arrays_to_record",
    "decode_eval_instruction",
    "decode_eval_result",
    "decode_train_instruction",
    "decode_update",
    "encode_eval_instruction",
    "encode_eval_result",
    "encode_train_instruction",
    "encode_update",
]
