"""Signed client identities: a client proves the account a request's record names by signing the request
(EIP-712 typed data), and the node believes `client_account` only from such a signature (or an API key's account).

Request hash (one definition, the same for both APIs and every client):

    request_hash = "0x" + hex(sha256(utf8(JCS({"input": INPUT, "adapters": ADAPTERS, "max_tokens": MAX_TOKENS}))))

    JCS      RFC 8785 canonical JSON: keys sorted, no whitespace, UTF-8, strings escaped as JSON.stringify does,
             numbers written as JavaScript writes them (1.0 -> 1, 1e-7 -> 1e-7, 0.7 -> 0.7). In JavaScript,
             JSON.stringify({adapters, input, max_tokens}) (keys in this order) yields exactly these bytes.
    INPUT    the prompt string; or the chat messages as [[role, content], ...] in order; or the prompt's token
             ids as [id, ...] (HTTP completions only)
    ADAPTERS [[name, weight], ...] exactly as the client sent them, in order, before any normalisation
             (a lone adapter's weight 0 stays 0); [] for the base model alone
    MAX_TOKENS the integer max_tokens the client sent, 0 when it left it to the node

    API          INPUT                                            ADAPTERS                      MAX_TOKENS
    gRPC         `prompt`, or [[m.role, m.content] for chat]      [[r.adapter, r.weight] ...]   sampling.max_tokens
    HTTP compl.  `prompt` (a 1-element list: its element) / ids   `adapters` as [[adapter,      max_tokens or 0
    HTTP chat    [[role, content text]] (text parts joined,          weight (default 0)]], else  max_completion_tokens
                 null content = "")                                [[model, 1]] when `model`     or max_tokens or 0
                                                                   names an adapter, else []

    e.g. request_hash("Hello", [["7", 0.7], ["law", 0.3]], max_tokens=32)
         = sha256('{"adapters":[["7",0.7],["law",0.3]],"input":"Hello","max_tokens":32}')
         = 0xb91d88b942eff09aba4f6bb3cf59406168a96c587e8a7993eff2f404c63d441a

The hash binds what decides the fee (the adapters and the most tokens the client pays for) and what is answered;
sampling options and the HTTP `n` are not covered (n choices of one signed request share its signature).

Typed data (EIP-712), signed by the client's key; `operator` is the node operator's address:

    domain  EIP712Domain(string name, string version, uint256 chainId) = ("loraledger", "1", CHAIN_ID)
    message Request(bytes32 requestHash, address account, address operator, uint64 deadline)

The operator is a message field, not the domain's `verifyingContract`: it is an account, not a contract that
verifies anything, and a wallet shows it to the signer as "operator", the node the request is for. The domain
stays free to name a contract should one ever check these signatures on chain.

Verification (`SignatureVerifier.verify`), in this order; each refusal is a `SignatureError` whose `reason` is:

    "malformed"  the hash, account or deadline is malformed, or the signature is not 65 bytes r || s || v
                 (v in 27, 28, 0, 1; s in the lower half of the curve order, as every wallet signs)
    "expired"    now > deadline
    "too_far"    deadline > now + max_ttl_s (a signature must not stay usable for long)
    "mismatch"   the recovered signer is not `account`: another key, another request, or a signature made for
                 another chain id or another operator (these change the digest, so they recover another signer)
    "replayed"   the same digest (request hash, account, operator, deadline, chain) was accepted before

Replays are caught by the EIP-712 digest, not by the signature bytes (an ECDSA signature has a second valid
form), kept in memory until their deadline passes; a restarted node (or a second process of the same operator)
does not know what the first accepted, so the window for a replay there is at most `max_ttl_s`.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, keccak, to_checksum_address

from loraledger.inference.errors import InvalidRequestError
from loraledger.node.errors import SignatureError
from loraledger.node.types import Address, Bytes32

if TYPE_CHECKING:
    from loraledger.proto.loraledger.v1 import loraledger_pb2 as pb

DOMAIN_NAME = "loraledger"
DOMAIN_VERSION = "1"
PRIMARY_TYPE = "Request"
TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
    ],
    PRIMARY_TYPE: [
        {"name": "requestHash", "type": "bytes32"},
        {"name": "account", "type": "address"},
        {"name": "operator", "type": "address"},
        {"name": "deadline", "type": "uint64"},
    ],
}
DEFAULT_TTL_S = 120  # how far ahead a client sets its deadline
DEFAULT_MAX_TTL_S = 300  # how far ahead a node accepts one

SignatureFailure = Literal["malformed", "expired", "too_far", "mismatch", "replayed"]

_BYTES32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_MAX_SAFE_INT = 2**53  # JCS numbers are IEEE doubles: integers beyond this would not survive


# ---- the request hash ------------------------------------------------------------------------------------------

RequestInput = str | Sequence[tuple[str, str]] | Sequence[Sequence[str]] | Sequence[int]


def request_hash(input: RequestInput, adapters: Sequence[tuple[str, float]] | Sequence[Sequence[Any]], *,
                 max_tokens: int) -> Bytes32:
    """`0x` + sha256 of the request's canonical JSON (module docstring): the value a client signs.

    InvalidRequestError for a value JSON cannot carry exactly (NaN, an integer beyond 2**53, a bool weight).
    """
    return Bytes32("0x" + hashlib.sha256(canonical_request(input, adapters, max_tokens=max_tokens)).hexdigest())


def canonical_request(input: RequestInput, adapters: Sequence[tuple[str, float]] | Sequence[Sequence[Any]], *,
                      max_tokens: int) -> bytes:
    """The bytes `request_hash` hashes: JCS({"adapters": ..., "input": ..., "max_tokens": ...}) in UTF-8."""
    if isinstance(input, str):
        inp: Any = input
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in input):
        inp = list(input)
    else:
        inp = [_pair(m, "chat message", str) for m in input]
    mix = [_pair(a, "adapter", float) for a in adapters]
    text = _jcs({"input": inp, "adapters": mix, "max_tokens": int(max_tokens)})
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"the request holds text that is not valid Unicode ({e.reason}); send UTF-8 text") from e


def _pair(item: Any, what: str, second: type) -> list[Any]:
    if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2:
        raise InvalidRequestError(f"{what} {item!r} is not a pair; give [name, weight] / [role, content]")
    first, value = item
    ok = isinstance(value, str) if second is str else (isinstance(value, int | float) and not isinstance(value, bool))
    if not isinstance(first, str) or not ok:
        raise InvalidRequestError(f"{what} {item!r} has the wrong types; give [string, {second.__name__}]")
    return [first, value]


def _jcs(value: Any) -> str:
    """RFC 8785 canonical JSON of dicts (str keys), lists, strings, ints and finite floats."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(_jcs_string(k) + ":" + _jcs(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, str):
        return _jcs_string(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{value!r} cannot be part of a request hash (a string or a number is needed)")
    return _js_number(value)


def _jcs_string(s: str) -> str:
    out = ['"']
    for ch in s:
        c = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif c < 0x20:
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}.get(ch, f"\\u{c:04x}"))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _js_number(x: float) -> str:
    """A number as ECMAScript's Number::toString writes it (RFC 8785 section 3.2.2.3)."""
    if isinstance(x, int):
        if abs(x) >= _MAX_SAFE_INT:
            raise InvalidRequestError(f"integer {x} is too large for a request hash (at most 2**53 - 1)")
        return str(x)
    if not math.isfinite(x):
        raise InvalidRequestError(f"{x} is not a finite number; weights must be finite")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")  # shortest digits that round-trip, as ECMAScript picks
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    point = (int(exp) if exp else 0) - len(frac)  # value = int(digits) * 10**point
    stripped = digits.rstrip("0")
    point += len(digits) - len(stripped)
    k = len(stripped)
    n = k + point  # value = 0.<stripped> * 10**n
    if k <= n <= 21:
        return sign + stripped + "0" * (n - k)
    if 0 < n <= 21:
        return sign + stripped[:n] + "." + stripped[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + stripped
    e = n - 1
    head = stripped[0] + ("." + stripped[1:] if k > 1 else "")
    return f"{sign}{head}e{'+' if e >= 0 else '-'}{abs(e)}"


def proto_request_hash(request: pb.GenerateRequest) -> Bytes32:
    """`request_hash` of a gRPC GenerateRequest (the table's gRPC row)."""
    if request.WhichOneof("input") == "chat":
        inp: RequestInput = [(m.role, m.content) for m in request.chat.messages]
    else:
        inp = request.prompt
    return request_hash(inp, [(r.adapter, r.weight) for r in request.adapters],
                        max_tokens=int(request.sampling.max_tokens))


# ---- typed data ------------------------------------------------------------------------------------------------


def typed_data(request_hash: str, account: str, deadline: int, chain_id: int, operator: str) -> dict[str, Any]:
    """The EIP-712 document a client signs (module docstring), as `eth_signTypedData_v4` takes it."""
    return {
        "types": TYPES,
        "primaryType": PRIMARY_TYPE,
        "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": int(chain_id)},
        "message": {"requestHash": request_hash, "account": account, "operator": operator, "deadline": int(deadline)},
    }


