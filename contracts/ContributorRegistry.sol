// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IContributorRegistry} from "./interfaces/IContributorRegistry.sol";

/// @title ContributorRegistry
/// @notice Data contributors register their own account here. Rewards are computed to each contributor's payout
///         address (itself by default), so a lost or rotated key does not strand rewards; a holder of
///         `SUSPENDER_ROLE` may suspend a contributor found submitting bad data (suspended contributors earn
///         nothing from the next epoch on, which the node applies off chain).
contract ContributorRegistry is IContributorRegistry, AccessControl {
    /// @notice Role allowed to `suspend` and `reinstate` contributors.
    bytes32 public constant SUSPENDER_ROLE = keccak256("SUSPENDER_ROLE");

    mapping(address account => Contributor) private _contributors;
    uint256 private _contributorCount;

    /// @notice Creates the registry; `admin` receives `DEFAULT_ADMIN_ROLE` and `SUSPENDER_ROLE`.
    /// @dev Requirements: `admin` is not the zero address (`ContributorZeroAddress`).
    /// @param admin Account that administers roles and may suspend.
    constructor(address admin) {
        if (admin == address(0)) revert ContributorZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(SUSPENDER_ROLE, admin);
    }

    /// @notice Registers the caller as a contributor, paying out to itself until it sets another address.
    /// @dev Requirements: the caller is not registered yet (`ContributorAlreadyRegistered`).
    ///      Events: `ContributorRegistered(caller, profileUri)`.
    /// @param profileUri Where the contributor's public profile lives (may be empty).
    function registerContributor(string calldata profileUri) external {
        Contributor storage c = _contributors[msg.sender];
        if (c.registered) revert ContributorAlreadyRegistered(msg.sender);
        c.registered = true;
        c.payout = msg.sender;
        c.registeredAt = uint64(block.timestamp);
        c.profileUri = profileUri;
        _contributorCount += 1;
        emit ContributorRegistered(msg.sender, profileUri);
    }

    /// @notice Sets where the caller's rewards are computed to, from the next epoch on.
    /// @dev Requirements: the caller is registered (`ContributorNotRegistered`); `payout` is not the zero address
    ///      (`ContributorZeroAddress`). Events: `PayoutAddressSet(caller, payout)`.
    /// @param payout The new payout address.
    function setPayoutAddress(address payout) external {
        Contributor storage c = _registered(msg.sender);
        if (payout == address(0)) revert ContributorZeroAddress();
        c.payout = payout;
        emit PayoutAddressSet(msg.sender, payout);
    }

    /// @notice Suspends `account`: it earns nothing from the next epoch on.
    /// @dev Requirements: caller holds `SUSPENDER_ROLE`; `account` is registered (`ContributorNotRegistered`) and
    ///      not suspended (`ContributorAlreadySuspended`). Events: `ContributorSuspended(account, caller)`.
    /// @param account The contributor to suspend.
    function suspend(address account) external onlyRole(SUSPENDER_ROLE) {
        Contributor storage c = _registered(account);
        if (c.suspended) revert ContributorAlreadySuspended(account);
        c.suspended = true;
        emit ContributorSuspended(account, msg.sender);
    }

    /// @notice Lifts the suspension of `account`.
    /// @dev Requirements: caller holds `SUSPENDER_ROLE`; `account` is registered (`ContributorNotRegistered`) and
    ///      suspended (`ContributorNotSuspended`). Events: `ContributorReinstated(account, caller)`.
    /// @param account The contributor to reinstate.
    function reinstate(address account) external onlyRole(SUSPENDER_ROLE) {
        Contributor storage c = _registered(account);
        if (!c.suspended) revert ContributorNotSuspended(account);
        c.suspended = false;
        emit ContributorReinstated(account, msg.sender);
    }

    /// @notice True when `account` is registered and not suspended.
    /// @param account Any address.
    /// @return active Whether contributions signed by `account` are accepted and earn rewards.
    function isActive(address account) external view returns (bool active) {
        Contributor storage c = _contributors[account];
        return c.registered && !c.suspended;
    }

    /// @notice True when `account` has registered (suspended or not).
    /// @param account Any address.
    /// @return registered Whether `account` is known.
    function isRegistered(address account) external view returns (bool registered) {
        return _contributors[account].registered;
    }

    /// @notice The address rewards of `account` are computed to.
    /// @dev Requirements: `account` is registered (`ContributorNotRegistered`).
    /// @param account A registered contributor.
    /// @return payout Its payout address.
    function payoutOf(address account) external view returns (address payout) {
        return _registered(account).payout;
    }

    /// @notice Everything known about `account`.
    /// @dev Requirements: `account` is registered (`ContributorNotRegistered`).
    /// @param account A registered contributor.
    /// @return contributor Its record (payout, registration time, suspended flag, profile URI).
    function getContributor(address account) external view returns (Contributor memory contributor) {
        return _registered(account);
    }

    /// @notice Number of contributors ever registered.
    /// @return count The count.
    function contributorCount() external view returns (uint256 count) {
        return _contributorCount;
    }

    /// @dev The storage record of a registered `account`; reverts `ContributorNotRegistered` otherwise.
    function _registered(address account) private view returns (Contributor storage c) {
        c = _contributors[account];
        if (!c.registered) revert ContributorNotRegistered(account);
    }
}
