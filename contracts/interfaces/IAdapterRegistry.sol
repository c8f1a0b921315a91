// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IAdapterRegistry
/// @notice Types, events and errors of the adapter registry.
interface IAdapterRegistry {
    /// @notice One registered LoRA adapter and its lineage.
    struct Adapter {
        bytes32 weightsHash; // sha256 over the canonical tensors of the adapter
        bytes32 baseModelHash; // canonical hash of the base checkpoint
        bytes32 trainingConfigHash; // sha256 of the canonical training-config JSON
        address owner; // the account that registered it; receives the adapter-owner share
        uint64 registeredAt; // block timestamp
        bool deprecated; // set by the owner; the node stops routing new requests to it
        uint256 feePerToken; // reward-token units per prompt+completion token
        uint256[] datanetIds; // the datanets it was trained on
        string uri; // where the weights are served
    }

    /// @notice Adapter `id` was registered by `owner`.
    event AdapterRegistered(
        uint256 indexed id,
        address indexed owner,
        bytes32 indexed weightsHash,
        bytes32 baseModelHash,
        bytes32 trainingConfigHash,
        uint256[] datanetIds,
        uint256 feePerToken,
        string uri
    );
    /// @notice `committer` committed to registering an adapter (`commitment` hides its weights hash).
    event AdapterCommitted(bytes32 indexed commitment, address indexed committer);
    /// @notice Adapter `id` was deprecated by its owner.
    event AdapterDeprecated(uint256 indexed id, address indexed owner);
    /// @notice Adapter `id` became usable by anyone (`isPublic`) or by its allowlisted accounts only.
    event AdapterAccessChanged(uint256 indexed id, bool isPublic);
    /// @notice `account` was added to (`allowed`) or removed from the allowlist of adapter `id`.
    event AdapterAllowlistChanged(uint256 indexed id, address indexed account, bool allowed);

    /// @notice The datanet registry given at construction, `given`, is not a contract.
    error AdapterInvalidDatanetRegistry(address given);
    /// @notice A hash argument was zero; `field` names it.
    error AdapterZeroHash(string field);
    /// @notice The datanet list was empty.
    error AdapterNoDatanets();
    /// @notice Datanet `datanetId` does not exist.
    error AdapterUnknownDatanet(uint256 datanetId);
    /// @notice Datanet `datanetId` appears twice in the list.
    error AdapterDuplicateDatanet(uint256 datanetId);
    /// @notice `weightsHash` is already registered as adapter `existingId`.
    error AdapterDuplicateWeightsHash(bytes32 weightsHash, uint256 existingId);
    /// @notice No live commitment `commitment` exists for this sender and these hashes (never made, made by another
    ///         account, used, or older than `COMMIT_TTL`): call `commitAdapter` first.
    error AdapterNotCommitted(bytes32 commitment);
    /// @notice Commitment `commitment` was made in this block: reveal it in a later block.
    error AdapterCommitTooNew(bytes32 commitment);
    /// @notice Commitment `commitment` is already pending.
    error AdapterAlreadyCommitted(bytes32 commitment);
    /// @notice No adapter has id `id`.
    error AdapterUnknown(uint256 id);
    /// @notice `caller` is not the owner of adapter `id`.
    error AdapterNotOwner(uint256 id, address caller);
    /// @notice Adapter `id` is already deprecated.
    error AdapterAlreadyDeprecated(uint256 id);
    /// @notice The zero address cannot be put on the allowlist of adapter `id`.
    error AdapterZeroAccount(uint256 id);
}
