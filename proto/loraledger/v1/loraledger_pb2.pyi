from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("adapter", "weight")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    weight: float
    def __init__(self, adapter: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens", "stop", "stop_token_ids", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "chat", "adapters", "sampling", "request_id", "client_account", "priority", "client_signature", "signature_deadline")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: ChatMessages
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    sampling: SamplingParams
    request_id: str
    client_account: str
    priority: int
    client_signature: str
    signature_deadline: int
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., client_account: _Optional[str] = ..., priority: _Optional[int] = ..., client_signature: _Optional[str] = ..., signature_deadline: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ContributorShare(_message.Message):
    __slots__ = ("account", "weight", "share")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    account: str
    weight: str
    share: float
    def __init__(self, account: _Optional[str] = ..., weight: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class AttributionSummary(_message.Message):
    __slots__ = ("record_hash", "request_id", "adapter_ids", "weights_bps", "datanet_ids", "fee", "attribution_hash", "top_contributors", "epoch")
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BPS_FIELD_NUMBER: _ClassVar[int]
    DATANET_IDS_FIELD_NUMBER: _ClassVar[int]
    FEE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    TOP_CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    record_hash: str
    request_id: str
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    weights_bps: _containers.RepeatedScalarFieldContainer[int]
    datanet_ids: _containers.RepeatedScalarFieldContainer[str]
    fee: str
    attribution_hash: str
    top_contributors: _containers.RepeatedCompositeFieldContainer[ContributorShare]
    epoch: int
    def __init__(self, record_hash: _Optional[str] = ..., request_id: _Optional[str] = ..., adapter_ids: _Optional[_Iterable[str]] = ..., weights_bps: _Optional[_Iterable[int]] = ..., datanet_ids: _Optional[_Iterable[str]] = ..., fee: _Optional[str] = ..., attribution_hash: _Optional[str] = ..., top_contributors: _Optional[_Iterable[_Union[ContributorShare, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage", "attribution", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: Usage
    attribution: AttributionSummary
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., attribution: _Optional[_Union[AttributionSummary, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: GenerateResponse
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("key", "alias", "onchain_id", "weights_hash", "base_model_hash", "rank", "resident", "datanet_ids", "fee_per_token")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ONCHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    DATANET_IDS_FIELD_NUMBER: _ClassVar[int]
    FEE_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    key: str
    alias: str
    onchain_id: str
    weights_hash: str
    base_model_hash: str
    rank: int
    resident: bool
    datanet_ids: _containers.RepeatedScalarFieldContainer[str]
    fee_per_token: str
    def __init__(self, key: _Optional[str] = ..., alias: _Optional[str] = ..., onchain_id: _Optional[str] = ..., weights_hash: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., rank: _Optional[int] = ..., resident: _Optional[bool] = ..., datanet_ids: _Optional[_Iterable[str]] = ..., fee_per_token: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter", "path", "expected_weights_hash")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    path: str
    expected_weights_hash: str
    def __init__(self, adapter: _Optional[str] = ..., path: _Optional[str] = ..., expected_weights_hash: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class MatchedSpan(_message.Message):
    __slots__ = ("contributor", "contribution_hash", "answer_start", "answer_end", "contribution_start")
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    ANSWER_START_FIELD_NUMBER: _ClassVar[int]
    ANSWER_END_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_START_FIELD_NUMBER: _ClassVar[int]
    contributor: str
    contribution_hash: str
    answer_start: int
    answer_end: int
    contribution_start: int
    def __init__(self, contributor: _Optional[str] = ..., contribution_hash: _Optional[str] = ..., answer_start: _Optional[int] = ..., answer_end: _Optional[int] = ..., contribution_start: _Optional[int] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("epoch", "request_id", "adapter_ids", "weights_bps", "prompt_tokens", "completion_tokens", "fee", "output_hash", "attribution_hash", "contributors", "spans")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HASH_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    request_id: str
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    weights_bps: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    completion_tokens: int
    fee: str
    output_hash: str
    attribution_hash: str
    contributors: _containers.RepeatedCompositeFieldContainer[ContributorShare]
    spans: _containers.RepeatedCompositeFieldContainer[MatchedSpan]
    def __init__(self, epoch: _Optional[int] = ..., request_id: _Optional[str] = ..., adapter_ids: _Optional[_Iterable[str]] = ..., weights_bps: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., fee: _Optional[str] = ..., output_hash: _Optional[str] = ..., attribution_hash: _Optional[str] = ..., contributors: _Optional[_Iterable[_Union[ContributorShare, _Mapping]]] = ..., spans: _Optional[_Iterable[_Union[MatchedSpan, _Mapping]]] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("record", "leaf", "settled", "records_root", "proof", "operator")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    LEAF_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_ROOT_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    record: Record
    leaf: str
    settled: bool
    records_root: str
    proof: _containers.RepeatedScalarFieldContainer[str]
    operator: str
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., leaf: _Optional[str] = ..., settled: _Optional[bool] = ..., records_root: _Optional[str] = ..., proof: _Optional[_Iterable[str]] = ..., operator: _Optional[str] = ...) -> None: ...

class GetRewardProofRequest(_message.Message):
    __slots__ = ("account", "epoch")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    account: str
    epoch: int
    def __init__(self, account: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetRewardProofResponse(_message.Message):
    __slots__ = ("operator", "account", "cumulative_amount", "epoch", "rewards_root", "proof", "epoch_in_effect", "in_effect", "effective_at", "claimed", "claimable_now", "latest_epoch", "pending", "pending_effective_at")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REWARDS_ROOT_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    EPOCH_IN_EFFECT_FIELD_NUMBER: _ClassVar[int]
    IN_EFFECT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_AT_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    CLAIMABLE_NOW_FIELD_NUMBER: _ClassVar[int]
    LATEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    PENDING_EFFECTIVE_AT_FIELD_NUMBER: _ClassVar[int]
    operator: str
    account: str
    cumulative_amount: str
    epoch: int
    rewards_root: str
    proof: _containers.RepeatedScalarFieldContainer[str]
    epoch_in_effect: int
    in_effect: bool
    effective_at: int
    claimed: str
    claimable_now: str
    latest_epoch: int
    pending: str
    pending_effective_at: int
    def __init__(self, operator: _Optional[str] = ..., account: _Optional[str] = ..., cumulative_amount: _Optional[str] = ..., epoch: _Optional[int] = ..., rewards_root: _Optional[str] = ..., proof: _Optional[_Iterable[str]] = ..., epoch_in_effect: _Optional[int] = ..., in_effect: _Optional[bool] = ..., effective_at: _Optional[int] = ..., claimed: _Optional[str] = ..., claimable_now: _Optional[str] = ..., latest_epoch: _Optional[int] = ..., pending: _Optional[str] = ..., pending_effective_at: _Optional[int] = ...) -> None: ...

class EpochInfo(_message.Message):
    __slots__ = ("epoch", "records_root", "record_count", "rewards_root", "cumulative_total", "state", "tx_hash")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_ROOT_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    REWARDS_ROOT_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TX_HASH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    records_root: str
    record_count: int
    rewards_root: str
    cumulative_total: str
    state: str
    tx_hash: str
    def __init__(self, epoch: _Optional[int] = ..., records_root: _Optional[str] = ..., record_count: _Optional[int] = ..., rewards_root: _Optional[str] = ..., cumulative_total: _Optional[str] = ..., state: _Optional[str] = ..., tx_hash: _Optional[str] = ...) -> None: ...

class ListEpochsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListEpochsResponse(_message.Message):
    __slots__ = ("operator", "epochs")
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    operator: str
    epochs: _containers.RepeatedCompositeFieldContainer[EpochInfo]
    def __init__(self, operator: _Optional[str] = ..., epochs: _Optional[_Iterable[_Union[EpochInfo, _Mapping]]] = ...) -> None: ...

class GetEpochExportRequest(_message.Message):
    __slots__ = ("epoch", "chunk_bytes")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    chunk_bytes: int
    def __init__(self, epoch: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class EpochExportChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