def _signable(request_hash: str, account: str, deadline: int, chain_id: int, operator: str) -> SignableMessage:
    return encode_typed_data(full_message=typed_data(request_hash, account, deadline, chain_id, operator))


def _digest(message: SignableMessage) -> bytes:
    """The EIP-712 digest keccak(0x19 || 0x01 || domainSeparator || hashStruct(message))."""
    return keccak(b"\x19" + bytes(message.version) + message.header + message.body)


def sign_request(account: LocalAccount, request_hash: str, deadline: int, chain_id: int, operator: str) -> str:
    """The client's signature ("0x" + 130 hex: r || s || v) over `typed_data(...)` for `account`."""
    signed = account.sign_message(_signable(request_hash, account.address, deadline, chain_id,
                                            to_checksum_address(operator)))
    return "0x" + bytes(signed.signature).hex()


@dataclass(frozen=True)
class SignedFields:
    """What a signed request carries besides itself (gRPC: GenerateRequest fields of these names)."""

    client_account: Address
    client_signature: str
    signature_deadline: int
    request_hash: Bytes32


def sign_hash(account: LocalAccount, request_hash: str, *, chain_id: int, operator: str,
              ttl_s: int = DEFAULT_TTL_S, now: float | None = None) -> SignedFields:
    """Sign `request_hash` for the node (`chain_id`, `operator`) with a deadline `ttl_s` s from `now`."""
    deadline = int(time.time() if now is None else now) + int(ttl_s)
    signature = sign_request(account, request_hash, deadline, chain_id, operator)
    return SignedFields(Address(account.address), signature, deadline, Bytes32(request_hash.lower()))


