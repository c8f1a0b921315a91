"""Deploy the whole contract set from the committed artifacts, and the record of what was deployed.

    deployment = deploy_all(w3, account)                 # RewardToken, registries, ledger; roles granted
    Path("deployment.json").write_text(deployment.to_json())
    deployment = Deployment.from_json(Path("deployment.json").read_text())

Order (each constructor takes the address before it):

    RewardToken(name, symbol, admin)                 (skipped when `token=` names an existing ERC-20)
    ContributorRegistry(admin)
    DatanetRegistry(contributorRegistry)
    AdapterRegistry(datanetRegistry)
    AttributionLedger(admin, token, challengeDelay, dataBps, adapterOwnerBps, operatorBps)
    ledger.grantRole(OPERATOR_ROLE, operator), ledger.grantRole(GUARDIAN_ROLE, guardian)   (when given)
    token.mint(address, amount)                      (each `mint_to` entry; the deployed RewardToken only)

Plain web3, one transaction at a time (each waits for its receipt and checks its status), so this module does not
depend on the chain client. `deployer` is a local signing account (eth-account), or, against a devnet whose
accounts are unlocked, a bare address string.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import is_address, keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import TransactionNotFound

from loraledger.node.chain.artifacts import CORE_CONTRACTS, load_artifact
from loraledger.node.chain.client import ChainClient
from loraledger.node.config import DEV_CHAIN_IDS
from loraledger.node.errors import ChainError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_SHARES: tuple[int, int, int] = (7000, 2000, 1000)
DEFAULT_TOKEN_NAME = "LoraLedger Reward"
DEFAULT_TOKEN_SYMBOL = "LLR"
OPERATOR_ROLE = "0x" + keccak(text="OPERATOR_ROLE").hex()
GUARDIAN_ROLE = "0x" + keccak(text="GUARDIAN_ROLE").hex()
MINTER_ROLE = "0x" + keccak(text="MINTER_ROLE").hex()
_FORMAT_VERSION = 1
SAFE_CHALLENGE_DELAY = 86_400  # one day: the guardian's window to revoke a bad root on a public chain


@dataclass(frozen=True)
class Deployment:
    """What `deploy_all` deployed: enough for any later process to find and trust the contracts.

    `addresses` maps contract name (`RewardToken`, `ContributorRegistry`, `DatanetRegistry`, `AdapterRegistry`,
    `AttributionLedger`) to its checksummed address; `block_number` is the block of the first deployment
    transaction (where event scans start); `artifact_sha256` maps contract name to the sha256 of the artifact file
    whose bytecode was deployed (absent for an external token).
    """

    chain_id: int
    addresses: dict[str, str]
    block_number: int
    artifact_sha256: dict[str, str]
    deployer: str
    challenge_delay: int = 0
    shares: tuple[int, int, int] = DEFAULT_SHARES
    operator: str | None = None
    guardian: str | None = None
    external_token: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def address(self, name: str) -> str:
        """Address of contract `name`; ConfigError naming the known ones when it is not in this deployment."""
        try:
            return self.addresses[name]
        except KeyError:
            raise ConfigError(f"deployment has no contract {name!r} (has {sorted(self.addresses)})") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with camelCase keys (the `deployment.json` format)."""
        return {
            "version": _FORMAT_VERSION,
            "chainId": self.chain_id,
            "blockNumber": self.block_number,
            "deployer": self.deployer,
            "addresses": dict(sorted(self.addresses.items())),
            "artifactSha256": dict(sorted(self.artifact_sha256.items())),
            "challengeDelay": self.challenge_delay,
            "shares": {"dataBps": self.shares[0], "adapterOwnerBps": self.shares[1], "operatorBps": self.shares[2]},
            "operator": self.operator,
            "guardian": self.guardian,
            "externalToken": self.external_token,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        """`to_dict` as indented JSON with a final newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Deployment:
        """Inverse of `to_dict`; ConfigError naming the missing or malformed field."""
        try:
            version = d.get("version", _FORMAT_VERSION)
            if version != _FORMAT_VERSION:
                raise ConfigError(f"deployment format version {version} is not supported (expected {_FORMAT_VERSION})")
            shares = d.get("shares") or {}
            addresses = {str(k): _checksum(str(v), f"addresses.{k}") for k, v in dict(d["addresses"]).items()}
            missing = [n for n in CORE_CONTRACTS if n not in addresses]
            if missing:
                raise ConfigError(f"deployment lacks addresses for {missing}")
            return cls(
                chain_id=int(d["chainId"]),
                addresses=addresses,
                block_number=int(d["blockNumber"]),
                artifact_sha256={str(k): str(v) for k, v in dict(d.get("artifactSha256", {})).items()},
                deployer=_checksum(str(d["deployer"]), "deployer"),
                challenge_delay=int(d.get("challengeDelay", 0)),
                shares=(
                    int(shares.get("dataBps", DEFAULT_SHARES[0])),
                    int(shares.get("adapterOwnerBps", DEFAULT_SHARES[1])),
                    int(shares.get("operatorBps", DEFAULT_SHARES[2])),
                ),
                operator=_checksum(d["operator"], "operator") if d.get("operator") else None,
                guardian=_checksum(d["guardian"], "guardian") if d.get("guardian") else None,
                external_token=bool(d.get("externalToken", False)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"malformed deployment record: {e!r}") from e

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        """Parse `to_json` output; ConfigError when it is not valid JSON or lacks a field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deployment record is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError("deployment record must be a JSON object")
        return cls.from_dict(d)


def _checksum(value: str, what: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise ConfigError(f"{what} is not an address: {value!r}")
    return to_checksum_address(value)


class DeployJournal:
    """What a deploy has done so far, written after every step, so a deploy that fails partway resumes without
    sending again what landed.

    {"version": 1, "chainId", "deployer", "params": {...}, "steps": {step: {"tx", "address"?, "block"?}},
     "pending": {step: tx hash}}

    A step is recorded as pending (its transaction hash) before the transaction is sent and as done once its
    receipt is in; on resume a pending step's receipt is looked up first, so a transaction that landed while the
    process died is adopted, not sent twice. Resuming with other parameters, another chain or another deployer
    is refused.
    """

    def __init__(self, path: Path | None, chain_id: int, deployer: str, params: Mapping[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {"version": 1, "chainId": chain_id, "deployer": deployer,
                                    "params": dict(params), "steps": {}, "pending": {}}
        if path is not None and path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"deploy journal {path} is not valid JSON ({e}); remove it to deploy afresh") from e
            for key in ("chainId", "deployer", "params"):
                if old.get(key) != self.doc[key]:
                    raise ConfigError(
                        f"deploy journal {path} is for {key} {old.get(key)!r}, this deploy has {self.doc[key]!r}: "
                        "re-run with the same arguments to resume it, or remove the journal to deploy afresh")
            self.doc = old

    @property
    def resumed(self) -> bool:
        return bool(self.doc["steps"] or self.doc["pending"])

    def done(self, step: str) -> dict[str, Any] | None:
        out: dict[str, Any] | None = self.doc["steps"].get(step)
        return out

    def mark_pending(self, step: str, tx_hash: str) -> None:
        self.doc["pending"][step] = tx_hash
        self._write()

    def mark_done(self, step: str, entry: dict[str, Any]) -> None:
        self.doc["steps"][step] = entry
        self.doc["pending"].pop(step, None)
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        tmp.replace(self.path)


def _run_step(sender: ChainClient, journal: DeployJournal, step: str, tx: Any) -> Any:
    """Send `tx` for `step` unless the journal says it landed (or its pending transaction did); the receipt."""
    pending = journal.doc["pending"].get(step)
    if pending is not None:
        try:
            receipt = sender.w3.eth.get_transaction_receipt(pending)
        except TransactionNotFound:
            receipt = None
        if receipt is not None and receipt["status"] == 1:
            return receipt
        if receipt is None:
            try:
                sender.w3.eth.get_transaction(pending)
                return sender.wait(pending)  # still in the pool: wait for it rather than send a second one
            except TransactionNotFound:
                pass
    built = sender.build(tx)
    with sender.nonces.lock:
        nonce = sender.nonces.reserve()
        signed = sender.account.sign_transaction({**built, "nonce": nonce})
        tx_hash = "0x" + bytes(signed.hash).hex()
        journal.mark_pending(step, tx_hash)  # before it is sent: a crash after this finds it by hash
        try:
            sender.w3.eth.send_raw_transaction(signed.raw_transaction)
        except BaseException:
            sender.nonces.invalidate()  # the node may or may not hold it: re-read the nonce before the next
            raise
    return sender.wait(tx_hash)


def _deploy(sender: ChainClient, journal: DeployJournal, name: str, args: Sequence[Any]) -> tuple[str, int]:
    """Deploy artifact `name` with constructor `args` (or take it from the journal); (address, block number)."""
    done = journal.done(name)
    if done is not None:
        address = to_checksum_address(done["address"])
        if not sender.w3.eth.get_code(address):
            raise ChainError(f"the deploy journal records {name} at {address}, but no code is there on chain "
                             f"{sender.chain_id}: remove the journal {journal.path} to deploy afresh")
        log.info("%s already deployed at %s (journal)", name, address)
        return address, int(done["block"])
    art = load_artifact(name)
    factory = sender.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    data = factory.constructor(*args).data_in_transaction
    receipt = _run_step(sender, journal, name, {"data": data})
    address = receipt.get("contractAddress")
    if not address:
        raise ChainError(f"deploying {name}: receipt {receipt['transactionHash'].hex()} has no contract address")
    address = to_checksum_address(address)
    journal.mark_done(name, {"address": address, "block": int(receipt["blockNumber"]),
                             "tx": "0x" + bytes(receipt["transactionHash"]).hex()})
    return address, int(receipt["blockNumber"])


def _call(sender: ChainClient, journal: DeployJournal, step: str, address: str, name: str, fn: str,
          args: Sequence[Any]) -> None:
    """Send `name(address).fn(*args)` and wait for it (once: the journal remembers)."""
    if journal.done(step) is not None:
        return
    art = load_artifact(name)
    contract = sender.w3.eth.contract(address=address, abi=art.abi)  # type: ignore[call-overload]
    receipt = _run_step(sender, journal, step, contract.get_function_by_name(fn)(*args))
    journal.mark_done(step, {"tx": "0x" + bytes(receipt["transactionHash"]).hex()})


def _check_mints(mint_to: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for address, amount in mint_to:
        to = _checksum(address, "mint_to address")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount < 2**256:
            raise ConfigError(f"mint_to amount for {to} must be a positive integer of base units, got {amount!r}")
        out.append((to, amount))
    return out


def _check_shares(shares: Sequence[int]) -> tuple[int, int, int]:
    if len(shares) != 3 or any(not isinstance(s, int) or not 0 <= s <= 10_000 for s in shares):
        raise ConfigError(f"shares must be three integers in 0..10000 (data, adapter owner, operator), got {shares!r}")
    if sum(shares) != 10_000:
        raise ConfigError(f"shares must sum to 10000 basis points, got {shares!r} (sum {sum(shares)})")
    return (shares[0], shares[1], shares[2])


def safe_challenge_delay(chain_id: int, requested: int | None) -> int:
    """The challenge delay to deploy with: `requested`, or by default 0 on local dev chains and
    SAFE_CHALLENGE_DELAY elsewhere. ConfigError for 0 on any other chain, saying why."""
    delay = (0 if chain_id in DEV_CHAIN_IDS else SAFE_CHALLENGE_DELAY) if requested is None else int(requested)
    if not 0 <= delay < 2**64:
        raise ConfigError(f"challenge_delay must be 0..2**64-1 seconds, got {delay}")
    if delay == 0 and chain_id not in DEV_CHAIN_IDS:
        raise ConfigError(
            f"a challenge delay of 0 is refused on chain {chain_id}: with no delay a rewards root pays at once, so a "
            "stolen operator key could post a root paying itself every unclaimed balance and claim it in the next "
            "block before the guardian can revoke it. Only local dev chains "
            f"({', '.join(map(str, DEV_CHAIN_IDS))}) allow 0; pass --challenge-delay SECONDS (default "
            f"{SAFE_CHALLENGE_DELAY}, one day)")
    return delay


def deploy_all(
    w3: Web3,
    deployer_account: LocalAccount,
    *,
    challenge_delay: int | None = None,
    shares: Sequence[int] = DEFAULT_SHARES,
    operator: str | None = None,
    guardian: str | None = None,
    token: str | None = None,
    token_name: str = DEFAULT_TOKEN_NAME,
    token_symbol: str = DEFAULT_TOKEN_SYMBOL,
    receipt_timeout: float = 120.0,
    journal: str | Path | None = None,
    on_step: Callable[[str], None] | None = None,
    mint_to: Sequence[tuple[str, int]] = (),
) -> Deployment:
    """Deploy RewardToken (unless `token` is given), the three registries and the ledger; grant roles.

    The deployer becomes admin of everything (and holds OPERATOR/GUARDIAN/PAUSER on the ledger and MINTER on
    the token). `operator` / `guardian`, when given and different from the deployer, additionally receive
    OPERATOR_ROLE / GUARDIAN_ROLE on the ledger. `mint_to`: (address, amount) pairs minted on the deployed
    RewardToken once everything is deployed, each a journal step (`mint:I`) like the deployments, so a re-run
    after a failure during minting mints only what had not landed (refused together with `token`).
    `challenge_delay` None: `safe_challenge_delay` picks it (0 on dev chains, one day elsewhere).
    `journal`: a file recording every step as it lands (`DeployJournal`); a re-run with the same arguments
    resumes after the last step that landed. `on_step(step)` is called after each step.
    Raises ConfigError for bad arguments (before any transaction) and ChainError when a transaction fails.
    """
    chain_id = int(w3.eth.chain_id)
    delay = safe_challenge_delay(chain_id, challenge_delay)
    share_tuple = _check_shares(shares)
    operator_cs = _checksum(operator, "operator") if operator else None
    guardian_cs = _checksum(guardian, "guardian") if guardian else None
    token_cs = _checksum(token, "token") if token else None
    if token_cs is not None and not w3.eth.get_code(token_cs):  # type: ignore[arg-type]
        raise ConfigError(f"token {token_cs} has no code on chain {chain_id}; pass a deployed ERC-20")
    mints = _check_mints(mint_to)
    if mints and token_cs is not None:
        raise ConfigError("mint_to mints on the RewardToken this deploy creates; with an external token, fund the "
                          "operator from that token's own supply")

    sender = ChainClient(w3, deployer_account, receipt_timeout=receipt_timeout)
    admin = str(sender.address)
    params = {"challengeDelay": delay, "shares": list(share_tuple), "operator": operator_cs,
              "guardian": guardian_cs, "token": token_cs, "tokenName": token_name, "tokenSymbol": token_symbol}
    if mints:  # only when given: a journal written without mints still resumes a deploy without them
        params["mintTo"] = [[a, str(n)] for a, n in mints]
    book = DeployJournal(Path(journal) if journal is not None else None, chain_id, admin, params)
    if book.resumed:
        log.info("resuming the deploy recorded in %s", journal)
    addresses: dict[str, str] = {}
    hashes: dict[str, str] = {}
    first_block: int | None = None

    def deploy(name: str, args: Sequence[Any]) -> str:
        nonlocal first_block
        address, block = _deploy(sender, book, name, args)
        addresses[name] = address
        hashes[name] = load_artifact(name).sha256
        first_block = block if first_block is None else min(first_block, block)
        if on_step is not None:
            on_step(name)
        return address

    if token_cs is None:
        token_address = deploy("RewardToken", [token_name, token_symbol, admin])
    else:
        token_address = token_cs
        addresses["RewardToken"] = token_cs
    contributors = deploy("ContributorRegistry", [admin])
    datanets = deploy("DatanetRegistry", [contributors])
    deploy("AdapterRegistry", [datanets])
    ledger = deploy("AttributionLedger", [admin, token_address, delay, *share_tuple])
    if operator_cs is not None and operator_cs != admin:
        _call(sender, book, "grant:operator", ledger, "AttributionLedger", "grantRole",
              [bytes.fromhex(OPERATOR_ROLE[2:]), operator_cs])
    if guardian_cs is not None and guardian_cs != admin:
        _call(sender, book, "grant:guardian", ledger, "AttributionLedger", "grantRole",
              [bytes.fromhex(GUARDIAN_ROLE[2:]), guardian_cs])
    for i, (to, amount) in enumerate(mints):
        step = f"mint:{i}"
        if book.done(step) is not None:
            log.info("%s (%d to %s) already landed (journal)", step, amount, to)
        _call(sender, book, step, token_address, "RewardToken", "mint", [to, amount])
        if on_step is not None:
            on_step(step)

    assert first_block is not None
    return Deployment(
        chain_id=sender.chain_id,
        addresses=addresses,
        block_number=first_block,
        artifact_sha256=hashes,
        deployer=admin,
        challenge_delay=delay,
        shares=share_tuple,
        operator=operator_cs or admin,
        guardian=guardian_cs or admin,
        external_token=token_cs is not None,
    )
