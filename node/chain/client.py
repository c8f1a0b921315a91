"""The chain client: signs and sends transactions from one local account, waits for receipts, decodes reverts.

    client = ChainClient(w3, account)
    h = client.send(contract.functions.registerDatanet(root, 3, uri))   # estimate, fee, nonce, sign, send
    receipt = client.wait(h, timeout=60)                                 # ContractRevertError / ChainError
    result = client.transact(fn)                                         # send + wait

Fees are EIP-1559: `maxPriorityFeePerGas = tip` (the node's suggestion unless overridden) and
`maxFeePerGas = 2 * baseFee + tip` (room for the base fee to double before the transaction is priced out).

Nonces come from a local `NonceManager`, so many transactions can be in flight at once from many threads:
reserving a nonce, signing and handing the raw transaction to the node happen under one lock (ordered, no gaps);
waiting for receipts happens outside it. A nonce error from the node resyncs from the `pending` count.

Retries are only where they are safe: reads retry on connection errors; a send is retried only with the same
signed bytes (so the same hash and nonce) after a connection error, and only after checking by hash that the
node does not already have it; never with a fresh nonce when the first may have landed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    RequestTimedOut,
    TransactionNotFound,
    Web3RPCError,
)
from web3.types import BlockIdentifier, TxParams, TxReceipt

from loraledger.node.chain.artifacts import ARTIFACTS_DIR
from loraledger.node.chain.reverts import DecodedRevert, ErrorDecoder
from loraledger.node.errors import ChainError, ContractRevertError
from loraledger.node.types import Address, TxHash, Wei

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the RPC endpoint could not be reached or did not answer in time"; requests' errors are
# OSError subclasses.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, ProviderConnectionError, RequestTimedOut)

_NONCE_ERROR_MARKERS = ("nonce too low", "nonce too high", "invalid nonce", "nonce has already been used",
                        "replacement transaction underpriced", "nonce is too low")
_ALREADY_KNOWN_MARKERS = ("already known", "already imported", "known transaction", "already exists")


def default_artifacts_dir() -> Path:
    """`contracts/artifacts` in the repository (the compiled ABIs used to decode custom errors)."""
    return ARTIFACTS_DIR


@dataclass(frozen=True)
class FeePolicy:
    """How to price transactions.

    priority_fee: fixed tip in wei (None: ask the node with `eth_maxPriorityFeePerGas`).
    max_fee: fixed fee cap in wei (None: `base_fee_multiplier * baseFee + tip`).
    base_fee_multiplier: headroom over the current base fee (2 survives ~6 full blocks in a row).
    gas_multiplier / gas_margin: gas limit = estimate * multiplier + margin.
    """

    priority_fee: Wei | None = None
    max_fee: Wei | None = None
    base_fee_multiplier: int = 2
    gas_multiplier: float = 1.2
    gas_margin: int = 10_000


class NonceManager:
    """Hands out consecutive nonces for one account, thread-safe; starts from and resyncs to `pending`.

    Use `with manager.lock:` around reserve -> sign -> send so the node sees nonces in order.
    """

    def __init__(self, w3: Web3, address: Address) -> None:
        self._w3 = w3
        self._address = address
        self.lock = threading.RLock()
        self._next: int | None = None

    def reserve(self) -> int:
        """The next nonce (fetching `eth_getTransactionCount(address, "pending")` the first time)."""
        with self.lock:
            if self._next is None:
                self._next = int(self._w3.eth.get_transaction_count(self._address, "pending"))
            nonce = self._next
            self._next += 1
            return nonce

    def release(self, nonce: int) -> None:
        """Give back `nonce` when its transaction certainly never reached the node (only the latest one)."""
        with self.lock:
            if self._next is not None and self._next == nonce + 1:
                self._next = nonce
            else:
                self._next = None  # a gap: resync on the next reserve

    def resync(self) -> int:
        """Forget the local counter and read the node's `pending` count now; returns it."""
        with self.lock:
            self._next = int(self._w3.eth.get_transaction_count(self._address, "pending"))
            return self._next

    def invalidate(self) -> None:
        """Resync lazily on the next `reserve` (after an outcome we cannot know)."""
        with self.lock:
            self._next = None

    @property
    def next_nonce(self) -> int | None:
        """The nonce the next `reserve` will return, or None when it will ask the node first."""
        return self._next


