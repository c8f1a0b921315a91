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
///         (`recordsRoot`), to what every account is owed in total so far (`rewardsRoot`, cumulative Merkle
///         design: a later root supersedes the earlier, nothing is lost by claiming late) and to the sha256 of the
///         epoch's canonical export (`exportHash`), from which anyone can recompute both roots.
///
///         The live chain. Epochs are numbered 1, 2, ... per operator. Each epoch extends the operator's live
///         chain: its `previousLive` is the live tip it was built on, its `depth` its position. Revoking a pending
///         epoch N cuts the chain below N: N and every later epoch (they were built on N's cumulative amounts)
///         are revoked at once, in O(1), and the next epoch extends the chain from N's `previousLive`. An epoch
///         is live iff the chain position it was given still holds it (`_chain[op][depth] == epoch` and
///         `depth <= liveDepth`).
///
///         Rules the operator cannot break:
///         - an epoch's cumulative total never falls below that of the live epoch it extends;
///         - every epoch is funded when it lands: a submit pulls what its cumulative total adds to what the
///           operator holds here, and counts what arrived (a token that delivers less is refused);
///         - a rewards root pays only after `challengeDelay` seconds, during which a guardian may revoke it
///           (a delay of 0 is refused on any chain but a local dev chain);
///         - claims of an operator never add up to more than the cumulative total of the root they are paid
///           against: one operator's tree can never spend another operator's funds.
///
///         Claims. Claims of an operator are checked against its effective epoch: a pointer that only moves
///         forward, to a live epoch whose delay has passed. Anyone may advance it (`advance`), and a claim that
///         names a later epoch in effect advances it on the way. Claims and submissions cost O(1) in the number
///         of pending or revoked epochs; `claimMany` skips an account whose proof or transfer fails (emitting
///         `ClaimSkipped`) and pays the others.
///
///         Nothing stuck. An operator with no pending epoch takes back the credit revoked epochs left
///         (`refundCredit`); the admin sweeps tokens beyond what every operator still owes (`sweep`).
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

    /// @dev What every claim reads and writes, one slot (with the effective root, all a claim reads of its
    ///      operator). Invariant: claimedTotal <= cap = cumulative total of the effective epoch < 2**112.
    struct ClaimState {
        uint112 claimedTotal; // everything paid out of this operator's funds
        uint112 cap; // cumulative total of the effective epoch
        uint32 effectiveEpoch; // claims are checked against this epoch's rewards root (0: none yet)
    }

    /// @dev Per-operator chain state, one slot.
    struct OperatorState {
        uint64 lastEpoch; // the last epoch submitted (live or not); 0 before the first; < 2**32
        uint64 liveTip; // the latest live epoch (0: none)
        uint64 liveDepth; // its chain position (0: empty chain)
    }

    /// @dev Working state of one `claim`/`claimMany` call.
    struct ClaimContext {
        address operator;
        uint64 epoch; // the effective epoch
        bytes32 root; // its rewards root
        uint256 cap; // its cumulative total
        uint256 claimedTotal; // the operator's total claimed so far, updated as accounts are paid
        uint256 paid; // paid in this call
    }

    Shares private _shares;
    mapping(address operator => OperatorState) private _operators;
    mapping(address operator => ClaimState) private _claimState;
    mapping(address operator => bytes32) private _effectiveRoot;
    mapping(address operator => mapping(uint64 epoch => Epoch)) private _epochs;
    mapping(address operator => mapping(uint64 depth => uint64 epoch)) private _chain;
    mapping(address operator => uint256) private _fundedTotal;
    mapping(address operator => uint256) private _refundedTotal;
    mapping(address operator => mapping(address account => uint256)) private _claimed;
    address[] private _operatorList;

    /// @notice Creates the ledger. `admin` receives `DEFAULT_ADMIN_ROLE`, `OPERATOR_ROLE`, `GUARDIAN_ROLE` and
    ///         `PAUSER_ROLE`.
    /// @dev Requirements: `admin` is not zero and `rewardToken_` is a contract (`LedgerInvalidAddress`); a delay of 0
    ///      only on chain 31337 or 1337 (`LedgerUnsafeChallengeDelay`); the shares sum to 10000
    ///      (`LedgerInvalidShares`). Events: `RoleGranted` x4, `SharesSet`.
    /// @param admin Role administrator.
    /// @param rewardToken_ The ERC-20 rewards are paid in.
    /// @param challengeDelay_ Seconds a rewards root stays revocable before taking effect.
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
        if (challengeDelay_ == 0 && block.chainid != 31337 && block.chainid != 1337) {
            revert LedgerUnsafeChallengeDelay(block.chainid);
        }
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

    /// @notice Sends `to` every token the ledger holds beyond what operators still owe (tokens sent here directly).
    /// @dev owed = sum over operators of (funded - refunded - claimed); O(number of operators).
    ///      Requirements: caller holds `DEFAULT_ADMIN_ROLE`; `to` is not zero (`LedgerInvalidAddress`); there is
    ///      something to sweep (`LedgerNothingToSweep`). Events: `Swept`.
    /// @param to Receiver.
    /// @return amount Token units sent.
    function sweep(address to) external onlyRole(DEFAULT_ADMIN_ROLE) nonReentrant returns (uint256 amount) {
        if (to == address(0)) revert LedgerInvalidAddress("to", to);
        uint256 balance = rewardToken.balanceOf(address(this));
        uint256 owed = owedTotal();
        if (balance <= owed) revert LedgerNothingToSweep();
        amount = balance - owed;
        emit Swept(to, amount);
        rewardToken.safeTransfer(to, amount);
    }

    // ------------------------------------------------------------------ operator

    /// @notice Submits the caller's next epoch and pulls what it adds to what the caller holds here.
    /// @dev pulled = max(0, cumulativeTotal - (funded - refunded)), via `transferFrom(caller, this, pulled)`; the
    ///      ledger's balance must grow by exactly `pulled`.
    ///      Requirements: caller holds `OPERATOR_ROLE`; not paused (`EnforcedPause`); `epoch == lastEpoch + 1`
    ///      (`LedgerUnexpectedEpoch`); `parent` is the live tip (`LedgerStaleParent`); roots and export hash
    ///      non-zero (`LedgerZeroRoot`); `recordCount > 0` (`LedgerZeroRecordCount`); `cumulativeTotal` >= that of
    ///      the live tip (`LedgerCumulativeDecreased`) and < 2**112, `epoch` < 2**32
    ///      (`SafeCastOverflowedUintDowncast`); allowance and balance cover `pulled` (the token's error); the token
    ///      delivers it in full (`LedgerTransferShortfall`). Events: `EpochSubmitted`.
    /// @param epoch The epoch number, consecutive from 1 per operator.
    /// @param recordsRoot StandardMerkleTree root over the epoch's attribution records.
    /// @param recordCount Number of records under `recordsRoot`.
    /// @param rewardsRoot StandardMerkleTree root over `(address account, uint256 cumulativeAmount)`.
    /// @param exportHash sha256 of the epoch's canonical export.
    /// @param cumulativeTotal Sum of all cumulative amounts under `rewardsRoot`.
    /// @param parent The live epoch whose cumulative amounts this one builds on (0: none). A submission built
    ///        before a revocation names a parent that is no longer the live tip and reverts, instead of
    ///        landing with the revoked amounts in it.
    function submitEpoch(
        uint64 epoch,
        bytes32 recordsRoot,
        uint32 recordCount,
        bytes32 rewardsRoot,
        bytes32 exportHash,
        uint256 cumulativeTotal,
        uint64 parent
    ) external onlyRole(OPERATOR_ROLE) whenNotPaused nonReentrant {
        address op = msg.sender;
        OperatorState memory s = _operators[op];
        if (epoch != s.lastEpoch + 1) revert LedgerUnexpectedEpoch(op, s.lastEpoch + 1, epoch);
        if (parent != s.liveTip) revert LedgerStaleParent(op, s.liveTip, parent);
        if (recordsRoot == bytes32(0)) revert LedgerZeroRoot("recordsRoot");
        if (rewardsRoot == bytes32(0)) revert LedgerZeroRoot("rewardsRoot");
        if (exportHash == bytes32(0)) revert LedgerZeroRoot("exportHash");
        if (recordCount == 0) revert LedgerZeroRecordCount();
        {
            uint256 previous = s.liveTip == 0 ? 0 : _epochs[op][s.liveTip].cumulativeTotal;
            if (cumulativeTotal < previous) revert LedgerCumulativeDecreased(op, previous, cumulativeTotal);
        }
        SafeCast.toUint112(cumulativeTotal); // keeps every claimed total and cap within ClaimState
        SafeCast.toUint32(epoch); // the effective epoch is kept in 32 bits

        uint256 held = _fundedTotal[op] - _refundedTotal[op];
        uint256 pulled = cumulativeTotal > held ? cumulativeTotal - held : 0;
        uint64 depth = s.liveDepth + 1;
        _epochs[op][epoch] = Epoch({
            recordsRoot: recordsRoot,
            rewardsRoot: rewardsRoot,
            exportHash: exportHash,
            cumulativeTotal: cumulativeTotal,
            recordCount: recordCount,
            submittedAt: uint64(block.timestamp),
            previousLive: s.liveTip,
            depth: depth,
            revoked: false
        });
        _chain[op][depth] = epoch;
        if (s.lastEpoch == 0) _operatorList.push(op);
        (s.lastEpoch, s.liveTip, s.liveDepth) = (epoch, epoch, depth);
        _operators[op] = s;
        if (pulled != 0) _fundedTotal[op] += pulled;
        uint64 takesEffect = _effectiveAt(block.timestamp);
        emit EpochSubmitted(
            op, epoch, recordsRoot, rewardsRoot, exportHash, recordCount, cumulativeTotal, pulled, takesEffect
        );

        if (pulled != 0) {
            uint256 before = rewardToken.balanceOf(address(this));
            rewardToken.safeTransferFrom(op, address(this), pulled);
            uint256 received = rewardToken.balanceOf(address(this)) - before;
            if (received != pulled) revert LedgerTransferShortfall(pulled, received);
        }
    }

    /// @notice Sends the caller the credit its revoked epochs left: what it holds here beyond its live tip's
    ///         cumulative total.
    /// @dev Requirements: the caller's live tip (if any) is in effect (`LedgerEpochPending`); there is credit
    ///      (`LedgerNothingToRefund`). Events: `CreditRefunded`.
    /// @return amount Token units sent.
    function refundCredit() external nonReentrant returns (uint256 amount) {
        address op = msg.sender;
        uint64 tip = _operators[op].liveTip;
        uint256 owedByTip;
        if (tip != 0) {
            Epoch storage e = _epochs[op][tip];
            uint64 takesEffect = _effectiveAt(e.submittedAt);
            if (block.timestamp < takesEffect) revert LedgerEpochPending(op, tip, takesEffect);
            owedByTip = e.cumulativeTotal;
        }
        uint256 held = _fundedTotal[op] - _refundedTotal[op];
        if (held <= owedByTip) revert LedgerNothingToRefund(op);
        amount = held - owedByTip;
        _refundedTotal[op] += amount;
        emit CreditRefunded(op, amount);
        rewardToken.safeTransfer(op, amount);
    }

    // ------------------------------------------------------------------ guardian

    /// @notice Revokes `operator`'s pending `epoch` and every later epoch (they were built on it): their rewards
    ///         roots never take effect; their funds stay as the operator's credit.
    /// @dev O(1): the live chain is cut below `epoch`. Requirements: caller holds `GUARDIAN_ROLE`; the epoch exists
    ///      (`LedgerUnknownEpoch`), is live (`LedgerEpochRevoked`) and still pending (`LedgerRootAlreadyInEffect`).
    ///      Events: `RootRevoked(operator, epoch, lastEpoch, caller)`.
    /// @param operator The operator whose epochs are revoked.
    /// @param epoch The first epoch revoked.
    function revokeRoot(address operator, uint64 epoch) external onlyRole(GUARDIAN_ROLE) {
        OperatorState memory s = _operators[operator];
        Epoch storage e = _liveEpoch(operator, epoch, s);
        uint64 takesEffect = _effectiveAt(e.submittedAt);
        if (block.timestamp >= takesEffect) revert LedgerRootAlreadyInEffect(operator, epoch, takesEffect);
        e.revoked = true;
        (s.liveTip, s.liveDepth) = (e.previousLive, e.depth - 1);
        _operators[operator] = s;
        emit RootRevoked(operator, epoch, s.lastEpoch, msg.sender);
    }

    // ------------------------------------------------------------------ claims

    /// @notice Moves `operator`'s effective epoch forward to `epoch` (anyone may call).
    /// @dev Requirements: `epoch` is above the effective epoch (`LedgerStaleEpoch`), exists (`LedgerUnknownEpoch`),
    ///      is live (`LedgerEpochRevoked`) and in effect (`LedgerRootNotInEffect`). Events: `EffectiveEpochAdvanced`.
    /// @param operator The operator.
    /// @param epoch The epoch to check claims against from now on.
    function advance(address operator, uint64 epoch) external {
        uint64 current = _claimState[operator].effectiveEpoch;
        if (epoch <= current) revert LedgerStaleEpoch(operator, epoch, current);
        _advance(operator, epoch);
    }

    /// @notice Pays `account` what it is owed by `operator` beyond what it already claimed.
    /// @dev amount = cumulativeAmount - claimed[operator][account], sent to `account` (anyone may call). `epoch` is
    ///      the epoch the proof is against: the effective one, or a later one in effect (which then becomes the
    ///      effective one). Requirements: as `advance` when `epoch` is later; not older than the effective epoch
    ///      (`LedgerStaleEpoch`); a root is in effect (`LedgerNoRootInEffect`); the leaf
    ///      `keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))))` verifies (`LedgerInvalidProof`);
    ///      amount > 0 (`LedgerNothingToClaim`); the operator's total claimed stays within the root's cumulative
    ///      total (`LedgerClaimExceedsFunding`); the token transfers (the token's error). Events: `Claimed`.
    /// @param operator Whose epoch stream pays.
    /// @param epoch The epoch whose rewards root `proof` is against.
    /// @param account The rewarded account (receives the tokens).
    /// @param cumulativeAmount Its cumulative amount in that root.
    /// @param proof Sibling hashes from the leaf up to the root.
    function claim(address operator, uint64 epoch, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        nonReentrant
    {
        ClaimContext memory c = _claimContext(operator, epoch);
        if (_claimOne(c, account, cumulativeAmount, proof, false) == 0) {
            revert LedgerNothingToClaim(operator, account, cumulativeAmount, _claimed[operator][account]);
        }
    }

    /// @notice `claim` for many accounts in one transaction. An account with nothing new is skipped silently; one
    ///         whose proof does not verify or whose transfer fails is skipped with `ClaimSkipped` and nothing
    ///         changes for it; the others are paid.
    /// @dev Requirements: equal array lengths (`LedgerLengthMismatch`); as `claim` for `epoch`; the funding cap
    ///      (`LedgerClaimExceedsFunding`, a broken root) still reverts the whole call.
    ///      Events: `Claimed` per paid account, `ClaimSkipped` per failing one.
    /// @param operator Whose epoch stream pays.
    /// @param epoch The epoch whose rewards root the proofs are against.
    /// @param accounts The rewarded accounts.
    /// @param cumulativeAmounts Their cumulative amounts in that root.
    /// @param proofs Their proofs.
    /// @return paid Total tokens sent.
    function claimMany(
        address operator,
        uint64 epoch,
        address[] calldata accounts,
        uint256[] calldata cumulativeAmounts,
        bytes32[][] calldata proofs
    ) external nonReentrant returns (uint256 paid) {
        if (cumulativeAmounts.length != accounts.length || proofs.length != accounts.length) {
            revert LedgerLengthMismatch(accounts.length, cumulativeAmounts.length, proofs.length);
        }
        ClaimContext memory c = _claimContext(operator, epoch);
        for (uint256 i = 0; i < accounts.length; ++i) {
            _claimOne(c, accounts[i], cumulativeAmounts[i], proofs[i], true);
        }
        return c.paid;
    }

    // ------------------------------------------------------------------ views

    /// @notice The Merkle leaf of `record` in `operator`'s `epoch` on this chain and ledger:
    ///         keccak256(bytes.concat(keccak256(abi.encode(block.chainid, address(this), operator, epoch,
    ///         requestId, adapterIds, weightsBps, promptTokens, completionTokens, fee, outputHash, attributionHash)))).
    /// @dev The chain id, ledger and operator make a leaf of one stream useless under any other.
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @param record The record's fields.
    /// @return leaf The double-hashed leaf.
    function recordLeaf(address operator, uint64 epoch, Record calldata record) public view returns (bytes32 leaf) {
        bytes memory enc = abi.encode(
            block.chainid,
            address(this),
            operator,
            epoch,
            record.requestId,
            record.adapterIds,
            record.weightsBps,
            record.promptTokens,
            record.completionTokens,
            record.fee,
            record.outputHash,
            record.attributionHash
        );
        return keccak256(bytes.concat(keccak256(enc)));
    }

    /// @notice True when `record` is under the records root of `operator`'s live `epoch`.
    /// @dev The ledger hashes the leaf from the record's fields (`recordLeaf`): a root or an inner node cannot pose
    ///      as a record. False for an unknown or revoked epoch.
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @param record The record's fields.
    /// @param proof Sibling hashes from the leaf up to the root.
    /// @return valid Whether the proof verifies.
    function verifyRecord(address operator, uint64 epoch, Record calldata record, bytes32[] calldata proof)
        external
        view
        returns (bool valid)
    {
        if (!_isLive(operator, epoch, _operators[operator])) return false;
        return MerkleProof.verifyCalldata(proof, _epochs[operator][epoch].recordsRoot, recordLeaf(operator, epoch, record));
    }

    /// @notice The last epoch `operator` submitted (live or not); 0 before its first.
    /// @param operator The operator.
    /// @return epoch The epoch number.
    function lastEpoch(address operator) external view returns (uint64 epoch) {
        return _operators[operator].lastEpoch;
    }

    /// @notice The latest live epoch of `operator` (0 when none): the one its next epoch extends.
    /// @param operator The operator.
    /// @return epoch The epoch number.
    function liveTip(address operator) external view returns (uint64 epoch) {
        return _operators[operator].liveTip;
    }

    /// @notice The epoch claims of `operator` are checked against now (0 when none yet).
    /// @param operator The operator.
    /// @return epoch The epoch number.
    function effectiveEpoch(address operator) external view returns (uint64 epoch) {
        return _claimState[operator].effectiveEpoch;
    }

    /// @notice Whether `operator`'s `epoch` exists and is revoked (directly or with an epoch below it).
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @return revoked True when revoked.
    function isRevoked(address operator, uint64 epoch) external view returns (bool revoked) {
        OperatorState memory s = _operators[operator];
        return epoch != 0 && epoch <= s.lastEpoch && !_isLive(operator, epoch, s);
    }

    /// @notice Epoch `epoch` of `operator`; `revoked` says whether it is revoked now, directly or not.
    /// @dev Requirements: it exists (`LedgerUnknownEpoch`).
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @return info Roots, export hash, record count, cumulative total, submission time, chain links, revoked flag.
    function getEpoch(address operator, uint64 epoch) external view returns (Epoch memory info) {
        OperatorState memory s = _operators[operator];
        if (epoch == 0 || epoch > s.lastEpoch) revert LedgerUnknownEpoch(operator, epoch);
        info = _epochs[operator][epoch];
        info.revoked = !_isLive(operator, epoch, s);
    }

    /// @notice When epoch `epoch` of `operator` takes (or took) effect: submittedAt + challengeDelay.
    /// @dev Requirements: it exists (`LedgerUnknownEpoch`).
    /// @param operator The operator.
    /// @param epoch The epoch number.
    /// @return effectiveAt A block timestamp.
    function effectiveAt(address operator, uint64 epoch) external view returns (uint64) {
        if (epoch == 0 || epoch > _operators[operator].lastEpoch) revert LedgerUnknownEpoch(operator, epoch);
        return _effectiveAt(_epochs[operator][epoch].submittedAt);
    }

    /// @notice The latest live epoch of `operator` whose delay has passed: the root a claim should name now
    ///         (it may be later than `effectiveEpoch`, which the claim then advances).
    /// @dev Binary search over the live chain (effective times grow along it): O(log live epochs), a view.
    /// @param operator The operator.
    /// @return epoch Its epoch (0 when none is in effect yet).
    /// @return rewardsRoot Its rewards root (zero when none).
    /// @return cumulativeTotal Its cumulative total (0 when none).
    function rootInEffect(address operator)
        external
        view
        returns (uint64 epoch, bytes32 rewardsRoot, uint256 cumulativeTotal)
    {
        uint64 lo = 0; // chain position known to be in effect (0: none)
        uint64 hi = _operators[operator].liveDepth;
        while (lo < hi) {
            uint64 mid = hi - (hi - lo) / 2; // in (lo, hi]
            if (block.timestamp >= _effectiveAt(_epochs[operator][_chain[operator][mid]].submittedAt)) lo = mid;
            else hi = mid - 1;
        }
        if (lo != 0) {
            epoch = _chain[operator][lo];
            Epoch storage e = _epochs[operator][epoch];
            return (epoch, e.rewardsRoot, e.cumulativeTotal);
        }
    }

    /// @notice Everything ever pulled from `operator` (what arrived).
    /// @param operator The operator.
    /// @return amount Token units.
    function fundedTotal(address operator) external view returns (uint256 amount) {
        return _fundedTotal[operator];
    }

    /// @notice Everything refunded to `operator` from revoked epochs' credit.
    /// @param operator The operator.
    /// @return amount Token units.
    function refundedTotal(address operator) external view returns (uint256 amount) {
        return _refundedTotal[operator];
    }

    /// @notice Everything ever paid out of `operator`'s funds.
    /// @param operator The operator.
    /// @return amount Token units.
    function claimedTotal(address operator) external view returns (uint256 amount) {
        return _claimState[operator].claimedTotal;
    }

    /// @notice What the ledger owes all operators' accounts and credit: sum of (funded - refunded - claimed).
    /// @return amount Token units.
    function owedTotal() public view returns (uint256 amount) {
        uint256 n = _operatorList.length;
        for (uint256 i = 0; i < n; ++i) {
            address op = _operatorList[i];
            amount += _fundedTotal[op] - _refundedTotal[op] - _claimState[op].claimedTotal;
        }
    }

    /// @notice The operators that have submitted at least one epoch, in order of their first epoch.
    /// @return operators Their addresses.
    function operators() external view returns (address[] memory) {
        return _operatorList;
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

    /// @dev submittedAt + challengeDelay, saturating at the uint64 maximum.
    function _effectiveAt(uint256 submittedAt) private view returns (uint64) {
        uint256 t = submittedAt + challengeDelay;
        return t > type(uint64).max ? type(uint64).max : uint64(t);
    }

    /// @dev Whether `epoch` exists and still holds its position on the live chain.
    function _isLive(address operator, uint64 epoch, OperatorState memory s) private view returns (bool) {
        if (epoch == 0 || epoch > s.lastEpoch) return false;
        uint64 depth = _epochs[operator][epoch].depth;
        return depth <= s.liveDepth && _chain[operator][depth] == epoch;
    }

    /// @dev Storage record of a live epoch; reverts `LedgerUnknownEpoch` or `LedgerEpochRevoked` otherwise.
    function _liveEpoch(address operator, uint64 epoch, OperatorState memory s) private view returns (Epoch storage) {
        if (epoch == 0 || epoch > s.lastEpoch) revert LedgerUnknownEpoch(operator, epoch);
        if (!_isLive(operator, epoch, s)) revert LedgerEpochRevoked(operator, epoch);
        return _epochs[operator][epoch];
    }

    /// @dev Makes `epoch` (> the effective epoch) the effective epoch after checking it is live and in effect.
    function _advance(address operator, uint64 epoch) private {
        Epoch storage e = _liveEpoch(operator, epoch, _operators[operator]);
        uint64 takesEffect = _effectiveAt(e.submittedAt);
        if (block.timestamp < takesEffect) revert LedgerRootNotInEffect(operator, epoch, takesEffect);
        ClaimState storage cs = _claimState[operator];
        // epoch < 2**32 and cumulativeTotal < 2**112: both checked at submit
        (cs.effectiveEpoch, cs.cap) = (uint32(epoch), uint112(e.cumulativeTotal));
        _effectiveRoot[operator] = e.rewardsRoot;
        emit EffectiveEpochAdvanced(operator, epoch, msg.sender);
    }

    /// @dev The root claims naming `epoch` are checked against, advancing the effective epoch when `epoch` is later.
    ///      The common case (`epoch` is the effective one) reads two slots: the claim state and the root.
    function _claimContext(address operator, uint64 epoch) private returns (ClaimContext memory c) {
        uint64 current = _claimState[operator].effectiveEpoch;
        if (epoch != current) {
            if (epoch < current) revert LedgerStaleEpoch(operator, epoch, current);
            _advance(operator, epoch);
        } else if (epoch == 0) {
            revert LedgerNoRootInEffect(operator);
        }
        ClaimState memory cs = _claimState[operator];
        c = ClaimContext({
            operator: operator,
            epoch: epoch,
            root: _effectiveRoot[operator],
            cap: cs.cap,
            claimedTotal: cs.claimedTotal,
            paid: 0
        });
    }

    /// @dev One claim in the safe order: verify the proof, skip (return 0) when nothing is new, check the funding
    ///      cap, raise claimed-so-far and the operator's claimed total, transfer, emit `Claimed`. In a batch
    ///      (`skipFailures`) a bad proof or a refused transfer emits `ClaimSkipped` and leaves the account as it was.
    function _claimOne(
        ClaimContext memory c,
        address account,
        uint256 cumulativeAmount,
        bytes32[] calldata proof,
        bool skipFailures
    ) private returns (uint256 amount) {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, c.root, leaf)) {
            if (!skipFailures) revert LedgerInvalidProof(c.operator, account, cumulativeAmount);
            emit ClaimSkipped(c.operator, account, c.epoch, cumulativeAmount, SkipReason.InvalidProof);
            return 0;
        }
        uint256 already = _claimed[c.operator][account];
        if (cumulativeAmount <= already) return 0;
        amount = cumulativeAmount - already;
        uint256 total = c.claimedTotal + amount;
        if (total > c.cap) revert LedgerClaimExceedsFunding(c.operator, total, c.cap);
        _claimed[c.operator][account] = cumulativeAmount;
        _claimState[c.operator].claimedTotal = uint112(total); // total <= cap < 2**112

        if (!skipFailures) {
            rewardToken.safeTransfer(account, amount);
        } else if (!rewardToken.trySafeTransfer(account, amount)) {
            _claimed[c.operator][account] = already;
            _claimState[c.operator].claimedTotal = uint112(c.claimedTotal);
            emit ClaimSkipped(c.operator, account, c.epoch, cumulativeAmount, SkipReason.TransferFailed);
            return 0;
        }
        c.claimedTotal = total;
        c.paid += amount;
        emit Claimed(c.operator, account, c.epoch, amount, cumulativeAmount, msg.sender);
    }
}
