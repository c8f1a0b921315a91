"""The operator's funding: what settling costs it, what it holds, and how long that lasts.

    report = funding_report(contracts, log)      # contracts bound to (or reading for) the operator
    report.lines()                               # `loraledger operator status`
    report.warnings                              # low ETH / low tokens, for the log and the metrics

Every epoch costs the operator two things:

    tokens  submitEpoch pulls cumulativeTotal - fundedTotal: the fees of the epoch's records
    ETH     gas for submitEpoch (and an approve when the allowance runs short), about SUBMIT_GAS at maxFeePerGas

    next pull     = fees of records not yet in an epoch + what unfinished epochs still pull
    rate          = mean fees of the last RATE_EPOCHS confirmed epochs (the next pull when there are none)
    epochs left   = token balance / rate;    ETH epochs left = ETH balance / (SUBMIT_GAS * maxFeePerGas)

A warning is raised when either lasts fewer than `low_epochs` epochs, or is short of the next one already.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraledger.node.ledger.epochs import CONFIRMED
from loraledger.node.types import Address, as_address

if TYPE_CHECKING:
    from loraledger.node.ledger.record_log import RecordLog

SUBMIT_GAS = 400_000  # a bound of one submitEpoch plus an approve, as gas; times maxFeePerGas = ETH per epoch
RATE_EPOCHS = 5  # the pull rate is the mean of this many latest confirmed epochs
LOW_EPOCHS = 3  # warn when tokens or ETH last fewer epochs than this


@dataclass(frozen=True)
class FundingReport:
    """The operator's balances against what settling will take (module docstring). Amounts in base units."""

    operator: Address
    eth_balance: int
    token_balance: int
    allowance: int
    funded_total: int
    max_fee_per_gas: int
    next_pull: int | None  # None without the record log
    rate: int | None  # tokens per epoch, None without a log or epochs
    warnings: list[str] = field(default_factory=list)

    @property
    def eth_per_epoch(self) -> int:
        return SUBMIT_GAS * self.max_fee_per_gas

    @property
    def epochs_left(self) -> float | None:
        """Epochs the token balance pays for at `rate` (None when no rate is known; inf at rate 0)."""
        if self.rate is None:
            return None
        return float("inf") if self.rate == 0 else self.token_balance / self.rate

    @property
    def eth_epochs_left(self) -> float:
        return float("inf") if self.eth_per_epoch == 0 else self.eth_balance / self.eth_per_epoch

    @property
    def token_short(self) -> bool:
        return self.next_pull is not None and self.token_balance < self.next_pull

    @property
    def eth_short(self) -> bool:
        return self.eth_balance < self.eth_per_epoch

    def lines(self) -> list[str]:
        def left(x: float | None) -> str:
            return "unknown (no epochs yet)" if x is None else ("unlimited" if x == float("inf") else f"{x:.1f}")

        out = [
            f"operator {self.operator}",
            f"  ETH balance:        {self.eth_balance} wei ({self.eth_balance / 1e18:.6f} ETH)",
            (f"  gas per epoch:      about {SUBMIT_GAS} gas at {self.max_fee_per_gas} wei/gas = "
            f"{self.eth_per_epoch} wei; ETH lasts {left(self.eth_epochs_left)} epochs"),
            f"  reward tokens:      {self.token_balance}",
            f"  ledger allowance:   {self.allowance}",
            f"  funded so far:      {self.funded_total}",
            f"  next epoch pulls:   {'unknown (no record log)' if self.next_pull is None else self.next_pull}",
            (f"  pull per epoch:     {'unknown' if self.rate is None else self.rate} "
            f"(mean of the last {RATE_EPOCHS} epochs)"),
            f"  epochs left:        {left(self.epochs_left)}",
        ]
        out += [f"  WARNING: {w}" for w in self.warnings]
        return out


def next_pull(log_: RecordLog, funded_total: int) -> int:
    """Tokens the next submissions pull: unfinished epochs beyond what is funded, plus the pending records' fees."""
    unfinished = [r for r in log_.unfinished() if r.cumulative_total is not None]
    top = max((int(r.cumulative_total or 0) for r in unfinished), default=None)
    built = max(0, top - funded_total) if top is not None else 0
    open_fees = sum(int(r.fees_total) for r in log_.unfinished() if r.cumulative_total is None)
    return built + open_fees + int(log_.pending_fees())


def pull_rate(log_: RecordLog) -> int | None:
    """Mean fees of the latest RATE_EPOCHS confirmed epochs; None when none is confirmed."""
    rows = [r for r in log_.epochs() if r.state == CONFIRMED][-RATE_EPOCHS:]
    if not rows:
        return None
    return sum(int(r.fees_total) for r in rows) // len(rows)


def funding_report(contracts: Any, log_: RecordLog | None = None, operator: str | None = None,
                   low_epochs: int = LOW_EPOCHS) -> FundingReport:
    """Read the operator's ETH, tokens, allowance and funded total, and weigh them against the log's rate.

    `contracts`: bindings whose client reads the chain; `operator` defaults to the client's own account."""
    client = contracts.ledger.client
    op = as_address(str(operator or client.address))
    eth = int(client.read(lambda: client.w3.eth.get_balance(op), "eth_getBalance"))
    fees = client.fee_fields()
    max_fee = int(fees.get("maxFeePerGas", fees.get("gasPrice", 0)))
    tokens = int(contracts.token.balance_of(op))
    allowance = int(contracts.token.allowance(op, contracts.ledger.address))
    funded = int(contracts.ledger.funded_total(op))
    pull = next_pull(log_, funded) if log_ is not None else None
    rate = pull_rate(log_) if log_ is not None else None
    if rate is None and pull:
        rate = pull
    report = FundingReport(op, eth, tokens, allowance, funded, max_fee, pull, rate)
    warnings: list[str] = []
    if report.eth_short:
        warnings.append(f"operator {op} holds {eth} wei of ETH, less than one epoch's gas (about "
                        f"{report.eth_per_epoch} wei): settlement cannot submit; send ETH to {op}")
    elif report.eth_epochs_left < low_epochs:
        warnings.append(f"operator {op}'s ETH lasts about {report.eth_epochs_left:.1f} epochs at current fees; "
                        f"send ETH to {op}")
    if report.token_short:
        warnings.append(f"operator {op} holds {tokens} reward tokens but the next epoch pulls {pull}: settlement "
                        f"waits until it holds enough; transfer or mint tokens to {op}")
    elif report.epochs_left is not None and report.epochs_left < low_epochs:
        warnings.append(f"operator {op}'s reward tokens last about {report.epochs_left:.1f} epochs at "
                        f"{rate} per epoch; transfer or mint tokens to {op}")
    return FundingReport(op, eth, tokens, allowance, funded, max_fee, pull, rate, warnings)
