// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IDatanetRegistry
/// @notice Types, events, errors and views of the datanet registry.
interface IDatanetRegistry {
    /// @notice One registered datanet: a Merkle root over its contributions.
    /// @dev The root commits to StandardMerkleTree leaves `(address contributor, bytes32 contributionHash,
    ///      uint256 weight)`.
    struct Datanet {
        bytes32 contributionsRoot;
        uint32 contributionCount;
        uint64 registeredAt; // block timestamp
        address curator; // the account that registered it
        string uri; // where the full contribution list is served
    }

    /// @notice Datanet `id` was registered by `curator`.
    event DatanetRegistered(
        uint256 indexed id, address indexed curator, bytes32 contributionsRoot, uint32 contributionCount, string uri
    );

    /// @notice The contributions root was zero.
    error DatanetZeroRoot();
    /// @notice The contribution count was zero.
    error DatanetZeroCount();
    /// @notice The contributor registry given at construction, `given`, is not a contract.
    error DatanetInvalidContributorRegistry(address given);
    /// @notice No datanet has id `id`.
    error DatanetUnknown(uint256 id);

    /// @notice True when datanet `id` exists.
    /// @param id A datanet id.
    /// @return known Whether it was registered.
    function exists(uint256 id) external view returns (bool known);
}
