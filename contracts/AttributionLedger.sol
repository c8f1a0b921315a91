// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IAttributionLedger} from "./interfaces/IAttributionLedger.sol";

/// @title AttributionLedger
/// @notice Per-operator streams of epochs. Each epoch commits to the attribution records of the answers served
///         (`recordsRoot`) and to what every account is owed in total so far (`rewardsRoot`, cumulative Merkle
///         design: a later root supersedes the earlier, nothing is lost by claiming late).
///
///         Funding. `fundedTotal[op]` is everything ever pulled from `op`: the maximum `cumulativeTotal` it has
///         submitted. A submit pulls `max(0, cumulativeTotal - fundedTotal[op])` from the operator, so every epoch is
///         fully funded when it lands and nothing is pulled twice.
///
///         Challenge delay and revocation. A rewards root takes effect `challengeDelay` seconds after submission;
///         until then a guardian may revoke it. A revoked epoch keeps its number (epochs stay consecutive), its root
///         never takes effect, and its funds stay in the ledger inside `fundedTotal[op]`: they are prepaid credit
///         that the operator's later epochs draw on before anything new is pulled. The next epoch's
///         `cumulativeTotal` is checked against the latest epoch that was not revoked, so an honest operator can
///         continue from where the revoked one started.
///
///         Claims pay `cumulativeAmount - claimed[op][account]` against the latest root in effect, to the account,
///         whoever calls. Solvency per operator: the total claimed from `op` never exceeds the `cumulativeTotal`
///         of its root in effect, which never exceeds `fundedTotal[op]`; one operator's tree can never spend
///         another operator's funds.
///
///         Gas. What a claim needs about its operator (last epoch, when that epoch's root takes effect, total
///         claimed) sits in one storage slot (`OperatorState`), so the common case (the latest epoch is in
///         effect) reads that slot, the root, the cap and the account's claimed-so-far, and walks nothing. The
///         reentrancy guard uses transient storage (EIP-1153). Cumulative totals are capped at 2**128 - 1.
contract AttributionLedger is IAttributionLedger, AccessControl, ReentrancyGuardTransient, Pausable {
    using SafeERC20 for IERC20;

    /// @notice Role allowed to submit epochs (each holder has its own epoch stream).
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    /// @notice Role allowed to revoke pending rewards roots.
    bytes32 public constant GUARDIAN_ROLE = keccak256("GUARDIAN_ROLE");
    /// @notice Role allowed to pause and unpause epoch submission (claims are never paused).
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");
    /// @notice Basis points in a whole.
    uint16 public constant BPS = 10_000;

    /// @notice The ERC-20 all fees and rewards are paid in.
    IERC20 public immutable rewardToken;
    /// @notice Seconds between an epoch's submission and its rewards root taking effect.
    uint64 public immutable challengeDelay;

    /// @dev Per-operator hot state, one slot. Invariant: `latestEffectiveAt` is `_effectiveAt(submittedAt)` of
    ///      epoch `lastEpoch`, or `type(uint64).max` once that epoch is revoked (it then never takes effect).
    struct OperatorState {
        uint64 lastEpoch; // the last epoch submitted (revoked or not); 0 before the first
        uint64 latestEffectiveAt; // when epoch `lastEpoch`'s root takes effect (0 while there is none)
        uint128 claimedTotal; // everything paid out of this operator's funds (<= its cumulative totals < 2**128)
    }

    /// @dev Working state of one `claim`/`claimMany` call.
    struct ClaimContext {
        address operator;
        uint64 epoch; // the epoch in effect
        bytes32 root; // its rewards root
        uint256 cap; // its cumulative total: the most the operator's claims may ever add up to
        uint256 claimedTotal; // the operator's total claimed so far, updated as accounts are paid
        uint256 paid; // paid in this call
    }

    Shares private _shares;
    mapping(address operator => OperatorState) private _operators;
    mapping(address operator => mapping(uint64 epoch => Epoch)) private _epochs;
    mapping(address operator => uint256) private _fundedTotal;
    mapping(address operator => mapping(address account => uint256)) private _claimed;

    /// @notice Creates the ledger. `admin` receives `DEFAULT_ADMIN_ROLE`, `OPERATOR_ROLE`, `GUARDIAN_ROLE` and
    ///         `PAUSER_ROLE`.
    /// @dev Requirements: `admin` is not zero and `rewardToken_` is a contract (`LedgerInvalidAddress`); the shares
    ///      sum to 10000 (`LedgerInvalidShares`). Events: `RoleGranted` x4, `SharesSet`.
    /// @param admin Role administrator.
    /// @param rewardToken_ The ERC-20 rewards are paid in.
    /// @param challengeDelay_ Seconds a rewards root stays revocable before taking effect (0: at once).
    /// @param dataShareBps Fee share of data contributors.
    /// @param adapterOwnerShareBps Fee share of the adapter owner.
    /// @param operatorShareBps Fee share of the node operator.
    constructor(
        address admin,
        address rewardToken_,
        uint64 challengeDelay_,
        uint16 dataShareBps,
        uint16 adapterOwnerShareBps,
        uint16 operatorShareBps
    ) {
        if (admin == address(0)) revert LedgerInvalidAddress("admin", admin);
        if (rewardToken_.code.length == 0) revert LedgerInvalidAddress("rewardToken", rewardToken_);
        rewardToken = IERC20(rewardToken_);
        challengeDelay = challengeDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, admin);
        _grantRole(GUARDIAN_ROLE, admin);
        _grantRole(PAUSER_ROLE, admin);
        _setShares(dataShareBps, adapterOwnerShareBps, operatorShareBps);
    }

    // ------------------------------------------------------------------ admin

    /// @notice Sets the fee shares used for epochs computed from now on.
    /// @dev Requirements: caller holds `DEFAULT_ADMIN_ROLE`; the shares sum to 10000 (`LedgerInvalidShares`).
    ///      Events: `SharesSet`.
    /// @param dataShareBps Fee share of data contributors.
    /// @param adapterOwnerShareBps Fee share of the adapter owner.
    /// @param operatorShareBps Fee share of the node operator.
    function setShares(uint16 dataShareBps, uint16 adapterOwnerShareBps, uint16 operatorShareBps)
        external
        onlyRole(DEFAULT_ADMIN_ROLE)
    {
        _setShares(dataShareBps, adapterOwnerShareBps, operatorShareBps);
    }

    /// @notice Stops `submitEpoch` (claims keep working).
    /// @dev Requirements: caller holds `PAUSER_ROLE`; not paused (`EnforcedPause`). Events: `Paused`.
    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    /// @notice Lets `submitEpoch` run again.
    /// @dev Requirements: caller holds `PAUSER_ROLE`; paused (`ExpectedPause`). Events: `Unpaused`.
    function unpause() external onlyRole(PAUSER_ROLE) {
        _unpause();
    }

    // ------------------------------------------------------------------ operator

    /// @notice Submits the caller's next epoch and pulls what it adds to the caller's funded total.
    /// @dev pulled = max(0, cumulativeTotal - fundedTotal[caller]), via `transferFrom(caller, this, pulled)`.
    ///      Requirements: caller holds `OPERATOR_ROLE`; not paused (`EnforcedPause`); `epoch == lastEpoch + 1`
    ///      (`LedgerUnexpectedEpoch`); roots non-zero (`LedgerZeroRoot`); `recordCount > 0`
    ///      (`LedgerZeroRecordCount`); `cumulativeTotal` >= that of the latest epoch not revoked
    ///      (`LedgerCumulativeDecreased`) and < 2**128 (`SafeCastOverflowedUintDowncast`); allowance and
    ///      balance cover `pulled` (the token's error).
    ///      Events: `EpochSubmitted`.
    /// @param epoch The epoch number, consecutive from 1 per operator.
    /// @param recordsRoot StandardMerkleTree root over the epoch's attribution records.
    /// @param recordCount Number of records under `recordsRoot`.
    /// @param rewardsRoot StandardMerkleTree root over `(address account, uint256 cumulativeAmount)`.
    /// @param cumulativeTotal Sum of all cumulative amounts under `rewardsRoot`.
    function submitEpoch(
        uint64 epoch,
        bytes32 recordsRoot,
        uint32 recordCount,
        bytes32 rewardsRoot,
        uint256 cumulativeTotal
    ) external onlyRole(OPERATOR_ROLE) whenNotPaused nonReentrant {
        address op = msg.sender;
        OperatorState storage s = _operators[op];
        {
            uint64 last = s.lastEpoch;
            if (epoch != last + 1) revert LedgerUnexpectedEpoch(op, last + 1, epoch);
        }
        if (recordsRoot == bytes32(0)) revert LedgerZeroRoot("recordsRoot");
        if (rewardsRoot == bytes32(0)) revert LedgerZeroRoot("rewardsRoot");
        if (recordCount == 0) revert LedgerZeroRecordCount();
        uint64 live = _latestLive(op);
        {
            uint256 previous = live == 0 ? 0 : _epochs[op][live].cumulativeTotal;
            if (cumulativeTotal < previous) revert LedgerCumulativeDecreased(op, previous, cumulativeTotal);
        }
        SafeCast.toUint128(cumulativeTotal); // keeps every claimed total within OperatorState.claimedTotal

        uint256 funded = _fundedTotal[op];
        uint256 pulled = cumulativeTotal > funded ? cumulativeTotal - funded : 0;
        _epochs[op][epoch] = Epoch({
            recordsRoot: recordsRoot,
            rewardsRoot: rewardsRoot,
            cumulativeTotal: cumulativeTotal,
            recordCount: recordCount,
            submittedAt: uint64(block.timestamp),
            previousLive: live,
            revoked: false
        });
        uint64 takesEffect = _effectiveAt(block.timestamp);
        (s.lastEpoch, s.latestEffectiveAt) = (epoch, takesEffect);
        if (pulled != 0) _fundedTotal[op] = cumulativeTotal; // = funded + pulled
        emit EpochSubmitted(op, epoch, recordsRoot, rewardsRoot, recordCount, cumulativeTotal, pulled, takesEffect);

        if (pulled != 0) rewardToken.safeTransferFrom(op, address(this), pulled);
    }

    // ------------------------------------------------------------------ guardian

    /// @notice Revokes `operator`'s pending `epoch`: its rewards root never takes effect; its funds stay as credit.
    /// @dev Requirements: caller holds `GUARDIAN_ROLE`; the epoch exists (`LedgerUnknownEpoch`), is not revoked
    ///      (`LedgerEpochAlreadyRevoked`) and is still pending (`LedgerRootAlreadyInEffect`).
    ///      Events: `RootRevoked(operator, epoch, caller)`.
    /// @param operator The operator whose epoch is revoked.
    /// @param epoch The epoch number.
    function revokeRoot(address operator, uint64 epoch) external onlyRole(GUARDIAN_ROLE) {
        Epoch storage e = _epoch(operator, epoch);
        if (e.revoked) revert LedgerEpochAlreadyRevoked(operator, epoch);
        uint64 takesEffect = _effectiveAt(e.submittedAt);
        if (block.timestamp >= takesEffect) revert LedgerRootAlreadyInEffect(operator, epoch, takesEffect);
        e.revoked = true;
        if (epoch == _operators[operator].lastEpoch) _operators[operator].latestEffectiveAt = type(uint64).max;
        emit RootRevoked(operator, epoch, msg.sender);
    }

    // ------------------------------------------------------------------ claims

    /// @notice Pays `account` what it is owed by `operator` beyond what it already claimed.
    /// @dev amount = cumulativeAmount - claimed[operator][account], sent to `account` (anyone may call).
    ///      Requirements: `operator` has a root in effect (`LedgerNoRootInEffect`); the leaf
    ///      `keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))))` verifies with `proof`
    ///      against it (`LedgerInvalidProof`); amount > 0 (`LedgerNothingToClaim`); the operator's total claimed
    ///      stays within the root's cumulative total (`LedgerClaimExceedsFunding`). Events: `Claimed`.
    /// @param operator Whose epoch stream pays.
    /// @param account The rewarded account (receives the tokens).
    /// @param cumulativeAmount Its cumulative amount in the root in effect.
    /// @param proof Sibling hashes from the leaf up to the root.
    function claim(address operator, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        nonReentrant
    {
        ClaimContext memory c = _claimContext(operator);
        if (_claimOne(c, account, cumulativeAmount, proof) == 0) {
            revert LedgerNothingToClaim(operator, account, cumulativeAmount, _claimed[operator][account]);
        }
    }

    /// @notice `claim` for many accounts in one transaction; accounts with nothing new to pay are skipped.
    /// @dev Accounts are processed in order, each as `claim` does (verify, raise claimed-so-far, emit, transfer);
    ///      a bad proof or exceeding the funding reverts the whole call. Skipped: cumulativeAmount <= claimed
    ///      (including an account listed twice). Requirements: equal array lengths (`LedgerLengthMismatch`).
    ///      Events: `Claimed` per paid account.
    /// @param operator Whose epoch stream pays.
    /// @param accounts The rewarded accounts.
    /// @param cumulativeAmounts Their cumulative amounts in the root in effect.
    /// @param proofs Their proofs.
    /// @return paid Total tokens sent.
    function claimMany(
        address operator,
        address[] calldata accounts,
        uint256[] calldata cumulativeAmounts,
        bytes32[][] calldata proofs
    ) external nonReentrant returns (uint256 paid) {
        if (cumulativeAmounts.length != accounts.length || proofs.length != accounts.length) {
            revert LedgerLengthMismatch(accounts.length, cumulativeAmounts.length, proofs.length);
        }
        ClaimContext memory c = _claimContext(operator);
        for (uint256 i = 0; i < accounts.length; ++i) {
            _claimOne(c, accounts[i], cumulativeAmounts[i], proofs[i]);
        }
        return c.paid;
    }

    // ------------------------------------------------------------------ views

    /// @notice True when `leaf` is under the records root of `operator`'s `epoch`.
    /// @dev False for an unknown or revoked epoch. `leaf` must be computed by the verifier from the record
    ///      itself (StandardMerkleTree leaf hash, hashed twice), never taken from an untrusted party: a raw
    ///      leaf hash cannot tell a leaf from an internal node.
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @param leaf `keccak256(bytes.concat(keccak256(abi.encode(record...))))`.
    /// @param proof Sibling hashes from the leaf up to the root.
    /// @return valid Whether the proof verifies.
    function verifyRecord(address operator, uint64 epoch, bytes32 leaf, bytes32[] calldata proof)
        external
        view
        returns (bool valid)
    {
        if (epoch == 0 || epoch > _operators[operator].lastEpoch) return false;
        Epoch storage e = _epochs[operator][epoch];
        if (e.revoked) return false;
        return MerkleProof.verifyCalldata(proof, e.recordsRoot, leaf);
    }

    /// @notice The last epoch `operator` submitted (revoked or not); 0 before its first.
    /// @param operator The operator.
    /// @return epoch The epoch number.
    function lastEpoch(address operator) external view returns (uint64 epoch) {
        return _operators[operator].lastEpoch;
    }

    /// @notice Epoch `epoch` of `operator`.
    /// @dev Requirements: it exists (`LedgerUnknownEpoch`).
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @return info Roots, record count, cumulative total, submission time, previous live epoch, revoked flag.
    function getEpoch(address operator, uint64 epoch) external view returns (Epoch memory info) {
        return _epoch(operator, epoch);
    }

    /// @notice When epoch `epoch` of `operator` takes (or took) effect: submittedAt + challengeDelay.
    /// @dev Requirements: it exists (`LedgerUnknownEpoch`).
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @return effectiveAt A block timestamp.
    function effectiveAt(address operator, uint64 epoch) external view returns (uint64) {
        return _effectiveAt(_epoch(operator, epoch).submittedAt);
    }

    /// @notice The rewards root claims of `operator` are checked against now.
    /// @param operator The operator.
    /// @return epoch Its epoch (0 when none is in effect yet).
    /// @return rewardsRoot Its rewards root (zero when none).
    /// @return cumulativeTotal Its cumulative total (0 when none).
    function rootInEffect(address operator)
        external
        view
        returns (uint64 epoch, bytes32 rewardsRoot, uint256 cumulativeTotal)
    {
        epoch = _effectiveEpoch(operator);
        if (epoch != 0) {
            Epoch storage e = _epochs[operator][epoch];
            return (epoch, e.rewardsRoot, e.cumulativeTotal);
        }
    }

    /// @notice Everything ever pulled from `operator` (its highest submitted cumulative total).
    /// @param operator The operator.
    /// @return amount Token units.
    function fundedTotal(address operator) external view returns (uint256 amount) {
        return _fundedTotal[operator];
    }

    /// @notice Everything ever paid out of `operator`'s funds.
    /// @param operator The operator.
    /// @return amount Token units.
    function claimedTotal(address operator) external view returns (uint256 amount) {
        return _operators[operator].claimedTotal;
    }

    /// @notice What `account` has claimed so far from `operator` (its cumulative amount at its last claim).
    /// @param operator The operator.
    /// @param account The account.
    /// @return amount Token units.
    function claimed(address operator, address account) external view returns (uint256 amount) {
        return _claimed[operator][account];
    }

    /// @notice The fee shares in basis points.
    /// @return dataBps Share of data contributors.
    /// @return adapterOwnerBps Share of the adapter owner.
    /// @return operatorBps Share of the node operator.
    function shares() external view returns (uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps) {
        Shares memory s = _shares;
        return (s.dataBps, s.adapterOwnerBps, s.operatorBps);
    }

    // ------------------------------------------------------------------ internals

    /// @dev Sets the shares after checking they sum to `BPS`; emits `SharesSet`.
    function _setShares(uint16 dataBps, uint16 adapterOwnerBps, uint16 operatorBps) private {
        if (uint256(dataBps) + adapterOwnerBps + operatorBps != BPS) {
            revert LedgerInvalidShares(dataBps, adapterOwnerBps, operatorBps);
        }
        _shares = Shares(dataBps, adapterOwnerBps, operatorBps);
        emit SharesSet(dataBps, adapterOwnerBps, operatorBps);
    }

    /// @dev Storage record of an existing epoch; reverts `LedgerUnknownEpoch` otherwise.
    function _epoch(address operator, uint64 epoch) private view returns (Epoch storage) {
        if (epoch == 0 || epoch > _operators[operator].lastEpoch) revert LedgerUnknownEpoch(operator, epoch);
        return _epochs[operator][epoch];
    }

    /// @dev submittedAt + challengeDelay, saturating at the uint64 maximum.
    function _effectiveAt(uint256 submittedAt) private view returns (uint64) {
        uint256 t = submittedAt + challengeDelay;
        return t > type(uint64).max ? type(uint64).max : uint64(t);
    }

    /// @dev Latest epoch of `operator` that is not revoked (0 if none), following `previousLive` links.
    function _latestLive(address operator) private view returns (uint64 epoch) {
        epoch = _operators[operator].lastEpoch;
        while (epoch != 0 && _epochs[operator][epoch].revoked) {
            epoch = _epochs[operator][epoch].previousLive;
        }
    }

    /// @dev Latest epoch of `operator` that is neither revoked nor pending (0 if none), given its state `s`.
    ///      Common case in one comparison: the last epoch is in effect (`latestEffectiveAt` has passed; it is 0
    ///      when there is no epoch, and the maximum once the last epoch is revoked). Otherwise walk down from
    ///      its `previousLive`: epochs take effect in order (constant delay, increasing submission times), so
    ///      the first live one whose delay has passed is the one; `previousLive` skips epochs revoked before
    ///      the link was made.
    function _effectiveEpoch(address operator, OperatorState memory s) private view returns (uint64 epoch) {
        if (block.timestamp >= s.latestEffectiveAt) return s.lastEpoch;
        epoch = _epochs[operator][s.lastEpoch].previousLive;
        while (epoch != 0) {
            Epoch storage e = _epochs[operator][epoch];
            if (!e.revoked && block.timestamp >= _effectiveAt(e.submittedAt)) return epoch;
            epoch = e.previousLive;
        }
    }

    /// @dev `_effectiveEpoch` reading the operator's state from storage.
    function _effectiveEpoch(address operator) private view returns (uint64 epoch) {
        return _effectiveEpoch(operator, _operators[operator]);
    }

    /// @dev The operator's root in effect and claim totals, in memory (spares stack slots in `claimMany`);
    ///      reverts `LedgerNoRootInEffect` when there is none. One read of the operator's state slot.
    function _claimContext(address operator) private view returns (ClaimContext memory c) {
        OperatorState memory s = _operators[operator];
        uint64 epoch = _effectiveEpoch(operator, s);
        if (epoch == 0) revert LedgerNoRootInEffect(operator);
        Epoch storage e = _epochs[operator][epoch];
        c = ClaimContext({
            operator: operator,
            epoch: epoch,
            root: e.rewardsRoot,
            cap: e.cumulativeTotal,
            claimedTotal: s.claimedTotal,
            paid: 0
        });
    }

    /// @dev One claim in the safe order: verify the proof, skip (return 0) when nothing is new, check the
    ///      funding cap, raise claimed-so-far and the operator's claimed total, emit `Claimed`, then transfer.
    function _claimOne(ClaimContext memory c, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        private
        returns (uint256 amount)
    {
        _checkProof(c.operator, c.root, account, cumulativeAmount, proof);
        uint256 already = _claimed[c.operator][account];
        if (cumulativeAmount <= already) return 0;
        amount = cumulativeAmount - already;
        uint256 total = c.claimedTotal + amount;
        if (total > c.cap) revert LedgerClaimExceedsFunding(c.operator, total, c.cap);
        c.claimedTotal = total;
        c.paid += amount;
        _claimed[c.operator][account] = cumulativeAmount;
        _operators[c.operator].claimedTotal = uint128(total); // total <= cap < 2**128 (checked at submit)
        emit Claimed(c.operator, account, c.epoch, amount, cumulativeAmount);

        rewardToken.safeTransfer(account, amount);
    }

    /// @dev Reverts `LedgerInvalidProof` unless the double-hashed leaf of (account, cumulativeAmount) is under `root`.
    function _checkProof(
        address operator,
        bytes32 root,
        address account,
        uint256 cumulativeAmount,
        bytes32[] calldata proof
    ) private pure {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) {
            revert LedgerInvalidProof(operator, account, cumulativeAmount);
        }
    }
}
