"""The settlement loop: the node's background thread that closes and settles epochs while it serves.

    every `interval` s:  Settler.tick()                       (resume; close + settle an epoch when due)
    after each epoch:    claimMany for accounts owed > push_threshold (when push_threshold > 0)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

from loraledger.node.config import NodeConfig
from loraledger.node.errors import ChainError, ConfigError, NodeError
from loraledger.node.ledger.record_log import RecordLog

log = logging.getLogger(__name__)


class SettlementLoop:
    """The node's settlement thread: every `interval` s, `Settler.tick()` (resume unfinished epochs; close and
    settle one when `epoch_seconds` / `epoch_records` say so); after each confirmed epoch, when
    `settlement.push_threshold` > 0, `claimMany` for every account owed more than it. A SettlementError (a
    reverted transaction, log and chain disagreeing) stops the loop with the error logged and kept in `error`;
    the records stay in the log for `loraledger epoch settle`. Connection errors are logged and retried."""

    def __init__(self, records: RecordLog, contracts: Any, cfg: NodeConfig) -> None:
        from loraledger.node.ledger.settler import SettlementOptions, Settler

        s = cfg.settlement
        self.settler = Settler(records, contracts, SettlementOptions(epoch_seconds=s.epoch_seconds,
                                                                     epoch_records=s.epoch_records))
        self.push_threshold = s.push_threshold
        self.interval = min(1.0, s.epoch_seconds / 2)
        self.error: BaseException | None = None
        self.epochs_confirmed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraledger-settlement", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from loraledger.node.ledger.epochs import SettlementError

        while not self._stop.is_set():
            try:
                done = self.settler.tick()
                self.epochs_confirmed += len(done)
                if done and self.push_threshold > 0:
                    self._push(done[-1].epoch)
            except (SettlementError, ConfigError) as e:
                self.error = e
                log.error("settlement loop stopped: %s (records keep being logged; `loraledger epoch settle` "
                          "resumes it)", e)
                return
            except (ChainError, OSError) as e:
                log.warning("settlement: chain unreachable (%s); retrying in %.1f s", e, self.interval)
            except sqlite3.OperationalError as e:
                # SQLite refuses an epoch transition whose read snapshot went stale under a concurrent append
                # ("database is locked"). Every step is resumable from the log; a transaction signed but not
                # stored was never broadcast, so the nonce counter is re-read from the node before the retry.
                log.warning("settlement: record log busy (%s); retrying in %.1f s", e, self.interval)
                self.settler.client.nonces.invalidate()
            except NodeError as e:  # a claim push that failed: settlement itself goes on
                log.error("settlement: %s", e)
            self._stop.wait(self.interval)

    def _push(self, epoch: int) -> None:
        from loraledger.node.ledger.claims import push_claims

        proofs = self.settler.proofs
        values = proofs.trees(epoch).rewards_tree.values
        found = [proofs.reward_proof(str(account), epoch) for account, _ in values]
        res = push_claims(self.settler.contracts.ledger, [p for p in found if p is not None],
                          threshold=self.push_threshold)
        log.info("epoch %d: pushed claims to %d account(s) in %d transaction(s)", epoch, len(res.paid),
                 len(res.tx_hashes))

    def stop(self) -> None:
        """Ask the loop to stop and wait for it (a transaction in flight is driven to its end first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
