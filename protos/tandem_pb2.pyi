from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_LATENCY: _ClassVar[Objective]
    OBJECTIVE_ENERGY: _ClassVar[Objective]
    OBJECTIVE_WEIGHTED: _ClassVar[Objective]

class PlanKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_KIND_UNSPECIFIED: _ClassVar[PlanKind]
    PLAN_LOCAL: _ClassVar[PlanKind]
    PLAN_SPLIT: _ClassVar[PlanKind]
    PLAN_REMOTE: _ClassVar[PlanKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_FP16: Encoding
ENCODING_INT8: Encoding
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_LATENCY: Objective
OBJECTIVE_ENERGY: Objective
OBJECTIVE_WEIGHTED: Objective
PLAN_KIND_UNSPECIFIED: PlanKind
PLAN_LOCAL: PlanKind
PLAN_SPLIT: PlanKind
PLAN_REMOTE: PlanKind

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "payload", "encoding", "scale", "zero_point", "shared")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    encoding: Encoding
    scale: float
    zero_point: int
    shared: SharedBytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ..., shared: _Optional[_Union[SharedBytes, _Mapping]] = ...) -> None: ...

class SharedBytes(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("in_flight", "queued", "max_concurrency", "max_queue", "queue_delay_ms", "cpu_percent")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queued: int
    max_concurrency: int
    max_queue: int
    queue_delay_ms: float
    cpu_percent: float
    def __init__(self, in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., max_queue: _Optional[int] = ..., queue_delay_ms: _Optional[float] = ..., cpu_percent: _Optional[float] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "digest", "inputs", "outputs", "num_cuts", "kind", "plans_unavailable", "profiled", "background")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CUTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLANS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PROFILED_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_cuts: int
    kind: str
    plans_unavailable: str
    profiled: _containers.RepeatedCompositeFieldContainer[ProfiledShape]
    background: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_cuts: _Optional[int] = ..., kind: _Optional[str] = ..., plans_unavailable: _Optional[str] = ..., profiled: _Optional[_Iterable[_Union[ProfiledShape, _Mapping]]] = ..., background: _Optional[_Iterable[str]] = ...) -> None: ...

