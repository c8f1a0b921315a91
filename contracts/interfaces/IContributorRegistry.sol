// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IContributorRegistry
/// @notice Types, events, errors and views of the contributor registry that other contracts and the node use.
interface IContributorRegistry {
    /// @notice One registered contributor.
    struct Contributor {
        address payout; // where rewards for this contributor are computed to
        uint64 registeredAt; // block timestamp of registration
        bool registered;
        bool suspended;
        string profileUri;
    }

    /// @notice `account` registered itself with profile `profileUri`.
    event ContributorRegistered(address indexed account, string profileUri);
    /// @notice `account` set its payout address to `payout`.
    event PayoutAddressSet(address indexed account, address indexed payout);
    /// @notice `account` was suspended by `by`.
    event ContributorSuspended(address indexed account, address indexed by);
    /// @notice `account` was reinstated by `by`.
    event ContributorReinstated(address indexed account, address indexed by);

    /// @notice `account` tried to register a second time.
    error ContributorAlreadyRegistered(address account);
    /// @notice `account` is not a registered contributor.
    error ContributorNotRegistered(address account);
    /// @notice The zero address was given where an account is needed.
    error ContributorZeroAddress();
    /// @notice `account` is already suspended.
    error ContributorAlreadySuspended(address account);
    /// @notice `account` is not suspended, so it cannot be reinstated.
    error ContributorNotSuspended(address account);

    /// @notice True when `account` is registered and not suspended.
    /// @param account Any address.
    /// @return active Whether `account` is an active contributor.
    function isActive(address account) external view returns (bool active);

    /// @notice The payout address of a registered `account`.
    /// @param account A registered contributor.
    /// @return payout Its payout address.
    function payoutOf(address account) external view returns (address payout);
}