def _rpc_message(err: BaseException) -> str:
    """The lowercase message of a node-side RPC error (web3 puts the JSON-RPC error dict in args[0])."""
    if isinstance(err, Web3RPCError) and isinstance(err.rpc_response, Mapping):
        error = err.rpc_response.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message", "")).lower()
    first = err.args[0] if err.args else ""
    if isinstance(first, Mapping):
        return str(first.get("message", "")).lower()
    return str(err).lower()


class ChainClient:
    """Sends transactions for one local `account` over `w3`, with fees, nonces, receipts and revert decoding.

    Args:
        w3: a connected Web3 (HTTP provider).
        account: the signing account (eth-account `LocalAccount`, see loraledger.node.chain.keys).
        fees: fee and gas policy.
        decoder: custom-error decoder; default: every ABI in `contracts/artifacts`.
        receipt_timeout: default seconds `wait` waits for a receipt.
        poll_interval: seconds between receipt polls.
        read_retries: attempts for reads on connection errors; sends use the same count for resending.
    """

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        *,
        fees: FeePolicy | None = None,
        decoder: ErrorDecoder | None = None,
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.1,
        read_retries: int = 3,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.address = Address(account.address)
        self.fees = fees or FeePolicy()
        self.decoder = decoder if decoder is not None else ErrorDecoder.from_artifacts(default_artifacts_dir())
        self.receipt_timeout = receipt_timeout
        self.poll_interval = poll_interval
        self.read_retries = max(1, read_retries)
        self.nonces = NonceManager(w3, self.address)
        self._chain_id: int | None = None

    # ----- reads

    def read(self, fn: Callable[[], T], what: str = "read") -> T:
        """Run a read-only RPC call, retrying on connection errors with backoff (0.2 s, 0.4 s, ...)."""
        delay = 0.2
        for attempt in range(1, self.read_retries + 1):
            try:
                return fn()
            except CONNECTION_ERRORS as e:
                if attempt == self.read_retries:
                    raise ChainError(f"{what} failed after {attempt} attempts: cannot reach the RPC ({e})") from e
                log.warning("%s: connection error (%s); retry %d", what, e, attempt)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.read(lambda: self.w3.eth.chain_id, "eth_chainId"))
        return self._chain_id

    def call(self, fn: ContractFunction, block: BlockIdentifier = "latest") -> Any:
        """`fn.call()` from this account at `block`; a revert raises ContractRevertError with the error name."""
        try:
            return self.read(lambda: fn.call({"from": self.address}, block_identifier=block), f"call {fn.fn_name}")
        except ContractLogicError as e:
            raise self._revert_error(f"call {fn.fn_name}", e.data, e) from e

    # ----- fees and building

    def fee_fields(self) -> dict[str, int]:
        """EIP-1559 fields `{maxFeePerGas, maxPriorityFeePerGas}` (or `{gasPrice}` on a chain without baseFee)."""
        block = self.read(lambda: self.w3.eth.get_block("latest"), "get_block")
        base_fee = block.get("baseFeePerGas")
        if base_fee is None:
            return {"gasPrice": int(self.read(lambda: self.w3.eth.gas_price, "eth_gasPrice"))}
        tip = self.fees.priority_fee
        if tip is None:
            tip = Wei(int(self.read(lambda: self.w3.eth.max_priority_fee, "eth_maxPriorityFeePerGas")))
        max_fee = self.fees.max_fee
        if max_fee is None:
            max_fee = Wei(self.fees.base_fee_multiplier * int(base_fee) + int(tip))
        if max_fee < tip:
            raise ChainError(f"max fee {max_fee} wei is below the priority fee {tip} wei; raise --max-fee")
        return {"maxFeePerGas": int(max_fee), "maxPriorityFeePerGas": int(tip)}

    def build(self, call: ContractFunction | TxParams, *, value: int = 0, gas: int | None = None) -> dict[str, Any]:
        """The unsigned transaction without a nonce: to, data, value, chainId, type-2 fees, and gas.

        Gas is `estimate * gas_multiplier + gas_margin` unless given; an estimate that reverts raises
        ContractRevertError (decoded) before any nonce is used.
        """
        if isinstance(call, ContractFunction):
            # Placeholder gas and fees keep web3 from asking the node; only `to` and `data` are kept.
            placeholder: Any = {"from": self.address, "gas": 1, "maxFeePerGas": 1, "maxPriorityFeePerGas": 1,
                                "chainId": self.chain_id, "value": 0}
            filled = call.build_transaction(placeholder)
            tx: dict[str, Any] = {"to": filled["to"], "data": filled["data"]}
            what = call.fn_name
        else:
            tx = {k: v for k, v in dict(call).items() if k not in ("nonce", "from")}
            what = "transaction"
        tx["from"] = self.address
        tx.setdefault("value", value)
        tx["chainId"] = self.chain_id
        if not any(k in tx for k in ("gasPrice", "maxFeePerGas")):
            tx.update(self.fee_fields())
        if gas is not None:
            tx["gas"] = gas
        elif "gas" not in tx:
            try:
                # against the pending block: a call that needs a later block than the last one mined (a
                # commit-reveal's reveal) estimates as it will run
                estimate = self.read(lambda: self.w3.eth.estimate_gas(tx, "pending"),  # type: ignore[arg-type]
                                     f"estimate gas for {what}")
            except ContractLogicError as e:
                raise self._revert_error(what, e.data, e) from e
            tx["gas"] = int(estimate * self.fees.gas_multiplier) + self.fees.gas_margin
        return tx

    # ----- sending

    def send(self, call: ContractFunction | TxParams, *, value: int = 0, gas: int | None = None) -> TxHash:
        """Build, take a nonce, sign and hand to the node; returns the tx hash (does not wait for mining).

        On a nonce error from the node the nonce manager resyncs and the tx is re-signed with the fresh nonce
        (the node rejected the first, so it cannot land). On a connection error the same signed bytes are
        resent after checking by hash that the node does not have them yet.
        """
        tx = self.build(call, value=value, gas=gas)
        for attempt in range(1, 4):
            with self.nonces.lock:
                nonce = self.nonces.reserve()
                try:
                    signed = self.account.sign_transaction({**tx, "nonce": nonce})
                    tx_hash = TxHash("0x" + bytes(signed.hash).hex())
                    self._send_raw(bytes(signed.raw_transaction), tx_hash)
                    log.debug("sent %s nonce %d", tx_hash, nonce)
                    return tx_hash
                except Web3RPCError as e:
                    msg = _rpc_message(e)
                    if any(m in msg for m in _NONCE_ERROR_MARKERS) and attempt < 3:
                        fresh = self.nonces.resync()
                        log.warning("nonce %d rejected (%s); resynced to %d", nonce, msg, fresh)
                        continue
                    self.nonces.release(nonce)
                    raise ChainError(f"node rejected transaction (nonce {nonce}): {msg}") from e
                except ChainError:
                    raise  # outcome unknown: _send_raw already told the nonce manager to resync
                except Exception:
                    self.nonces.release(nonce)  # failed before reaching the node (signing, encoding)
                    raise
        raise ChainError("transaction rejected for its nonce three times; is another process using this key?")

    def _send_raw(self, raw: bytes, tx_hash: TxHash) -> None:
        """`eth_sendRawTransaction`, resending the same bytes on connection errors; 'already known' is success.

        When every attempt fails to reach the node we cannot know whether it took the transaction: the nonce
        manager is told to resync and ChainError names the hash to look up.
        """
        delay = 0.2
        for attempt in range(1, self.read_retries + 1):
            try:
                self.w3.eth.send_raw_transaction(raw)
                return
            except Web3RPCError as e:
                if any(m in _rpc_message(e) for m in _ALREADY_KNOWN_MARKERS):
                    return
                raise
            except CONNECTION_ERRORS as e:
                log.warning("send %s: connection error (%s); checking by hash", tx_hash, e)
                time.sleep(delay)
                delay *= 2
                if self._node_has(tx_hash):
                    return
                if attempt == self.read_retries:
                    self.nonces.invalidate()
                    raise ChainError(
                        f"could not reach the RPC to send {tx_hash} ({e}); it may or may not have landed: "
                        "check that hash before sending again"
                    ) from e

    def _node_has(self, tx_hash: TxHash) -> bool:
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
            return True
        except TransactionNotFound:
            return False
        except CONNECTION_ERRORS:
            return False

    # ----- receipts

    def wait(self, tx_hash: TxHash | str | bytes, timeout: float | None = None) -> TxReceipt:
        """Poll for the receipt until `timeout` s (default `receipt_timeout`).

        status 1 -> the receipt; status 0 -> ContractRevertError (the call replayed at the parent block to
        recover the revert data); no receipt in time -> ChainError naming the hash.
        """
        h = HexBytes(tx_hash)
        limit = self.receipt_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                receipt = self.w3.eth.get_transaction_receipt(h)
                break
            except TransactionNotFound:
                pass
            except CONNECTION_ERRORS as e:
                log.warning("receipt %s: connection error (%s); polling on", h.to_0x_hex(), e)
            if time.monotonic() >= deadline:
                raise ChainError(
                    f"no receipt for {h.to_0x_hex()} within {limit:g}s: still pending (fee too low?) or dropped; "
                    "wait longer or look the hash up on the chain"
                )
            time.sleep(self.poll_interval)
        if receipt["status"] != 1:
            raise self._mined_revert(h, receipt)
        return receipt

    def transact(
        self, call: ContractFunction | TxParams, *, value: int = 0, gas: int | None = None,
        timeout: float | None = None,
    ) -> TxReceipt:
        """`wait(send(call))`."""
        return self.wait(self.send(call, value=value, gas=gas), timeout)

    # ----- reverts

    def decode_revert(self, data: object) -> DecodedRevert:
        return self.decoder.decode(data)

    def _revert_error(self, what: str, data: object, cause: BaseException | None = None) -> ContractRevertError:
        decoded = self.decoder.decode(data)
        if decoded.name is None and not decoded.raw and cause is not None:
            detail = str(cause)
        else:
            detail = decoded.describe()
        return ContractRevertError(f"{what} reverted: {detail}", decoded.name, decoded.args)

    def _mined_revert(self, h: HexBytes, receipt: TxReceipt) -> ContractRevertError:
        """Replay a mined, failed transaction as `eth_call` on its parent block to get the revert data."""
        tx = self.w3.eth.get_transaction(h)
        replay: dict[str, Any] = {"from": tx["from"], "to": tx.get("to"), "data": tx.get("input"),
                                  "value": tx.get("value", 0), "gas": tx["gas"]}
        what = f"transaction {h.to_0x_hex()} (block {receipt['blockNumber']})"
        try:
            self.w3.eth.call(replay, receipt["blockNumber"] - 1)  # type: ignore[arg-type]
        except ContractLogicError as e:
            return self._revert_error(what, e.data, e)
        if receipt["gasUsed"] >= tx["gas"]:
            return ContractRevertError(f"{what} ran out of gas (limit {tx['gas']})", "OutOfGas", ())
        return ContractRevertError(f"{what} reverted (replay did not reproduce the error)")
