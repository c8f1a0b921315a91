// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IAttributionLedger
/// @notice Types, events and errors of the attribution ledger.
interface IAttributionLedger {
    /// @notice One submitted epoch of one operator.
    struct Epoch {
        bytes32 recordsRoot; // StandardMerkleTree root over the epoch's attribution records (domain-separated leaves)
        bytes32 rewardsRoot; // StandardMerkleTree root over (address account, uint256 cumulativeAmount)
        bytes32 exportHash; // sha256 of the epoch's canonical export file (what auditors recompute the roots from)
        uint256 cumulativeTotal; // everything this operator owes, summed over all live epochs up to this one
        uint32 recordCount; // leaves under recordsRoot
        uint64 submittedAt; // block timestamp; the rewards root takes effect at submittedAt + challengeDelay
        uint64 previousLive; // the operator's latest live epoch when this one was submitted (0: none)
        uint64 depth; // position on the operator's live chain (1 for the first live epoch)
        bool revoked; // revoked, directly or because an epoch below it was: its rewards root never takes effect
    }

    /// @notice One attribution record, as `verifyRecord` takes it (the epoch and the domain are added by the ledger).
    struct Record {
        bytes32 requestId;
        uint256[] adapterIds;
        uint16[] weightsBps;
        uint32 promptTokens;
        uint32 completionTokens;
        uint256 fee;
        bytes32 outputHash;
        bytes32 attributionHash;
    }

    /// @notice How a fee splits, in basis points (sum 10000).
    struct Shares {
        uint16 dataBps; // to the data contributors
        uint16 adapterOwnerBps; // to the adapter owner
        uint16 operatorBps; // to the node operator
    }

    /// @notice Why `claimMany` skipped an account.
    enum SkipReason {
        None,
        InvalidProof, // the proof does not verify against the epoch's rewards root
        TransferFailed // the token refused the transfer (zero address, blocklist, reverting hook, ...)
    }

    /// @notice `operator` submitted `epoch`; `pulled` tokens arrived; the rewards root takes effect at `effectiveAt`.
    event EpochSubmitted(
        address indexed operator,
        uint64 indexed epoch,
        bytes32 recordsRoot,
        bytes32 rewardsRoot,
        bytes32 exportHash,
        uint32 recordCount,
        uint256 cumulativeTotal,
        uint256 pulled,
        uint64 effectiveAt
    );
    /// @notice `guardian` revoked the pending epochs `epoch` to `lastRevoked` (inclusive) of `operator`.
    event RootRevoked(address indexed operator, uint64 indexed epoch, uint64 lastRevoked, address indexed guardian);
    /// @notice Claims of `operator` are now checked against `epoch`'s rewards root (advanced by `caller`).
    event EffectiveEpochAdvanced(address indexed operator, uint64 indexed epoch, address caller);
    /// @notice `amount` was paid to `account` out of `operator`'s funds against `epoch`'s rewards root, raising its
    ///         claimed-so-far to `cumulativeAmount`; `caller` sent the transaction.
    event Claimed(
        address indexed operator,
        address indexed account,
        uint64 indexed epoch,
        uint256 amount,
        uint256 cumulativeAmount,
        address caller
    );
    /// @notice `claimMany` skipped `account` (nothing changed for it) for `reason`.
    event ClaimSkipped(
        address indexed operator, address indexed account, uint64 indexed epoch, uint256 cumulativeAmount, SkipReason reason
    );
    /// @notice `operator` took back `amount` of credit left by revoked epochs.
    event CreditRefunded(address indexed operator, uint256 amount);
    /// @notice The admin swept `amount` tokens no operator owes to `to`.
    event Swept(address indexed to, uint256 amount);
    /// @notice The admin set new fee shares.
    event SharesSet(uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps);

    /// @notice A required address argument `what` was the zero address (or, for the token, not a contract).
    error LedgerInvalidAddress(string what, address given);
    /// @notice A challenge delay of 0 was asked on chain `chainId`: only local dev chains (31337, 1337) allow it.
    error LedgerUnsafeChallengeDelay(uint256 chainId);
    /// @notice The shares do not sum to 10000.
    error LedgerInvalidShares(uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps);
    /// @notice `operator` submitted epoch `given` but its next epoch is `expected`.
    error LedgerUnexpectedEpoch(address operator, uint64 expected, uint64 given);
    /// @notice `operator`'s epoch names `given` as the live epoch it builds on, but the live tip is `liveTip` (an
    ///         epoch was revoked since it was built: rebuild it on the live tip).
    error LedgerStaleParent(address operator, uint64 liveTip, uint64 given);
    /// @notice A submitted hash (`which`: "recordsRoot", "rewardsRoot" or "exportHash") was zero.
    error LedgerZeroRoot(string which);
    /// @notice An epoch was submitted with no records.
    error LedgerZeroRecordCount();
    /// @notice `operator`'s cumulative total would fall from `previous` (its latest live epoch) to `given`.
    error LedgerCumulativeDecreased(address operator, uint256 previous, uint256 given);
    /// @notice The token delivered `received` of the `expected` units pulled (fee-on-transfer or rebasing token).
    error LedgerTransferShortfall(uint256 expected, uint256 received);
    /// @notice `operator` has no rewards root in effect yet.
    error LedgerNoRootInEffect(address operator);
    /// @notice `operator` has no epoch `epoch`.
    error LedgerUnknownEpoch(address operator, uint64 epoch);
    /// @notice Epoch `epoch` of `operator` is revoked (directly or with an epoch below it).
    error LedgerEpochRevoked(address operator, uint64 epoch);
    /// @notice Epoch `epoch` of `operator` took effect at `effectiveAt` and can no longer be revoked.
    error LedgerRootAlreadyInEffect(address operator, uint64 epoch, uint64 effectiveAt);
    /// @notice Epoch `epoch` of `operator` takes effect only at `effectiveAt`.
    error LedgerRootNotInEffect(address operator, uint64 epoch, uint64 effectiveAt);
    /// @notice Claims of `operator` are checked against epoch `current`; the proof names the older `given`.
    error LedgerStaleEpoch(address operator, uint64 given, uint64 current);
    /// @notice `operator` still has live epochs in their challenge delay (the latest, `epoch`, takes effect at
    ///         `effectiveAt`): credit can be refunded only once none is pending.
    error LedgerEpochPending(address operator, uint64 epoch, uint64 effectiveAt);
    /// @notice `operator` has no credit beyond what its live epochs owe.
    error LedgerNothingToRefund(address operator);
    /// @notice The ledger holds no tokens beyond what operators owe.
    error LedgerNothingToSweep();
    /// @notice The proof of `(account, cumulativeAmount)` does not verify against `operator`'s `epoch`.
    error LedgerInvalidProof(address operator, address account, uint256 cumulativeAmount);
    /// @notice `account` already claimed `alreadyClaimed` >= `cumulativeAmount` from `operator`.
    error LedgerNothingToClaim(address operator, address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    /// @notice Paying would raise `operator`'s total claimed to `requested`, above the `available` cumulative total of
    ///         its root in effect (the rewards tree sums to more than was funded).
    error LedgerClaimExceedsFunding(address operator, uint256 requested, uint256 available);
    /// @notice `claimMany` got arrays of different lengths.
    error LedgerLengthMismatch(uint256 accounts, uint256 amounts, uint256 proofs);
}
