// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title FeeOnTransferToken
/// @notice Test-only ERC-20 that burns `feeBps` of every transfer between two non-zero accounts, so the receiver
///         gets less than was sent. Used to prove the ledger counts what arrived and refuses a short delivery.
contract FeeOnTransferToken is ERC20 {
    /// @notice Share of each transfer that is burnt, in basis points.
    uint16 public immutable feeBps;

    /// @notice Creates the token with no supply.
    /// @param feeBps_ Share of each transfer burnt, in basis points (at most 10000).
    constructor(uint16 feeBps_) ERC20("FeeOnTransfer", "FOT") {
        require(feeBps_ <= 10_000, "fee above 100%");
        feeBps = feeBps_;
    }

    /// @notice Mints `amount` to `to`, unrestricted (test token).
    /// @param to Receiver.
    /// @param amount Token units.
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @dev Moves `value - fee` to `to` and burns the fee; mints and burns are untaxed.
    function _update(address from, address to, uint256 value) internal override {
        if (from == address(0) || to == address(0) || feeBps == 0) {
            super._update(from, to, value);
            return;
        }
        uint256 fee = (value * feeBps) / 10_000;
        super._update(from, address(0), fee);
        super._update(from, to, value - fee);
    }
}
