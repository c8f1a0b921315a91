// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IAttributionLedger
/// @notice Types, events and errors of the attribution ledger.
interface IAttributionLedger {
    /// @notice One submitted epoch of one operator.
    struct Epoch {
        bytes32 recordsRoot; // StandardMerkleTree root over the epoch's attribution records
        bytes32 rewardsRoot; // StandardMerkleTree root over (address account, uint256 cumulativeAmount)
        uint256 cumulativeTotal; // everything this operator owes, summed over all epochs up to this one
        uint32 recordCount; // leaves under recordsRoot
        uint64 submittedAt; // block timestamp; the rewards root takes effect at submittedAt + challengeDelay
        uint64 previousLive; // latest epoch below this one that was not revoked when this one was submitted
        bool revoked; // a guardian revoked it while pending: its rewards root never takes effect
    }

    /// @notice How a fee splits, in basis points (sum 10000).
    struct Shares {
        uint16 dataBps; // to the data contributors
        uint16 adapterOwnerBps; // to the adapter owner
        uint16 operatorBps; // to the node operator
    }

    /// @notice `operator` submitted `epoch`; `pulled` tokens were transferred in; the rewards root takes effect at
    ///         `effectiveAt`.
    event EpochSubmitted(
        address indexed operator,
        uint64 indexed epoch,
        bytes32 recordsRoot,
        bytes32 rewardsRoot,
        uint32 recordCount,
        uint256 cumulativeTotal,
        uint256 pulled,
        uint64 effectiveAt
    );
    /// @notice `guardian` revoked the pending `epoch` of `operator`.
    event RootRevoked(address indexed operator, uint64 indexed epoch, address indexed guardian);
    /// @notice `amount` was paid to `account` out of `operator`'s funds against `epoch`'s rewards root, raising its
    ///         claimed-so-far to `cumulativeAmount`.
    event Claimed(
        address indexed operator, address indexed account, uint64 indexed epoch, uint256 amount, uint256 cumulativeAmount
    );
    /// @notice The admin set new fee shares.
    event SharesSet(uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps);

    /// @notice A required address argument `what` was the zero address (or, for the token, not a contract).
    error LedgerInvalidAddress(string what, address given);
    /// @notice The shares do not sum to 10000.
    error LedgerInvalidShares(uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps);
    /// @notice `operator` submitted epoch `given` but its next epoch is `expected`.
    error LedgerUnexpectedEpoch(address operator, uint64 expected, uint64 given);
    /// @notice A submitted root (`which`: "recordsRoot" or "rewardsRoot") was zero.
    error LedgerZeroRoot(string which);
    /// @notice An epoch was submitted with no records.
    error LedgerZeroRecordCount();
    /// @notice `operator`'s cumulative total would fall from `previous` to `given`.
    error LedgerCumulativeDecreased(address operator, uint256 previous, uint256 given);
    /// @notice `operator` has no epoch `epoch`.
    error LedgerUnknownEpoch(address operator, uint64 epoch);
    /// @notice Epoch `epoch` of `operator` is already revoked.
    error LedgerEpochAlreadyRevoked(address operator, uint64 epoch);
    /// @notice Epoch `epoch` of `operator` took effect at `effectiveAt` and can no longer be revoked.
    error LedgerRootAlreadyInEffect(address operator, uint64 epoch, uint64 effectiveAt);
    /// @notice `operator` has no rewards root in effect yet.
    error LedgerNoRootInEffect(address operator);
    /// @notice The proof of `(account, cumulativeAmount)` does not verify against `operator`'s root in effect.
    error LedgerInvalidProof(address operator, address account, uint256 cumulativeAmount);
    /// @notice `account` already claimed `alreadyClaimed` >= `cumulativeAmount` from `operator`.
    error LedgerNothingToClaim(address operator, address account, uint256 cumulativeAmount, uint256 alreadyClaimed);
    /// @notice Paying would raise `operator`'s total claimed to `requested`, above the `available` cumulative total of
    ///         its root in effect (the rewards tree sums to more than was funded).
    error LedgerClaimExceedsFunding(address operator, uint256 requested, uint256 available);
    /// @notice `claimMany` got arrays of different lengths.
    error LedgerLengthMismatch(uint256 accounts, uint256 amounts, uint256 proofs);
}
