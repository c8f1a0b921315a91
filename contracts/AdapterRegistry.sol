// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IAdapterRegistry} from "./interfaces/IAdapterRegistry.sol";
import {IDatanetRegistry} from "./interfaces/IDatanetRegistry.sol";

/// @title AdapterRegistry
/// @notice Content-addressed LoRA adapters with their lineage: the weights hash (unique), the base model and
///         training config they came from, and the datanets they were trained on. Ids count from 1. The engine
///         refuses to serve weights whose hash is not the registered one.
///
///         Access: every adapter is public (anyone may use it) until its owner makes it private; a private adapter
///         may be used by the accounts on its allowlist only. The allowlist is kept while the adapter is public and
///         applies again when it turns private. The allowlist is not enumerable on chain: it is the replay of the
///         `AdapterAllowlistChanged` events of the id (`node/chain/access.py`).
///
///         Registration is commit-reveal, bound to the sender, so it cannot be front-run: the owner first commits
///         `adapterCommitment(owner, weightsHash, trainingConfigHash, salt)`, then, in a later block and within
///         `COMMIT_TTL`, registers with the salt. A registration copied from the mempool and sent from another
///         account finds no commitment under that account and reverts; copying the commitment too does not help,
///         since the commitment binds the sender. Committing needs the weights hash and the secret salt, which
///         the mempool shows only in the reveal, after the owner's own commitment is already on chain.
contract AdapterRegistry is IAdapterRegistry {
    /// @notice The datanet registry adapters' datanet ids refer to.
    IDatanetRegistry public immutable datanetRegistry;

    mapping(uint256 id => Adapter) private _adapters;
    mapping(bytes32 weightsHash => uint256 id) private _idByWeightsHash;
    uint256 private _adapterCount;
    mapping(uint256 id => bool) private _private;
    mapping(uint256 id => mapping(address account => bool)) private _allowed;
    mapping(bytes32 commitment => uint256 committedAt) private _commits; // block.number << 64 | block.timestamp

    /// @notice Seconds a commitment stays usable.
    uint64 public constant COMMIT_TTL = 1 days;

    /// @notice Creates the registry bound to `datanetRegistry_`.
    /// @dev Requirements: `datanetRegistry_` is a contract (`AdapterInvalidDatanetRegistry`).
    /// @param datanetRegistry_ The deployed `DatanetRegistry`.
    constructor(address datanetRegistry_) {
        if (datanetRegistry_.code.length == 0) revert AdapterInvalidDatanetRegistry(datanetRegistry_);
        datanetRegistry = IDatanetRegistry(datanetRegistry_);
    }

    /// @notice Commits the caller to registering an adapter (step 1 of 2); see the contract's notes.
    /// @dev Requirements: `commitment` is not zero (`AdapterZeroHash`) and not already pending
    ///      (`AdapterAlreadyCommitted`). Events: `AdapterCommitted(commitment, caller)`.
    /// @param commitment `adapterCommitment(caller, weightsHash, trainingConfigHash, salt)`.
    function commitAdapter(bytes32 commitment) external {
        if (commitment == bytes32(0)) revert AdapterZeroHash("commitment");
        uint256 at = _commits[commitment];
        if (at != 0 && block.timestamp < uint64(at) + COMMIT_TTL) revert AdapterAlreadyCommitted(commitment);
        _commits[commitment] = (block.number << 64) | block.timestamp;
        emit AdapterCommitted(commitment, msg.sender);
    }

    /// @notice The commitment `owner` makes before registering the adapter with these hashes.
    /// @param owner The registering account.
    /// @param weightsHash sha256 over the adapter's canonical tensors.
    /// @param trainingConfigHash sha256 of the canonical training-config JSON.
    /// @param salt A secret random value, revealed at registration.
    /// @return commitment keccak256(abi.encode(owner, weightsHash, trainingConfigHash, salt)).
    function adapterCommitment(address owner, bytes32 weightsHash, bytes32 trainingConfigHash, bytes32 salt)
        public
        pure
        returns (bytes32 commitment)
    {
        return keccak256(abi.encode(owner, weightsHash, trainingConfigHash, salt));
    }

    /// @notice Registers an adapter owned by the caller (step 2 of 2, revealing the commitment's salt).
    /// @dev Requirements: the caller's commitment to these hashes and `salt` exists, was made in an earlier block
    ///      and within `COMMIT_TTL` (`AdapterNotCommitted`, `AdapterCommitTooNew`); no hash is zero
    ///      (`AdapterZeroHash(field)`); `datanetIds` is not empty (`AdapterNoDatanets`), has no repeats
    ///      (`AdapterDuplicateDatanet`) and names existing datanets only (`AdapterUnknownDatanet`); `weightsHash`
    ///      is not registered yet (`AdapterDuplicateWeightsHash`). The commitment is used up.
    ///      Events: `AdapterRegistered(id, caller, weightsHash, ...)`.
    /// @param weightsHash sha256 over the adapter's canonical tensors.
    /// @param baseModelHash Canonical hash of the base checkpoint.
    /// @param trainingConfigHash sha256 of the canonical training-config JSON.
    /// @param datanetIds The datanets it was trained on.
    /// @param feePerToken Reward-token units charged per prompt+completion token.
    /// @param uri Where the weights are served.
    /// @param salt The salt of the caller's commitment.
    /// @return id The new adapter's id (1, 2, ...).
    function registerAdapter(
        bytes32 weightsHash,
        bytes32 baseModelHash,
        bytes32 trainingConfigHash,
        uint256[] calldata datanetIds,
        uint256 feePerToken,
        string calldata uri,
        bytes32 salt
    ) external returns (uint256 id) {
        _useCommitment(adapterCommitment(msg.sender, weightsHash, trainingConfigHash, salt));
        if (weightsHash == bytes32(0)) revert AdapterZeroHash("weightsHash");
        if (baseModelHash == bytes32(0)) revert AdapterZeroHash("baseModelHash");
        if (trainingConfigHash == bytes32(0)) revert AdapterZeroHash("trainingConfigHash");
        _checkDatanets(datanetIds);
        uint256 existing = _idByWeightsHash[weightsHash];
        if (existing != 0) revert AdapterDuplicateWeightsHash(weightsHash, existing);

        id = ++_adapterCount;
        _idByWeightsHash[weightsHash] = id;
        Adapter storage a = _adapters[id];
        a.weightsHash = weightsHash;
        a.baseModelHash = baseModelHash;
        a.trainingConfigHash = trainingConfigHash;
        a.owner = msg.sender;
        a.registeredAt = uint64(block.timestamp);
        a.feePerToken = feePerToken;
        a.datanetIds = datanetIds;
        a.uri = uri;
        emit AdapterRegistered(
            id, msg.sender, weightsHash, baseModelHash, trainingConfigHash, datanetIds, feePerToken, uri
        );
    }

    /// @notice Marks adapter `id` deprecated; the node stops routing new requests to it.
    /// @dev Requirements: it exists (`AdapterUnknown`); the caller owns it (`AdapterNotOwner`); it is not
    ///      deprecated yet (`AdapterAlreadyDeprecated`). Events: `AdapterDeprecated(id, caller)`.
    /// @param id An adapter id.
    function deprecate(uint256 id) external {
        Adapter storage a = _ownedAdapter(id);
        if (a.deprecated) revert AdapterAlreadyDeprecated(id);
        a.deprecated = true;
        emit AdapterDeprecated(id, msg.sender);
    }

    /// @notice Makes adapter `id` usable by anyone (`isPublic_`) or by its allowlisted accounts only.
    /// @dev Requirements: it exists (`AdapterUnknown`); the caller owns it (`AdapterNotOwner`). Setting the current
    ///      value changes nothing and emits nothing. Events: `AdapterAccessChanged(id, isPublic_)`.
    /// @param id An adapter id.
    /// @param isPublic_ True: anyone may use it; false: only accounts on its allowlist.
    function setPublic(uint256 id, bool isPublic_) external {
        _ownedAdapter(id);
        if (_private[id] != isPublic_) return;
        _private[id] = !isPublic_;
        emit AdapterAccessChanged(id, isPublic_);
    }

    /// @notice Adds `accounts` to (`allowed`) or removes them from the allowlist of adapter `id`.
    /// @dev Requirements: it exists (`AdapterUnknown`); the caller owns it (`AdapterNotOwner`); no account is the
    ///      zero address (`AdapterZeroAccount`). An account already in the wanted state is skipped and emits
    ///      nothing. Events: `AdapterAllowlistChanged(id, account, allowed)` per account that changed, in order.
    /// @param id An adapter id.
    /// @param accounts The client accounts.
    /// @param allowed True to add them, false to remove them.
    function setAllowed(uint256 id, address[] calldata accounts, bool allowed) external {
        _ownedAdapter(id);
        mapping(address account => bool) storage list = _allowed[id];
        uint256 n = accounts.length;
        for (uint256 i = 0; i < n; ++i) {
            address account = accounts[i];
            if (account == address(0)) revert AdapterZeroAccount(id);
            if (list[account] == allowed) continue;
            list[account] = allowed;
            emit AdapterAllowlistChanged(id, account, allowed);
        }
    }

    /// @notice Whether adapter `id` is usable by anyone (true) or by its allowlisted accounts only (false).
    /// @dev Requirements: it exists (`AdapterUnknown`).
    /// @param id An adapter id.
    /// @return public_ True unless its owner made it private.
    function isPublic(uint256 id) external view returns (bool public_) {
        _adapter(id);
        return !_private[id];
    }

    /// @notice Whether `account` may use adapter `id`: it is public, or `account` is on its allowlist.
    /// @dev Requirements: it exists (`AdapterUnknown`).
    /// @param id An adapter id.
    /// @param account A client account.
    /// @return allowed_ True when `account` may use it.
    function isAllowed(uint256 id, address account) external view returns (bool allowed_) {
        _adapter(id);
        return !_private[id] || _allowed[id][account];
    }

    /// @notice Adapter `id`.
    /// @dev Requirements: it exists (`AdapterUnknown`).
    /// @param id An adapter id.
    /// @return adapter Its record.
    function getAdapter(uint256 id) external view returns (Adapter memory adapter) {
        return _adapter(id);
    }

    /// @notice The id registered for `weightsHash`, or 0 when none is.
    /// @param weightsHash sha256 over an adapter's canonical tensors.
    /// @return id Its adapter id, 0 if unknown.
    function adapterIdByWeightsHash(bytes32 weightsHash) external view returns (uint256 id) {
        return _idByWeightsHash[weightsHash];
    }

    /// @notice Number of adapters registered; ids run from 1 to this number.
    /// @return count The count.
    function adapterCount() external view returns (uint256 count) {
        return _adapterCount;
    }

    /// @dev Storage record of adapter `id`; reverts `AdapterUnknown` when `id` is 0 or above the count.
    function _adapter(uint256 id) private view returns (Adapter storage a) {
        if (id == 0 || id > _adapterCount) revert AdapterUnknown(id);
        return _adapters[id];
    }

    /// @dev Storage record of adapter `id` owned by the caller; reverts `AdapterUnknown` or `AdapterNotOwner`.
    function _ownedAdapter(uint256 id) private view returns (Adapter storage a) {
        a = _adapter(id);
        if (a.owner != msg.sender) revert AdapterNotOwner(id, msg.sender);
    }

    /// @dev Consumes `commitment`: it must exist, be from an earlier block and younger than `COMMIT_TTL`.
    function _useCommitment(bytes32 commitment) private {
        uint256 at = _commits[commitment];
        if (at == 0 || block.timestamp >= uint64(at) + COMMIT_TTL) revert AdapterNotCommitted(commitment);
        if (block.number <= at >> 64) revert AdapterCommitTooNew(commitment);
        delete _commits[commitment];
    }

    /// @dev Reverts unless `ids` is non-empty, repeat-free and names existing datanets (O(n^2), lists are short).
    function _checkDatanets(uint256[] calldata ids) private view {
        uint256 n = ids.length;
        if (n == 0) revert AdapterNoDatanets();
        for (uint256 i = 0; i < n; ++i) {
            uint256 d = ids[i];
            if (!datanetRegistry.exists(d)) revert AdapterUnknownDatanet(d);
            for (uint256 j = 0; j < i; ++j) {
                if (ids[j] == d) revert AdapterDuplicateDatanet(d);
            }
        }
    }
}