class ProfiledShape(_message.Message):
    __slots__ = ("inputs", "source")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    source: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class SkippedFile(_message.Message):
    __slots__ = ("file", "reason")
    FILE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    file: str
    reason: str
    def __init__(self, file: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PartitionRequest(_message.Message):
    __slots__ = ("model", "model_digest", "cut", "tensors", "reply_encoding", "edge_outputs", "has_edge_outputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REPLY_ENCODING_FIELD_NUMBER: _ClassVar[int]
    EDGE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HAS_EDGE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_digest: str
    cut: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    reply_encoding: Encoding
    edge_outputs: _containers.RepeatedScalarFieldContainer[str]
    has_edge_outputs: bool
    def __init__(self, model: _Optional[str] = ..., model_digest: _Optional[str] = ..., cut: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., reply_encoding: _Optional[_Union[Encoding, str]] = ..., edge_outputs: _Optional[_Iterable[str]] = ..., has_edge_outputs: _Optional[bool] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model", "model_digest", "inputs", "reply_encoding")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_ENCODING_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_digest: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    reply_encoding: Encoding
    def __init__(self, model: _Optional[str] = ..., model_digest: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., reply_encoding: _Optional[_Union[Encoding, str]] = ...) -> None: ...

class RunReply(_message.Message):
    __slots__ = ("outputs", "compute_ms", "queue_ms", "decode_ms", "encode_ms", "load", "node_id")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    compute_ms: float
    queue_ms: float
    decode_ms: float
    encode_ms: float
    load: NodeLoad
    node_id: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., compute_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., node_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LlmLoad(_message.Message):
    __slots__ = ("model", "slots", "active", "queued", "max_queue", "queue_delay_ms", "prompt_tok_s", "gen_tok_s", "ctx_per_seq", "next_stream_tok_s", "batched_steps", "step_ms", "batched_verify")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOK_S_FIELD_NUMBER: _ClassVar[int]
    GEN_TOK_S_FIELD_NUMBER: _ClassVar[int]
    CTX_PER_SEQ_FIELD_NUMBER: _ClassVar[int]
    NEXT_STREAM_TOK_S_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_VERIFY_FIELD_NUMBER: _ClassVar[int]
    model: str
    slots: int
    active: int
    queued: int
    max_queue: int
    queue_delay_ms: float
    prompt_tok_s: float
    gen_tok_s: float
    ctx_per_seq: int
    next_stream_tok_s: float
    batched_steps: int
    step_ms: _containers.RepeatedScalarFieldContainer[float]
    batched_verify: bool
    def __init__(self, model: _Optional[str] = ..., slots: _Optional[int] = ..., active: _Optional[int] = ..., queued: _Optional[int] = ..., max_queue: _Optional[int] = ..., queue_delay_ms: _Optional[float] = ..., prompt_tok_s: _Optional[float] = ..., gen_tok_s: _Optional[float] = ..., ctx_per_seq: _Optional[int] = ..., next_stream_tok_s: _Optional[float] = ..., batched_steps: _Optional[int] = ..., step_ms: _Optional[_Iterable[float]] = ..., batched_verify: _Optional[bool] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "models", "load", "llm", "skipped")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    load: NodeLoad
    llm: _containers.RepeatedCompositeFieldContainer[LlmLoad]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedFile]
    def __init__(self, node_id: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., llm: _Optional[_Iterable[_Union[LlmLoad, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedFile, _Mapping]]] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelProfileMsg(_message.Message):
    __slots__ = ("model", "digest", "segment_ms", "run_overhead_ms", "json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    digest: str
    segment_ms: _containers.RepeatedScalarFieldContainer[float]
    run_overhead_ms: float
    json: str
    def __init__(self, model: _Optional[str] = ..., digest: _Optional[str] = ..., segment_ms: _Optional[_Iterable[float]] = ..., run_overhead_ms: _Optional[float] = ..., json: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "objective", "plan", "prompt_token_ids", "generated_token_ids", "logprobs", "top_logprobs", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    objective: Objective
    plan: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    top_logprobs: int
    tier: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., objective: _Optional[_Union[Objective, str]] = ..., plan: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("index", "token_id", "text", "logprob", "piece", "top_logprobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    logprob: float
    piece: bytes
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., piece: _Optional[bytes] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "piece", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    piece: bytes
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., piece: _Optional[bytes] = ..., logprob: _Optional[float] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "tokens_per_s", "ran", "node", "switched", "switched_at_token", "switch_reason", "queue_ms", "total_ms", "planned", "reason", "predicted_ttft_ms", "predicted_total_ms", "predicted_energy_j", "resumed_state_bytes", "model", "tier", "confidence", "confidence_probability", "threshold", "escalated", "draft_rounds", "drafted_tokens", "accepted_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RAN_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_AT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SWITCH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float
    ran: PlanKind
    node: str
    switched: bool
    switched_at_token: int
    switch_reason: str
    queue_ms: float
    total_ms: float
    planned: PlanKind
    reason: str
    predicted_ttft_ms: float
    predicted_total_ms: float
    predicted_energy_j: float
    resumed_state_bytes: int
    model: str
    tier: str
    confidence: float
    confidence_probability: float
    threshold: float
    escalated: bool
    draft_rounds: int
    drafted_tokens: int
    accepted_tokens: int
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., ran: _Optional[_Union[PlanKind, str]] = ..., node: _Optional[str] = ..., switched: _Optional[bool] = ..., switched_at_token: _Optional[int] = ..., switch_reason: _Optional[str] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., planned: _Optional[_Union[PlanKind, str]] = ..., reason: _Optional[str] = ..., predicted_ttft_ms: _Optional[float] = ..., predicted_total_ms: _Optional[float] = ..., predicted_energy_j: _Optional[float] = ..., resumed_state_bytes: _Optional[int] = ..., model: _Optional[str] = ..., tier: _Optional[str] = ..., confidence: _Optional[float] = ..., confidence_probability: _Optional[float] = ..., threshold: _Optional[float] = ..., escalated: _Optional[bool] = ..., draft_rounds: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("handle", "completion_tokens", "state_tokens", "state_bytes", "model_digest")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    handle: str
    completion_tokens: int
    state_tokens: int
    state_bytes: int
    model_digest: str
    def __init__(self, handle: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., state_tokens: _Optional[int] = ..., state_bytes: _Optional[int] = ..., model_digest: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token", "done", "handoff")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    token: TokenChunk
    done: GenerateSummary
    handoff: Handoff
    def __init__(self, token: _Optional[_Union[TokenChunk, _Mapping]] = ..., done: _Optional[_Union[GenerateSummary, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ...) -> None: ...

class VerifyStep(_message.Message):
    __slots__ = ("start", "draft")
    START_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    start: GenerateRequest
    draft: bytes
    def __init__(self, start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., draft: _Optional[bytes] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("tokens", "pieces", "drafted", "accepted", "step_ms", "done")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenChunk]
    pieces: bytes
    drafted: int
    accepted: int
    step_ms: float
    done: GenerateSummary
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenChunk, _Mapping]]] = ..., pieces: _Optional[bytes] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., step_ms: _Optional[float] = ..., done: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("handle", "take")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    take: bool
    def __init__(self, handle: _Optional[str] = ..., take: _Optional[bool] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("kind", "cut_index", "cut", "node", "encoding", "label", "tensor_encodings", "output_error")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ERROR_FIELD_NUMBER: _ClassVar[int]
    kind: PlanKind
    cut_index: int
    cut: _containers.RepeatedScalarFieldContainer[str]
    node: str
    encoding: Encoding
    label: str
    tensor_encodings: _containers.RepeatedCompositeFieldContainer[TensorEncoding]
    output_error: float
    def __init__(self, kind: _Optional[_Union[PlanKind, str]] = ..., cut_index: _Optional[int] = ..., cut: _Optional[_Iterable[str]] = ..., node: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., label: _Optional[str] = ..., tensor_encodings: _Optional[_Iterable[_Union[TensorEncoding, _Mapping]]] = ..., output_error: _Optional[float] = ...) -> None: ...

class TensorEncoding(_message.Message):
    __slots__ = ("tensor", "encoding")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    encoding: Encoding
    def __init__(self, tensor: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ...) -> None: ...

class StageTimes(_message.Message):
    __slots__ = ("edge_ms", "encode_ms", "network_ms", "cloud_ms", "decode_ms", "total_ms", "plan_ms")
    EDGE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_MS_FIELD_NUMBER: _ClassVar[int]
    edge_ms: float
    encode_ms: float
    network_ms: float
    cloud_ms: float
    decode_ms: float
    total_ms: float
    plan_ms: float
    def __init__(self, edge_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., plan_ms: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "inputs", "objective", "plan", "encoding", "output_region")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    objective: Objective
    plan: str
    encoding: Encoding
    output_region: SharedBytes
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., objective: _Optional[_Union[Objective, str]] = ..., plan: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., output_region: _Optional[_Union[SharedBytes, _Mapping]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("outputs", "plan", "planned", "predicted", "measured", "predicted_energy_j", "fell_back", "fallback_reason", "node", "constraints_met", "reason")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_MET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    plan: Plan
    planned: Plan
    predicted: StageTimes
    measured: StageTimes
    predicted_energy_j: float
    fell_back: bool
    fallback_reason: str
    node: str
    constraints_met: bool
    reason: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., planned: _Optional[_Union[Plan, _Mapping]] = ..., predicted: _Optional[_Union[StageTimes, _Mapping]] = ..., measured: _Optional[_Union[StageTimes, _Mapping]] = ..., predicted_energy_j: _Optional[float] = ..., fell_back: _Optional[bool] = ..., fallback_reason: _Optional[str] = ..., node: _Optional[str] = ..., constraints_met: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class LinkOverride(_message.Message):
    __slots__ = ("uplink_mbps", "downlink_mbps", "rtt_ms")
    UPLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    def __init__(self, uplink_mbps: _Optional[float] = ..., downlink_mbps: _Optional[float] = ..., rtt_ms: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "objective", "link", "encoding", "prompt_tokens", "max_tokens", "input_shapes", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    objective: Objective
    link: LinkOverride
    encoding: Encoding
    prompt_tokens: int
    max_tokens: int
    input_shapes: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    tier: str
    def __init__(self, model: _Optional[str] = ..., objective: _Optional[_Union[Objective, str]] = ..., link: _Optional[_Union[LinkOverride, _Mapping]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., input_shapes: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., tier: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("plan", "predicted", "energy_j", "score", "feasible", "violations", "memory_bytes", "uplink_bytes", "ttft_ms", "draft_tokens")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    predicted: StageTimes
    energy_j: float
    score: float
    feasible: bool
    violations: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: float
    uplink_bytes: float
    ttft_ms: float
    draft_tokens: int
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., predicted: _Optional[_Union[StageTimes, _Mapping]] = ..., energy_j: _Optional[float] = ..., score: _Optional[float] = ..., feasible: _Optional[bool] = ..., violations: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[float] = ..., uplink_bytes: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., draft_tokens: _Optional[int] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("model", "objective", "winner", "feasible", "why", "candidates", "link", "device", "current", "hysteresis_margin", "would_switch", "calibration", "power", "plans_unavailable", "profile", "nodes", "connectivity", "connectivity_reason", "deferred_pending", "deferred_oldest_age_s", "tier", "threshold", "confidence_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    HYSTERESIS_MARGIN_FIELD_NUMBER: _ClassVar[int]
    WOULD_SWITCH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    PLANS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_FIELD_NUMBER: _ClassVar[int]
    CONNECTIVITY_REASON_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_PENDING_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_OLDEST_AGE_S_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    objective: Objective
    winner: Plan
    feasible: bool
    why: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    link: LinkOverride
    device: str
    current: Plan
    hysteresis_margin: float
    would_switch: bool
    calibration: Calibration
    power: PowerFigures
    plans_unavailable: str
    profile: ProfiledShape
    nodes: _containers.RepeatedCompositeFieldContainer[NodeFacts]
    connectivity: str
    connectivity_reason: str
    deferred_pending: int
    deferred_oldest_age_s: float
    tier: str
    threshold: float
    confidence_tokens: int
    def __init__(self, model: _Optional[str] = ..., objective: _Optional[_Union[Objective, str]] = ..., winner: _Optional[_Union[Plan, _Mapping]] = ..., feasible: _Optional[bool] = ..., why: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., link: _Optional[_Union[LinkOverride, _Mapping]] = ..., device: _Optional[str] = ..., current: _Optional[_Union[Plan, _Mapping]] = ..., hysteresis_margin: _Optional[float] = ..., would_switch: _Optional[bool] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., power: _Optional[_Union[PowerFigures, _Mapping]] = ..., plans_unavailable: _Optional[str] = ..., profile: _Optional[_Union[ProfiledShape, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[NodeFacts, _Mapping]]] = ..., connectivity: _Optional[str] = ..., connectivity_reason: _Optional[str] = ..., deferred_pending: _Optional[int] = ..., deferred_oldest_age_s: _Optional[float] = ..., tier: _Optional[str] = ..., threshold: _Optional[float] = ..., confidence_tokens: _Optional[int] = ...) -> None: ...

class NodeFacts(_message.Message):
    __slots__ = ("address", "kind", "planned", "note", "cuts")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    address: str
    kind: str
    planned: bool
    note: str
    cuts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, address: _Optional[str] = ..., kind: _Optional[str] = ..., planned: _Optional[bool] = ..., note: _Optional[str] = ..., cuts: _Optional[_Iterable[int]] = ...) -> None: ...

class PowerFigures(_message.Message):
    __slots__ = ("idle_w", "active_w", "source")
    IDLE_W_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_W_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    idle_w: float
    active_w: float
    source: str
    def __init__(self, idle_w: _Optional[float] = ..., active_w: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("edge_factor", "offload_ms", "samples", "request_ms")
    EDGE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_MS_FIELD_NUMBER: _ClassVar[int]
    edge_factor: float
    offload_ms: float
    samples: int
    request_ms: float
    def __init__(self, edge_factor: _Optional[float] = ..., offload_ms: _Optional[float] = ..., samples: _Optional[int] = ..., request_ms: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models", "skipped")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedFile]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedFile, _Mapping]]] = ...) -> None: ...

class DeferRequest(_message.Message):
    __slots__ = ("infer", "generate", "deliver_by_unix_s", "idempotency_key")
    INFER_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    DELIVER_BY_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    infer: InferRequest
    generate: GenerateRequest
    deliver_by_unix_s: float
    idempotency_key: str
    def __init__(self, infer: _Optional[_Union[InferRequest, _Mapping]] = ..., generate: _Optional[_Union[GenerateRequest, _Mapping]] = ..., deliver_by_unix_s: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Deferral(_message.Message):
    __slots__ = ("id", "created", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    created: bool
    state: str
    def __init__(self, id: _Optional[str] = ..., created: _Optional[bool] = ..., state: _Optional[str] = ...) -> None: ...

class ResultRequest(_message.Message):
    __slots__ = ("id", "wait_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    wait_s: float
    def __init__(self, id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("text", "token_ids", "summary")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    summary: GenerateSummary
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class DeferredResult(_message.Message):
    __slots__ = ("id", "state", "infer", "generate", "error_code", "error", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFER_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    infer: InferReply
    generate: GenerateResult
    error_code: str
    error: str
    attempts: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., infer: _Optional[_Union[InferReply, _Mapping]] = ..., generate: _Optional[_Union[GenerateResult, _Mapping]] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...
