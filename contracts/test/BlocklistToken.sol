// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title BlocklistToken
/// @notice Test-only ERC-20 whose deployer can block accounts: a transfer from or to a blocked account reverts
///         (as regulated stablecoins do). Used to prove one blocked payee cannot stop a batch of claims.
contract BlocklistToken is ERC20 {
    /// @notice The account allowed to block and unblock.
    address public immutable blocker;
    mapping(address account => bool) private _blocked;

    /// @notice `account` was blocked (`blocked`) or unblocked.
    event BlockedSet(address indexed account, bool blocked);

    /// @notice A transfer touched the blocked `account`.
    error TokenAccountBlocked(address account);
    /// @notice Only `blocker` may change the blocklist.
    error TokenNotBlocker(address caller);

    /// @notice Creates the token with no supply; the caller becomes the blocker.
    constructor() ERC20("Blocklist", "BLK") {
        blocker = msg.sender;
    }

    /// @notice Mints `amount` to `to`, unrestricted (test token).
    /// @param to Receiver.
    /// @param amount Token units.
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Blocks (`blocked`) or unblocks `account`.
    /// @param account The account.
    /// @param blocked Whether transfers from or to it revert.
    function setBlocked(address account, bool blocked) external {
        if (msg.sender != blocker) revert TokenNotBlocker(msg.sender);
        _blocked[account] = blocked;
        emit BlockedSet(account, blocked);
    }

    /// @notice Whether `account` is blocked.
    /// @param account The account.
    /// @return blocked True when transfers from or to it revert.
    function isBlocked(address account) external view returns (bool blocked) {
        return _blocked[account];
    }

    /// @dev Reverts `TokenAccountBlocked` when either side is blocked.
    function _update(address from, address to, uint256 value) internal override {
        if (_blocked[from]) revert TokenAccountBlocked(from);
        if (_blocked[to]) revert TokenAccountBlocked(to);
        super._update(from, to, value);
    }
}
