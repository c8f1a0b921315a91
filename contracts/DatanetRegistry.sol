// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IDatanetRegistry} from "./interfaces/IDatanetRegistry.sol";
import {IContributorRegistry} from "./interfaces/IContributorRegistry.sol";

/// @title DatanetRegistry
/// @notice A datanet is a set of signed contributions committed to by one Merkle root; adapters name the datanets
///         they were trained on. Ids count from 1. Only contributions signed by registered, unsuspended
///         contributors (see `contributorRegistry`) are accepted when a datanet is built, which the node checks
///         off chain against the registry named here.
contract DatanetRegistry is IDatanetRegistry {
    /// @notice The contributor registry whose contributors datanets are built from.
    IContributorRegistry public immutable contributorRegistry;

    mapping(uint256 id => Datanet) private _datanets;
    uint256 private _datanetCount;

    /// @notice Creates the registry bound to `contributorRegistry_`.
    /// @dev Requirements: `contributorRegistry_` is a contract (`DatanetInvalidContributorRegistry`).
    /// @param contributorRegistry_ The deployed `ContributorRegistry`.
    constructor(address contributorRegistry_) {
        if (contributorRegistry_.code.length == 0) revert DatanetInvalidContributorRegistry(contributorRegistry_);
        contributorRegistry = IContributorRegistry(contributorRegistry_);
    }

    /// @notice Registers a datanet with the caller as curator.
    /// @dev Requirements: `contributionsRoot` is not zero (`DatanetZeroRoot`); `contributionCount` is not zero
    ///      (`DatanetZeroCount`). Events: `DatanetRegistered(id, caller, contributionsRoot, contributionCount, uri)`.
    /// @param contributionsRoot StandardMerkleTree root over `(address, bytes32, uint256)` contribution leaves.
    /// @param contributionCount Number of leaves under the root.
    /// @param uri Where the full contribution list is served.
    /// @return id The new datanet's id (1, 2, ...).
    function registerDatanet(bytes32 contributionsRoot, uint32 contributionCount, string calldata uri)
        external
        returns (uint256 id)
    {
        if (contributionsRoot == bytes32(0)) revert DatanetZeroRoot();
        if (contributionCount == 0) revert DatanetZeroCount();
        id = ++_datanetCount;
        _datanets[id] = Datanet({
            contributionsRoot: contributionsRoot,
            contributionCount: contributionCount,
            registeredAt: uint64(block.timestamp),
            curator: msg.sender,
            uri: uri
        });
        emit DatanetRegistered(id, msg.sender, contributionsRoot, contributionCount, uri);
    }

    /// @notice Datanet `id`.
    /// @dev Requirements: it exists (`DatanetUnknown`).
    /// @param id A datanet id.
    /// @return datanet Its record.
    function getDatanet(uint256 id) external view returns (Datanet memory datanet) {
        if (!_exists(id)) revert DatanetUnknown(id);
        return _datanets[id];
    }

    /// @inheritdoc IDatanetRegistry
    function exists(uint256 id) external view returns (bool known) {
        return _exists(id);
    }

    /// @notice Number of datanets registered; ids run from 1 to this number.
    /// @return count The count.
    function datanetCount() external view returns (uint256 count) {
        return _datanetCount;
    }

    /// @dev True when `1 <= id <= _datanetCount`.
    function _exists(uint256 id) private view returns (bool) {
        return id != 0 && id <= _datanetCount;
    }
}