def sign_fields(account: LocalAccount, input: RequestInput, adapters: Sequence[tuple[str, float]], *,
                max_tokens: int, chain_id: int, operator: str, ttl_s: int = DEFAULT_TTL_S,
                now: float | None = None) -> SignedFields:
    """Hash a request (module docstring's table: the caller gives the values its API sends) and sign it."""
    return sign_hash(account, request_hash(input, adapters, max_tokens=max_tokens), chain_id=chain_id,
                     operator=operator, ttl_s=ttl_s, now=now)


def sign_proto_request(request: pb.GenerateRequest, account: LocalAccount, *, chain_id: int, operator: str,
                       ttl_s: int = DEFAULT_TTL_S, now: float | None = None) -> SignedFields:
    """Sign a gRPC GenerateRequest in place (client_account, client_signature, signature_deadline); sign it
    last: changing a hashed field afterwards makes the node refuse it."""
    fields = sign_hash(account, proto_request_hash(request), chain_id=chain_id, operator=operator, ttl_s=ttl_s,
                       now=now)
    request.client_account = fields.client_account
    request.client_signature = fields.client_signature
    request.signature_deadline = fields.signature_deadline
    return fields


# ---- verification ----------------------------------------------------------------------------------------------


class SignatureVerifier:
    """Checks client signatures for one node (`chain_id`, `operator`) and refuses each digest's second use.

    Thread-safe: the used digests are a set behind a lock, pruned of those whose deadline passed.
    """

    def __init__(self, chain_id: int, operator: str, max_ttl_s: int = DEFAULT_MAX_TTL_S) -> None:
        if not is_address(operator):
            raise ValueError(f"operator {operator!r} is not an address (0x + 40 hex digits)")
        if max_ttl_s <= 0:
            raise ValueError(f"max_ttl_s must be > 0, got {max_ttl_s}")
        self.chain_id = int(chain_id)
        self.operator = Address(to_checksum_address(operator))
        self.max_ttl_s = int(max_ttl_s)
        self._lock = threading.Lock()
        self._used: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # min-heap of (deadline, digest) over _used

    def __len__(self) -> int:
        """Digests held against replay now."""
        with self._lock:
            return len(self._used)

    def verify(self, request_hash: str, account: str, deadline: int, signature: str,
               now: float | None = None) -> Address:
        """The checksummed `account` when `signature` is its signature over this request for this node, within
        its deadline and not seen before (it is then marked used); SignatureError saying what to fix otherwise."""
        t = time.time() if now is None else float(now)
        if not isinstance(request_hash, str) or not _BYTES32_RE.match(request_hash):
            raise SignatureError(f"the request hash {request_hash!r} is not 0x + 64 hex digits", "malformed")
        if not isinstance(account, str) or not is_address(account):
            raise SignatureError(f"client_account {account!r} is not an address (0x + 40 hex digits); set it to "
                                 "the account whose key signed the request", "malformed")
        claimed = Address(to_checksum_address(account))
        vrs = _parse_signature(signature)
        deadline = int(deadline)
        if deadline <= 0:
            raise SignatureError(f"the signature has no deadline; set signature_deadline to a unix time at most "
                                 f"{self.max_ttl_s} s ahead and sign again", "malformed")
        if t > deadline:
            raise SignatureError(f"the signature expired at {deadline} ({t - deadline:.0f} s ago); sign the request "
                                 f"again with a deadline in the future (at most {self.max_ttl_s} s ahead)",
                                 "expired")
        if deadline > t + self.max_ttl_s:
            raise SignatureError(f"signature_deadline {deadline} is {deadline - t:.0f} s ahead; this node accepts "
                                 f"at most {self.max_ttl_s} s: sign again with a nearer deadline", "too_far")
        message = _signable(request_hash.lower(), claimed, deadline, self.chain_id, self.operator)
        try:
            signer = Account.recover_message(message, vrs=vrs)
        except (ValueError, TypeError) as e:
            raise SignatureError(f"client_signature cannot be recovered ({e}); sign the request with EIP-712 "
                                 "(`loraledger generate --key-file`)", "malformed") from e
        if signer != claimed:
            raise SignatureError(
                f"the signature is not client_account {claimed}'s over this request (it recovers {signer}): sign "
                f"request hash {request_hash.lower()} with that account's key for this node: chainId "
                f"{self.chain_id}, operator {self.operator} (a signature for another chain or another node, or "
                "over a request changed since, fails this way)", "mismatch")
        self._mark_used(_digest(message), deadline, t)
        return claimed

    def _mark_used(self, digest: bytes, deadline: int, now: float) -> None:
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._used.discard(heapq.heappop(self._expiry)[1])
            if digest in self._used:
                raise SignatureError("this signed request was already used (same request, account and deadline); "
                                     "sign it again with a new deadline to send it again", "replayed")
            self._used.add(digest)
            heapq.heappush(self._expiry, (deadline, digest))


def _parse_signature(signature: str) -> tuple[int, int, int]:
    """(v, r, s) of a 65-byte r || s || v hex signature, v normalised to 0 / 1; SignatureError if malformed."""
    text = signature[2:] if isinstance(signature, str) and signature.startswith(("0x", "0X")) else signature
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 65:
        raise SignatureError("client_signature is not a signature: expected 0x + 130 hex digits (r || s || v, "
                             "65 bytes); sign the request with EIP-712 (`loraledger generate --key-file`)",
                             "malformed")
    r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1) or not 0 < r < _SECP256K1_N:
        raise SignatureError(f"client_signature has an invalid v ({raw[64]}) or r; sign the request again with a "
                             "standard EIP-712 signer", "malformed")
    if not 0 < s <= _SECP256K1_N // 2:
        raise SignatureError("client_signature has s in the upper half of the curve order (its malleable form); "
                             "sign with a standard signer (eth-account, ethers, a wallet), which gives low s",
                             "malformed")
    return v, r, s
