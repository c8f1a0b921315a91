// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @notice `RewardToken` was constructed with the zero address as admin.
error RewardTokenZeroAdmin();

/// @title RewardToken
/// @notice The devnet's reward currency: a plain 18-decimal ERC-20 that holders of `MINTER_ROLE` can mint.
///         Against a testnet any ERC-20 may be configured instead; nothing else depends on this contract.
contract RewardToken is ERC20, AccessControl {
    /// @notice Role allowed to call `mint`.
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @notice Creates the token; `admin` receives `DEFAULT_ADMIN_ROLE` and `MINTER_ROLE`.
    /// @dev Requirements: `admin` is not the zero address (`RewardTokenZeroAdmin`).
    ///      Events: `RoleGranted` twice.
    /// @param name_ ERC-20 name.
    /// @param symbol_ ERC-20 symbol.
    /// @param admin Account that administers roles and may mint.
    constructor(string memory name_, string memory symbol_, address admin) ERC20(name_, symbol_) {
        if (admin == address(0)) revert RewardTokenZeroAdmin();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(MINTER_ROLE, admin);
    }

    /// @notice Creates `amount` new tokens for `to`.
    /// @dev Requirements: caller holds `MINTER_ROLE` (`AccessControlUnauthorizedAccount`); `to` is not the zero
    ///      address (`ERC20InvalidReceiver`). Events: `Transfer(address(0), to, amount)`.
    /// @param to Receiver of the new tokens.
    /// @param amount Amount in the token's smallest unit.
    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        _mint(to, amount);
    }
}
